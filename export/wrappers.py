"""torch modules that give each component the input and output names of optimum's export
(engine/components.py), so the graphs read the same whether optimum or edgediff wrote them."""

import torch


class TextEncoder(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids):
        out = self.m(input_ids=input_ids, return_dict=True)
        return out.last_hidden_state, out.pooler_output


class Unet(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.m(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeEncoder(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, sample):
        # (B, 2 * latent_channels, h, w): the posterior's mean and log-variance. No sampling in the
        # graph: the pipeline draws that noise from its own seeded generator.
        return self.m.encode(sample).latent_dist.parameters


class VaeDecoder(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, latent_sample):
        return self.m.decode(latent_sample, return_dict=False)[0]


class SafetyChecker(torch.nn.Module):
    """diffusers' StableDiffusionSafetyChecker.forward_onnx, except the blackout: its in-place
    `images[has_nsfw_concepts] = 0.0` traces to a Where that broadcasts the (B,) mask against the
    channel axis of the NHWC images, which ONNX Runtime rejects for any batch but 1."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, clip_input, images):
        from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

        m = self.m
        embeds = m.visual_projection(m.vision_model(clip_input)[1])
        special_scores = cosine_distance(embeds, m.special_care_embeds) - m.special_care_embeds_weights
        special_adjustment = torch.any(special_scores > 0, dim=1) * 0.01  # (B,)
        concept_scores = cosine_distance(embeds, m.concept_embeds) - m.concept_embeds_weights \
            + special_adjustment.unsqueeze(1)
        has_nsfw_concepts = torch.any(concept_scores > 0, dim=1)  # (B,)
        keep = (~has_nsfw_concepts).to(images.dtype).reshape(-1, 1, 1, 1)
        return images * keep, has_nsfw_concepts
