"""torch modules that give each component the input and output names of optimum's export
(engine/components.py), so the graphs read the same whether optimum or edgediff wrote them."""

import numpy as np
import torch


class TextEncoder(torch.nn.Module):
    """A CLIP text tower returning the outputs its component description names, in that order."""

    def __init__(self, m, outputs=("last_hidden_state", "pooler_output")):
        super().__init__()
        self.m, self.outputs = m, tuple(outputs)

    def forward(self, input_ids):
        penultimate = "penultimate_hidden_state" in self.outputs
        out = self.m(input_ids=input_ids, output_hidden_states=penultimate, return_dict=True)
        values = {"last_hidden_state": lambda: out.last_hidden_state, "pooler_output": lambda: out.pooler_output,
                  "text_embeds": lambda: out.text_embeds,  # CLIPTextModelWithProjection's pooled projection
                  "penultimate_hidden_state": lambda: out.hidden_states[-2]}  # diffusers' SDXL conditioning
        return tuple(values[name]() for name in self.outputs)


class Unet(torch.nn.Module):
    """diffusers' UNet with its inputs as named positional arguments; SDXL's added conditioning
    (text_embeds, time_ids) goes to `added_cond_kwargs`, as its pipeline passes it."""

    def __init__(self, m, inputs=("sample", "timestep", "encoder_hidden_states")):
        super().__init__()
        self.m, self.inputs = m, tuple(inputs)

    def forward(self, sample, timestep, encoder_hidden_states, *added):
        added_cond = dict(zip(self.inputs[3:], added)) or None
        return self.m(sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond, return_dict=False)[0]


# -- feature caching (DeepCache, arXiv 2312.00858) -----------------------------------------------------
#
# The last up block's layers each take the hidden state from below and one skip from the first down
# block (or conv_in). With depth d, the shallow network recomputes only what the last d layers of the up
# block need: conv_in and the first d - 1 layers of the first down block (their skips), then those d up
# layers and the output convolution, on a hidden state cached from the last full step. d = 1 is the
# cheapest (DeepCache's branch 0); the export measures each depth and picks one (onnx_export._cache_depth).

def _layers(block) -> list:
    """(resnet, attention or None) pairs of a diffusers down or up block, in order."""
    attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
    return list(zip(block.resnets, attentions))


def _layer(resnet, attn, h, emb, context):
    """One layer as diffusers' CrossAttn{Down,Up}Block2D runs it (no masks, no FreeU)."""
    h = resnet(h, emb)
    return h if attn is None else attn(h, encoder_hidden_states=context, return_dict=False)[0]


def cache_depths(m) -> int:
    """How many depths the last up block offers: its layers (SD's: 3)."""
    return len(m.up_blocks[-1].resnets)


class UnetWithFeature(Unet):
    """The full UNet, also returning the hidden state entering the last up block's layer that the
    shallow network of `depth` starts at (its part from below, without the skip it is joined to)."""

    def __init__(self, m, inputs, depth: int):
        super().__init__(m, inputs)
        self.depth = depth
        self.skip_channels = m.config.block_out_channels[0]  # every skip of the last up block has these

    def forward(self, *args):
        captured = []
        resnet = self.m.up_blocks[-1].resnets[cache_depths(self.m) - self.depth]
        hook = resnet.register_forward_pre_hook(
            lambda module, inputs: captured.append(inputs[0][:, :inputs[0].shape[1] - self.skip_channels]))
        try:
            out = super().forward(*args)
        finally:
            hook.remove()
        return out, captured[0]


class UnetShallow(torch.nn.Module):
    """(UNet inputs..., cache_feature) -> the noise prediction, computing only the shallow path."""

    def __init__(self, m, inputs, depth: int):
        super().__init__()
        self.m, self.inputs, self.depth = m, tuple(inputs), depth
        if m.config.center_input_sample or m.class_embedding is not None:
            raise ValueError("feature caching supports UNets without input centring or class embeddings")

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        *added, feature = rest
        m, depth = self.m, self.depth
        added_cond = dict(zip(self.inputs[3:], added))
        # diffusers' UNet2DConditionModel.forward up to conv_in: time and added embeddings
        emb = m.time_embedding(m.get_time_embed(sample=sample, timestep=timestep), None)
        aug = m.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond)
        emb = emb + aug if aug is not None else emb
        if m.time_embed_act is not None:
            emb = m.time_embed_act(emb)
        context = m.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                                  added_cond_kwargs=added_cond)
        h = m.conv_in(sample)
        skips = [h]
        for resnet, attn in _layers(m.down_blocks[0])[:depth - 1]:
            h = _layer(resnet, attn, h, emb, context)
            skips.append(h)
        h = feature
        for resnet, attn in _layers(m.up_blocks[-1])[cache_depths(m) - depth:]:
            h = _layer(resnet, attn, torch.cat([h, skips.pop()], dim=1), emb, context)
        if m.conv_norm_out is not None:
            h = m.conv_act(m.conv_norm_out(h))
        return m.conv_out(h)


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


# -- the VAE decoder in two parts, for a tiled decode with shared GroupNorm statistics ----------------
#
# Tiling a VAE decode naively gives each tile GroupNorm statistics of its own, and the tiles disagree
# in colour and contrast (12-29 dB against the whole decode on our test VAEs, where seams show). The
# decoder is split where its memory starts to grow: the head (post_quant_conv, conv_in, the mid block
# with its image-wide attention, the first up block) works at latent resolution and runs whole; the tail
# (the remaining up blocks) holds the large activations and runs in tiles. Every GroupNorm of the tail
# takes its statistics as an input, so all tiles normalise alike, and reports the statistics of its
# tile's own region, so the runtime can merge them into image-wide ones (engine/tiling.py).

def decoder_head(vae, latent_sample):
    d = vae.decoder
    x = vae.post_quant_conv(latent_sample) if vae.post_quant_conv is not None else latent_sample
    x = d.conv_in(x)
    x = d.mid_block(x, None)
    return d.up_blocks[0](x, None)


class VaeDecoderHead(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, latent_sample):
        return decoder_head(self.m, latent_sample)


class _SharedStatsGroupNorm(torch.nn.Module):
    """GroupNorm whose mean and variance are `mix * given + (1 - mix) * this tile's own`, and which
    records the mean and variance of its input over the tile's owned region (the mask). mix = 0 is
    diffusers' GroupNorm exactly; mix = 1 normalises with the image-wide statistics given."""

    def __init__(self, norm: torch.nn.GroupNorm, index: int, context: dict):
        super().__init__()
        self.groups, self.eps, self.index, self.context = norm.num_groups, norm.eps, index, context
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x):
        ctx = self.context
        b, c, h, w = x.shape
        xg = x.reshape(b, self.groups, -1)
        given = ctx["stats"][self.index]  # (B, G, 2)
        mix = ctx["mix"]
        mean = mix * given[..., 0] + (1 - mix) * xg.mean(-1)
        d = xg - mean[..., None]
        d2 = d * d
        own_var = d2.mean(-1) - d.mean(-1) ** 2  # the tile's variance, about the mean used
        var = mix * given[..., 1] + (1 - mix) * own_var
        y = (d * torch.rsqrt(var[..., None] + self.eps)).reshape(b, c, h, w)
        y = y * self.weight.reshape(1, c, 1, 1) + self.bias.reshape(1, c, 1, 1)
        # Statistics of the owned region, as sums against the mask (a MatMul: no mask-sized copy of x)
        # and shifted by `mean`, which keeps the variance free of cancellation.
        mask = torch.nn.functional.interpolate(ctx["mask"], size=(h, w), mode="nearest").reshape(h * w, 1)
        count = mask.sum() * (c // self.groups)
        s1 = (d.reshape(b, c, h * w) @ mask).reshape(b, self.groups, -1).sum(-1) / count
        s2 = (d2.reshape(b, c, h * w) @ mask).reshape(b, self.groups, -1).sum(-1) / count
        ctx["out"].append(torch.stack([mean + s1, s2 - s1 * s1], dim=-1))
        return y


class VaeDecoderTail(torch.nn.Module):
    """The decoder after its head: (hidden, norm_stats, stats_mask, stats_mix) -> (sample, tile_stats).
    Replaces the GroupNorms of the VAE it is given (export this part last)."""

    def __init__(self, m):
        super().__init__()
        self.m = m
        self.context = {}
        d = m.decoder
        owners = [(parent, name, child) for block in d.up_blocks[1:] for parent in block.modules()
                  for name, child in parent.named_children() if isinstance(child, torch.nn.GroupNorm)]
        owners.append((d, "conv_norm_out", d.conv_norm_out))
        for index, (parent, name, child) in enumerate(owners):
            setattr(parent, name, _SharedStatsGroupNorm(child, index, self.context))
        self.norms = len(owners)
        self.groups = owners[0][2].num_groups

    def forward(self, hidden, norm_stats, stats_mask, stats_mix):
        d = self.m.decoder
        self.context.update(stats=norm_stats, mask=stats_mask, mix=stats_mix, out=[])
        x = hidden
        for block in d.up_blocks[1:]:
            x = block(x, None)
        x = d.conv_out(d.conv_act(d.conv_norm_out(x)))
        return x, torch.stack(self.context["out"])


def tail_margin(config) -> int:
    """Hidden pixels around a tile that reach its core through the tail's 3x3 convolutions: the
    receptive radius, so that a tile with this margin computes its core exactly as the whole would."""
    blocks, layers = len(config.block_out_channels), config.layers_per_block
    radius = 0.0
    for i in range(1, blocks):  # up block i runs at 2^(i-1) times the hidden resolution
        scale = 2 ** (i - 1)
        radius += 2 * (layers + 1) / scale  # two 3x3 convolutions per resnet
        if i < blocks - 1:
            radius += 1 / (2 * scale)  # the upsampler's convolution, at twice the resolution
    radius += 1 / 2 ** (blocks - 2)  # conv_out
    return int(np.ceil(radius))
