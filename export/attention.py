"""The attention variants an export can bake into the UNet and VAE graphs, as diffusers attention
processors (installed with `set_attn_processor`, so the rest of diffusers' modules stay untouched).

- standard: diffusers' own `AttnProcessor`, one softmax(QK^T)V per layer: the graph ONNX Runtime's
  optimizer fuses into its attention kernels, and the fastest where the score matrix fits.
- sliced: the queries are cut into `slices` equal parts and each part attends on its own, so the
  (B*heads, N, N) score matrix never exists whole; its peak is 1/slices of it. diffusers'
  `SlicedAttnProcessor` slices the batch*heads axis instead, which helps only while batch*heads > 1
  and leaves one head's N x N matrix (64 MB for SD's VAE at 512x512): slicing queries keeps shrinking.
- fused: one `com.microsoft.MultiHeadAttention` node per layer (ONNX Runtime's contrib op), written
  by the exporter directly rather than recovered afterwards by pattern-matching fusions (ONNX Runtime's
  transformer optimizer, whose UNet attention fusion crashes under numpy 2). Its CPU kernel is a flash
  attention: the (heads, N, N) scores are never held whole, and the CUDA and ROCm kernels are fused too.
  ONNX Runtime only: Core ML exports use split-einsum.
- split-einsum: Apple's layout for the Neural Engine (ml-stable-diffusion's SPLIT_EINSUM): tensors as
  (B, C, 1, S) and one einsum per head, which Core ML maps onto the ANE without large transposes.

Slicing uses a reshape, not a Python loop over a traced length, so exported graphs keep dynamic sizes:
the query length N must divide by the number of slices. Level l of SD's UNet holds N = (H/8/2^l) *
(W/8/2^l), a multiple of 64/4^l for image sides that are multiples of 64, hence `slices_for_level`.
"""

from __future__ import annotations

import torch

VARIANTS = ("standard", "fused", "sliced", "split-einsum")
DEFAULT_SLICES = 16  # at level 0 of a 512x512 UNet: 4096 queries in 16 parts of 256


def slices_for_level(slices: int, level: int) -> int:
    """Query slices at UNet level `level` (0 = full latent size): divides N for sides that are
    multiples of 64, as argued above."""
    return max(1, slices // 4 ** level)


class _Core:
    """Everything diffusers' AttnProcessor does around the attention itself (norms, projections,
    residual), with the softmax(QK^T)V core left to the subclass."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("edgediff's attention variants take no attention mask (SD 1.x/2.x pass none)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        hidden_states = self.attend(attn, query, key, value)  # (B, N, heads * head_dim)

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def attend(self, attn, query, key, value):
        raise NotImplementedError("need attend")


def _scores_dtype(attn, q):
    # SD 2.x sets upcast_attention: its scores overflow fp16 otherwise (diffusers does the same).
    return torch.float32 if (attn.upcast_attention or attn.upcast_softmax) else q.dtype


class QuerySlicedAttnProcessor(_Core):
    def __init__(self, slices: int):
        if slices < 1:
            raise ValueError("slices must be at least 1")
        self.slices = slices

    def attend(self, attn, query, key, value):
        q = attn.head_to_batch_dim(query)  # (B*heads, N, d)
        k = attn.head_to_batch_dim(key)  # (B*heads, M, d)
        v = attn.head_to_batch_dim(value)
        bh, n, d = q.shape
        dtype = _scores_dtype(attn, q)
        kt = k.transpose(1, 2).to(dtype) * attn.scale
        q = q.reshape(bh, self.slices, n // self.slices, d)  # N must divide by slices (module docstring)
        parts = []
        for i in range(self.slices):
            probs = torch.bmm(q[:, i].to(dtype), kt).softmax(dim=-1).to(v.dtype)  # (B*heads, N/slices, M)
            parts.append(torch.bmm(probs, v))
        out = torch.stack(parts, dim=1).reshape(bh, n, -1)
        return attn.batch_to_head_dim(out)


class _MultiHeadAttention(torch.autograd.Function):
    """softmax(Q K^T * scale) V over `heads` heads of (B, N, heads*d) tensors: computed by PyTorch when
    run, exported as ONNX Runtime's MultiHeadAttention node."""

    @staticmethod
    def forward(ctx, query, key, value, heads: int, scale: float):
        b, n, inner = query.shape
        d = inner // heads
        q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (query, key, value))
        probs = (torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale).softmax(dim=-1).to(v.dtype)
        return torch.matmul(probs, v).transpose(1, 2).reshape(b, n, inner)

    @staticmethod
    def symbolic(g, query, key, value, heads: int, scale: float):
        out = g.op("com.microsoft::MultiHeadAttention", query, key, value, num_heads_i=heads, scale_f=scale)
        out.setType(query.type())
        return out


class FusedAttnProcessor(_Core):
    def attend(self, attn, query, key, value):
        return _MultiHeadAttention.apply(query, key, value, attn.heads, float(attn.scale))


class SplitEinsumAttnProcessor(_Core):
    def attend(self, attn, query, key, value):
        b, n, inner = query.shape
        heads = attn.heads
        d = inner // heads
        dtype = _scores_dtype(attn, query)
        # (B, S, C) -> (B, C, 1, S): Apple's channels-first layout for the Neural Engine.
        q = query.transpose(1, 2).unsqueeze(2).to(dtype)
        k = key.transpose(1, 2).unsqueeze(2).to(dtype)
        v = value.transpose(1, 2).unsqueeze(2)
        outs = []
        for h in range(heads):
            qh, kh, vh = (t[:, h * d:(h + 1) * d] for t in (q, k, v))  # (B, d, 1, S)
            w = torch.einsum("bchq,bchk->bkhq", qh, kh) * attn.scale  # (B, M, 1, N)
            w = w.softmax(dim=1).to(vh.dtype)
            outs.append(torch.einsum("bkhq,bchk->bchq", w, vh))  # (B, d, 1, N)
        out = torch.cat(outs, dim=1)  # (B, C, 1, N)
        return out.squeeze(2).transpose(1, 2)


def install(module: torch.nn.Module, variant: str, slices: int = DEFAULT_SLICES) -> None:
    """Give every attention layer of a diffusers UNet or VAE the variant's processor."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    if variant not in VARIANTS:
        raise ValueError(f"unknown attention variant {variant!r}; use one of {', '.join(VARIANTS)}")
    deepest = len(module.config.block_out_channels) - 1
    for name, sub in module.named_modules():
        if not isinstance(sub, Attention):
            continue
        if variant == "standard":
            sub.set_processor(AttnProcessor())
        elif variant == "split-einsum":
            sub.set_processor(SplitEinsumAttnProcessor())
        elif variant == "fused":
            sub.set_processor(FusedAttnProcessor())
        else:
            sub.set_processor(QuerySlicedAttnProcessor(slices_for_level(slices, _level(name, deepest))))


def _level(name: str, deepest: int) -> int:
    """The resolution level of an attention layer from its module path: UNet down block i works at
    level i, up block j at deepest - j, the mid block at the deepest. The VAE's attention sits in the
    mid blocks of its encoder and decoder, at the latent size, which is the UNet's level 0."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "up_blocks":
        return deepest - int(parts[1])
    if parts[0] == "mid_block":
        return deepest
    return 0
