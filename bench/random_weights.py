"""Diffusers folders of full-size architectures with random weights, for benchmarks (bench/sd15.py,
bench/sdxl.py).

A benchmark measures the engine, not the picture: it needs a family's shapes and nothing from the
network. The configs are export/single_file.py's copies of the reference repositories'; the weights are
drawn from a fixed seed, so two builds of one version are the same model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def build_random_folder(out: Path, seed: int, components: dict[str, Callable], tokenizers: dict[str, str],
                        scheduler: dict, index: dict) -> Path:
    """Build `out` atomically, unless it is already there: `components` maps each folder name to a
    function returning its torch module, `tokenizers` each tokenizer folder to its padding token."""
    if (out / "model_index.json").is_file():
        return out
    import torch

    from ..engine.clip_vocab import write_clip_tokenizer
    from ..engine.files import atomic_folder

    with atomic_folder(out) as tmp:
        torch.manual_seed(seed)
        # One component at a time, saved and freed: the peak is the largest component, not their sum.
        for name, build in components.items():
            model = build().eval()
            model.save_pretrained(tmp / name, safe_serialization=True)
            del model
        for name, pad in tokenizers.items():
            write_clip_tokenizer(tmp / name, pad_token=pad)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def unet(config: dict):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**_init_args(config))


def vae(config: dict):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**_init_args(config))


def text_encoder(config: dict):
    """The transformers class the config's `architectures` names (CLIPTextModel or
    CLIPTextModelWithProjection)."""
    import transformers

    cls = getattr(transformers, config["architectures"][0])
    return cls(transformers.CLIPTextConfig(**{k: v for k, v in config.items() if k != "architectures"}))


def _init_args(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def taesd(out: Path, seed: int = 0) -> Path:
    """A tiny autoencoder with TAESD's architecture (diffusers' AutoencoderTiny defaults are
    madebyollin/taesd's config) and random weights, saved once as a diffusers folder: the tiny-VAE lever's
    speed (its picture is noise, as the random SD's is)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from diffusers import AutoencoderTiny

    from ..engine.files import atomic_folder

    with atomic_folder(out) as tmp:
        torch.manual_seed(seed)
        AutoencoderTiny().save_pretrained(tmp, safe_serialization=True)
    return out
