"""LoRA and embedding files for the tests, written in the formats people download: kohya/AUTOMATIC1111
(`lora_unet_*`, `lora_te*_*`, down/up/alpha, LoCon convolutions, SDXL's SGM block names) and diffusers/PEFT
(`unet.*.lora_A.weight`). Random low-rank pairs large enough to change the tiny models' pictures."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ATTENTION = re.compile(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
CONVS = re.compile(r"resnets\.\d+\.conv[12]$")
TEXT = re.compile(r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$|mlp\.fc[12]$")


def modules(model, pattern) -> dict[str, tuple[int, ...]]:
    """{module name: weight shape} of a PyTorch model's layers whose names match, in diffusers' and
    transformers' classic naming (CLIP's `text_model.` prefix, which transformers 5.6 dropped)."""
    import torch

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and pattern.search(name):
            if name.startswith("encoder.") or name.startswith("embeddings."):
                name = "text_model." + name
            out[name] = tuple(m.weight.shape)
    return out


def pair(shape, rank: int, rng, scale: float):
    """(down, up) for a weight of `shape`: Linear (out, in), or a convolution (out, in, kh, kw)."""
    out, rest = shape[0], shape[1:]
    down = (rng.standard_normal((rank, *rest)) * scale).astype(np.float32)
    up = (rng.standard_normal((out, rank) + (1, 1) * (len(rest) > 1)) * scale).astype(np.float32)
    return down, up


def kohya(path: Path, layers: dict[str, tuple[int, ...]], rank: int = 4, seed: int = 0, scale: float = 0.3,
          alpha: float | None = 2.0, dtype=np.float32, names=None) -> Path:
    """`layers`: {(prefix, module): shape} with prefix lora_unet / lora_te / lora_te1 / lora_te2; `names`
    maps a module to the name the file uses (SGM names for kohya's SDXL)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for (prefix, module), shape in layers.items():
        key = f"{prefix}_{(names or {}).get(module, module).replace('.', '_')}"
        down, up = pair(shape, rank, rng, scale)
        tensors[f"{key}.lora_down.weight"] = down.astype(dtype)
        tensors[f"{key}.lora_up.weight"] = up.astype(dtype)
        if alpha is not None:
            tensors[f"{key}.alpha"] = np.array(alpha, dtype=np.float32)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def peft(path: Path, layers: dict[str, tuple[int, ...]], rank: int = 4, seed: int = 0, scale: float = 0.3) -> Path:
    """`layers`: {(prefix, module): shape} with prefix unet / text_encoder / text_encoder_2."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for (prefix, module), shape in layers.items():
        down, up = pair(shape, rank, rng, scale)
        tensors[f"{prefix}.{module}.lora_A.weight"] = down
        tensors[f"{prefix}.{module}.lora_B.weight"] = up
    save_file(tensors, str(path))
    return path


def embedding(path: Path, vectors: int, widths: tuple[int, ...], seed: int = 0, scale: float = 1.0) -> Path:
    """An AUTOMATIC1111 embedding (`emb_params`), or SDXL's clip_l/clip_g pair for two widths."""
    rng = np.random.default_rng(seed)
    made = [(rng.standard_normal((vectors, w)) * scale).astype(np.float32) for w in widths]
    tensors = {"emb_params": made[0]} if len(widths) == 1 else {"clip_l": made[0], "clip_g": made[1]}
    save_file(tensors, str(path))
    return path
