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
