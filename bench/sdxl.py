"""The full-size SDXL base architecture with random weights, for benchmarks.

SDXL's shapes (2.6B-parameter UNet, CLIP ViT-L and OpenCLIP ViT-bigG-with-projection text towers, the
SDXL VAE), nothing from the network: the configs are export/single_file.py's copies of
stabilityai/stable-diffusion-xl-base-1.0's, the weights are drawn from a fixed seed
(bench/random_weights.py). The folder is built once into the cache and reused (about 14 GB of fp32
safetensors; the UNet alone is 10.3 GB, which is also the build's peak).

    python -m edgediff.bench.sdxl [--out DIR]     # prints the folder
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import random_weights as rw

SEED = 0
VERSION = 1  # bump when what is built changes, so old caches are not reused


def default_folder() -> Path:
    from ..engine.files import cache_root

    return cache_root() / "bench" / f"sdxl-random-v{VERSION}-seed{SEED}"


def build_sdxl(out: Path | None = None) -> Path:
    """The diffusers folder of SDXL base with random weights, built the first time (atomically)."""
    from ..engine.clip_vocab import PAD_SD1, PAD_SD2
    from ..export.single_file import SDXL_SCHEDULER, SDXL_TEXT, SDXL_TEXT_2, SDXL_UNET, SDXL_VAE

    return rw.build_random_folder(
        Path(out) if out else default_folder(), SEED,
        {"text_encoder": lambda: rw.text_encoder(SDXL_TEXT),
         "text_encoder_2": lambda: rw.text_encoder(SDXL_TEXT_2), "unet": lambda: rw.unet(SDXL_UNET), "vae": lambda: rw.vae(SDXL_VAE)},
        # stable-diffusion-xl-base-1.0's tokenizer pads with <|endoftext|>, tokenizer_2 with "!"
        {"tokenizer": PAD_SD1, "tokenizer_2": PAD_SD2}, SDXL_SCHEDULER,
        {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
         "force_zeros_for_empty_prompt": True,  # the base model's: an unset negative is zeros, not encoded
         "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
         "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
         "tokenizer_2": ["transformers", "CLIPTokenizer"],
         "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
         "scheduler": ["diffusers", "EulerDiscreteScheduler"]})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m edgediff.bench.sdxl", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="default: in edgediff's cache")
    print(build_sdxl(p.parse_args(argv).out))


if __name__ == "__main__":
    main()
