"""Tiny Stable Diffusion models with random weights, built from diffusers' and transformers' real classes.

They have the shapes of the real thing where it matters to the engine (4 latent channels, 8x VAE
downsampling, cross-attention, CFG-ready text encoder), in three kinds:

- "sd1": SD 1.x layout: conv projections in the transformer blocks, one head size, quick_gelu CLIP,
  epsilon prediction, PNDM config as the SD 1.5 repository ships it.
- "sd2": SD 2.x (768-v) layout: linear projections, per-block head dims, gelu CLIP, "!" padding,
  v-prediction with a DDIM config, attention upcast.
- "inpaint": "sd1" with the 9-channel UNet input of the inpainting checkpoints.
- "sdxl": SDXL's layout: two text encoders of different widths (CLIP with quick_gelu and
  end-of-text padding, then a projecting OpenCLIP-style one with gelu and "!" padding), their
  penultimate states concatenated as the UNet's context, the pooled projection and six micro-
  conditioning numbers as its added "text_time" conditioning, several transformer layers per block,
  the SDXL VAE's scaling factor, and the Euler config SDXL ships.
- "sdxl-inpaint": "sdxl" with the 9-channel UNet input.

Building needs torch, diffusers and transformers (the `export` extra). The weights are random: the
pictures are noise, which is all the parity tests need. A trained built-in model is issue 3's work.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..engine.families import SD1, SDXL
from ..engine.model_folder import scale_factor
from ..engine.tokenizer import CLIP_CONTEXT
from ..export.single_file import SD1_SCHEDULER, SD2_SCHEDULER, SDXL_SCHEDULER
from .vocab import write_tokenizer

KINDS = ("sd1", "sd2", "inpaint", "sdxl", "sdxl-inpaint")
VAE_BLOCKS = (16, 16, 32, 32)  # 4 blocks: 3 downsamplings = 8x, as in SD

# The scheduler configs exactly as the SD 1.5, SD 2.1 and SDXL base repositories ship them.
SD1_SCHEDULER_CONFIG = SD1_SCHEDULER
SD2_SCHEDULER_CONFIG = SD2_SCHEDULER
SDXL_SCHEDULER_CONFIG = SDXL_SCHEDULER


@dataclass(frozen=True)
class TinySpec:
    kind: str = "sd1"
    seed: int = 0
    sample_size: int = 8  # latent side: 8 -> 64x64 images, through the VAE's 8x downsampling
    unet_channels: tuple[int, ...] = (32, 64)
    text_width: int = 32  # CLIP hidden size = the UNet's cross_attention_dim


def build_random_model(out: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Write a diffusers-format model folder to `out` (atomically: a temporary folder, then a rename)."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionInpaintPipeline,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if spec.kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {spec.kind!r}; use one of {', '.join(KINDS)}")
    if spec.kind.startswith("sdxl"):
        return _build_sdxl(Path(out), spec)
    out = Path(out)
    sd2 = spec.kind == "sd2"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        tok_dir = tmp / "_tokenizer_src"
        vocab_size = write_tokenizer(tok_dir, pad_token="!" if sd2 else "<|endoftext|>")
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)

        torch.manual_seed(spec.seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=spec.text_width, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=CLIP_CONTEXT, projection_dim=spec.text_width,
            hidden_act="gelu" if sd2 else "quick_gelu", layer_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
        c = spec.unet_channels
        unet = UNet2DConditionModel(
            sample_size=spec.sample_size, in_channels=9 if spec.kind == "inpaint" else 4, out_channels=4,
            block_out_channels=c, layers_per_block=1, norm_num_groups=min(32, c[0]),
            down_block_types=("CrossAttnDownBlock2D",) * (len(c) - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(c) - 1),
            cross_attention_dim=spec.text_width,
            # SD 1.x names one head dim (8); SD 2.x gives one per block and uses linear projections.
            attention_head_dim=tuple(2 * (i + 1) for i in range(len(c))) if sd2 else 8,
            use_linear_projection=sd2, upcast_attention=sd2,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=VAE_BLOCKS, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=spec.sample_size * scale_factor(VAE_BLOCKS),
            scaling_factor=SD1.scaling_factor,
        )
        common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                      set_alpha_to_one=False)
        if sd2:
            scheduler = DDIMScheduler(prediction_type="v_prediction", clip_sample=False, **common)
        else:
            scheduler = PNDMScheduler(skip_prk_steps=True, **common)
        cls = StableDiffusionInpaintPipeline if spec.kind == "inpaint" else StableDiffusionPipeline
        pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        # The scheduler config exactly as the SD 1.5 and SD 2.1 repositories ship it: written by old
        # diffusers, without `timestep_spacing`, so every scheduler falls back to its own default.
        _save(pipe, tmp, out, spec, SD2_SCHEDULER_CONFIG if sd2 else SD1_SCHEDULER_CONFIG)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _save(pipe, tmp: Path, out: Path, spec: TinySpec, scheduler_config: dict) -> None:
    """The pipeline's folder with the scheduler config as its repository ships it and a model card,
    renamed into place."""
    model_dir = tmp / "model"
    pipe.save_pretrained(model_dir, safe_serialization=True)
    (model_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    card = {"kind": spec.kind, "seed": spec.seed, "weights": "random", "built_by": "edgediff.builtin"}
    (model_dir / "edgediff_model.json").write_text(json.dumps(card, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(model_dir, out)


def _build_sdxl(out: Path, spec: TinySpec) -> Path:
    """The tiny SDXL: see the module's docstring. The widths differ (text 32 and 48, projection 40) so
    that a mix-up of the two encoders, or of hidden and pooled outputs, fails on shapes."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        tokenizers, encoders = [], []
        for i, (width, pad, act) in enumerate(((spec.text_width, "<|endoftext|>", "quick_gelu"),
                                               (48, "!", "gelu"))):
            vocab_size = write_tokenizer(tmp / f"_tokenizer{i}", pad_token=pad)
            tokenizer = CLIPTokenizer.from_pretrained(tmp / f"_tokenizer{i}")
            torch.manual_seed(spec.seed + i)
            config = CLIPTextConfig(
                vocab_size=vocab_size, hidden_size=width, intermediate_size=37, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=CLIP_CONTEXT, projection_dim=40, hidden_act=act,
                layer_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
            tokenizers.append(tokenizer)
            encoders.append((CLIPTextModel if i == 0 else CLIPTextModelWithProjection)(config))
        torch.manual_seed(spec.seed)
        c = spec.unet_channels
        time_dim = 8
        unet = UNet2DConditionModel(
            sample_size=spec.sample_size, in_channels=9 if spec.kind == "sdxl-inpaint" else 4, out_channels=4,
            block_out_channels=c, layers_per_block=1, norm_num_groups=min(32, c[0]),
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(c) - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (len(c) - 1) + ("UpBlock2D",),
            transformer_layers_per_block=tuple(range(1, len(c) + 1)),  # SDXL: 1, 2, 10
            cross_attention_dim=spec.text_width + 48, attention_head_dim=tuple(2 * (i + 1) for i in range(len(c))),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + 40,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=VAE_BLOCKS, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=spec.sample_size * scale_factor(VAE_BLOCKS),
            scaling_factor=SDXL.scaling_factor,
            force_upcast=True,
        )
        scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
        cls = StableDiffusionXLInpaintPipeline if spec.kind == "sdxl-inpaint" else StableDiffusionXLPipeline
        extra = {"requires_aesthetics_score": False} if spec.kind == "sdxl-inpaint" else {}
        pipe = cls(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizers[0],
                   tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
                   **extra)
        _save(pipe, tmp, out, spec, SDXL_SCHEDULER_CONFIG)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
