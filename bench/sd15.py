"""The full-size Stable Diffusion 1.5 architecture with random weights, for benchmarks.

A benchmark measures the engine, not the picture, so it needs SD 1.5's shapes (860M-parameter UNet,
123M-parameter CLIP ViT-L text tower, 84M-parameter VAE) and nothing from the network: the configs are
export/single_file.py's copies of the reference repository's, the weights are drawn from a fixed seed
(bench/random_weights.py). The folder is built once into the cache and reused (about 4.3 GB of fp32
safetensors).

    python -m edgediff.bench.sd15 [--out DIR]     # prints the folder
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import random_weights as rw

SEED = 0
VERSION = 1  # bump when what is built changes, so old caches are not reused


def default_folder() -> Path:
    from ..engine.files import cache_root

    return cache_root() / "bench" / f"sd15-random-v{VERSION}-seed{SEED}"


def build_sd15(out: Path | None = None) -> Path:
    """The diffusers folder of SD 1.5 with random weights, built the first time (atomically)."""
    from ..engine.clip_vocab import PAD_SD1
    from ..export.single_file import SD1_SCHEDULER, SD1_TEXT, SD1_UNET, SD_VAE

    return rw.build_random_folder(
        Path(out) if out else default_folder(), SEED,
        # the peak stays at the UNet's 3.4 GB
        {"text_encoder": lambda: rw.text_encoder(SD1_TEXT), "unet": lambda: rw.unet(SD1_UNET),
         "vae": lambda: rw.vae(SD_VAE)},
        {"tokenizer": PAD_SD1}, SD1_SCHEDULER,
        {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
         "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
         "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
         "scheduler": ["diffusers", "PNDMScheduler"],
         "safety_checker": [None, None], "feature_extractor": [None, None]})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m edgediff.bench.sd15", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="default: in edgediff's cache")
    print(build_sd15(p.parse_args(argv).out))


if __name__ == "__main__":
    main()
