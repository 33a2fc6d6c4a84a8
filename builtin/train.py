"""Train the built-in model on a CPU: `python -m edgediff.builtin.train --out DIR`.

Stable Diffusion's three parts, with diffusers' and transformers' own classes, small enough to train on
two cores within an hour and to draw a 64x64 picture in well under a second:

1. the VAE (AutoencoderKL, 4 latent channels, 8x downsampling) learns to reconstruct the scenes of
   builtin/scenes.py (L1 + L2 reconstruction, a small KL term as in SD's first stage);
2. the dataset is encoded once into latent means and log-variances; the scaling factor is set so the
   latents have unit variance (how SD's 0.18215 was chosen);
3. the text encoder (CLIP, from scratch) and the UNet learn together to predict the noise (DDPM's
   epsilon objective, Ho et al. 2020) under SD's scaled-linear schedule, with 10% empty captions so
   that classifier-free guidance works (Ho & Salimans 2022), and an exponential moving average of the
   weights, which is what gets saved.

Everything is seeded: data, initial weights, noise. The losses are printed and saved beside the
weights (training_log.json), with the recipe, in the model card.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..engine.metrics import psnr
from ..engine.model_folder import scale_factor
from ..engine.tokenizer import CLIP_CONTEXT
from .random_model import SD1_SCHEDULER_CONFIG
from .scenes import COLOURS, SHAPES, render, scenes
from .vocab import write_tokenizer


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    image_size: int = 64  # 8x8 latents
    train_scenes: int = 30_000  # drawn from `seed`; the evaluation captions come from another seed
    # 4 blocks = 3 downsamplings = 8x, as in SD. Full width from the first block and 8 GroupNorm groups:
    # measured here, (16, 32, 64, 64) with 16 groups was still at 12 dB after 800 steps; this is at 19 dB
    # after 400.
    vae_channels: tuple[int, ...] = (32, 32, 32, 32)
    vae_groups: int = 8
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6  # SD's first stage keeps the KL term tiny: the latents stay detailed
    unet_channels: tuple[int, ...] = (64, 128)
    text_width: int = 64
    unet_steps: int = 9000  # 6000 gave 41/50 captions (positions were the weak part)
    unet_batch: int = 64
    unet_lr: float = 5e-4
    warmup: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1  # empty captions teach the unconditional prediction CFG needs
    threads: int = 2


def train(out: Path, recipe: Recipe, log=print) -> dict:
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    started = time.perf_counter()
    history: dict[str, list] = {"vae": [], "unet": []}
    tmp = Path(tempfile.mkdtemp(prefix=".builtin-train-"))
    try:
        write_tokenizer(tmp / "tok")
        tokenizer = CLIPTokenizer.from_pretrained(tmp / "tok")

        log(f"drawing {recipe.train_scenes} scenes (seed {recipe.seed})")
        data = scenes(recipe.seed, recipe.train_scenes)
        pixels = torch.from_numpy(np.stack([np.asarray(render(s, recipe.image_size)) for s in data]))
        pixels = pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (N, 3, 64, 64) in [-1, 1]
        ids = tokenizer([s.caption() for s in data], padding="max_length", max_length=CLIP_CONTEXT, truncation=True,
                        return_tensors="pt").input_ids
        empty = tokenizer([""], padding="max_length", max_length=CLIP_CONTEXT, return_tensors="pt").input_ids

        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=recipe.vae_groups,
            block_out_channels=recipe.vae_channels, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=recipe.image_size)
        _train_vae(vae, pixels, recipe, history["vae"], log)

        with torch.no_grad():
            moments = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.parameters
                                 for i in range(0, len(pixels), 256)])
        mean, logvar = moments.chunk(2, dim=1)
        scaling = float(1.0 / mean.std())
        vae.register_to_config(scaling_factor=scaling)
        log(f"latent std {1 / scaling:.3f}: scaling factor {scaling:.4f}")

        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=recipe.text_width, intermediate_size=2 * recipe.text_width,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=CLIP_CONTEXT, hidden_act="quick_gelu",
            projection_dim=recipe.text_width, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        c = recipe.unet_channels
        unet = UNet2DConditionModel(
            sample_size=recipe.image_size // scale_factor(recipe.vae_channels), in_channels=4, out_channels=4,
            block_out_channels=c, layers_per_block=1, norm_num_groups=32, cross_attention_dim=recipe.text_width,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * (len(c) - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(c) - 1))
        _train_unet(unet, text_encoder, mean, logvar, scaling, ids, empty, recipe, history["unet"], log)

        scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                prediction_type="epsilon", num_train_timesteps=1000)
        pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                       unet=unet.eval(), scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        staged = tmp / "model"
        pipe.save_pretrained(staged, safe_serialization=True)
        # The scheduler config as SD 1.5 ships it (no timestep_spacing: each scheduler keeps its own
        # default), naming Euler as the default (49/50 captions; DPM++ 2M 46/50). A DPMSolver config as
        # diffusers saves it would hand
        # DDIM its defaults clip_sample=True (clipping unit-variance latents to [-1, 1]: measured 0/50
        # captions) and PNDM its Runge-Kutta warm-up with mismatched spacing (4/50).
        config = dict(SD1_SCHEDULER_CONFIG, _class_name="EulerDiscreteScheduler", prediction_type="epsilon")
        (staged / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))
        minutes = (time.perf_counter() - started) / 60
        summary = {"recipe": dataclasses.asdict(recipe), "minutes": round(minutes, 1),
                   "scaling_factor": scaling, "final_vae_loss": history["vae"][-1][1],
                   "final_unet_loss": history["unet"][-1][1], "losses": history}
        (staged / "training_log.json").write_text(json.dumps(summary, indent=1))
        (staged / "README.md").write_text(model_card(recipe, summary))
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staged, out)
        log(f"trained in {minutes:.1f} min; wrote {out}")
        return summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_card(recipe: Recipe, summary: dict) -> str:
    changed = {k: v for k, v in dataclasses.asdict(recipe).items() if v != getattr(Recipe(), k)}
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in changed.items())
    vae_last, unet_last = summary["losses"]["vae"][-1], summary["losses"]["unet"][-1]
    return f"""# edgediff built-in model

A small Stable Diffusion (CLIP text encoder, AutoencoderKL with 4 latent channels and 8x downsampling,
UNet2DConditionModel with cross-attention), trained from scratch on captioned shapes drawn by code.
It makes 64x64 pictures of one shape in a named colour, size and position on a coloured background.

## How it was made

    python -m edgediff.builtin.train --out builtin/model {flags}

- Data: `edgediff.builtin.scenes.scenes({recipe.seed}, {recipe.train_scenes})`: {recipe.train_scenes} scenes
  from numpy's PCG64 with seed {recipe.seed}; shapes {", ".join(SHAPES)}; {len(COLOURS)} colours;
  sizes small/medium/large; 10 positions; the background named in 80% of the captions.
- Recipe: `{json.dumps(dataclasses.asdict(recipe))}`
- VAE: {recipe.vae_steps} steps, batch {recipe.vae_batch}; last loss {vae_last[1]}, reconstruction
  {vae_last[2]} dB on the last batch. Latent scaling factor {summary["scaling_factor"]:.4f}.
- Text encoder and UNet, together: {recipe.unet_steps} steps, batch {recipe.unet_batch}, epsilon objective,
  SD's scaled-linear betas, {recipe.caption_dropout:.0%} empty captions, EMA {recipe.ema_decay}; last
  smoothed loss {unet_last[1]}. The saved weights are the moving average.
- Time: {summary["minutes"]} minutes on {recipe.threads} CPU threads (torch {torch.__version__}).
  Losses: training_log.json.
"""


def _train_vae(vae, pixels: torch.Tensor, recipe: Recipe, history: list, log) -> None:
    with torch.no_grad():
        # Start with a narrow posterior (std e^-4): with log-variance 0 the sampling noise would swamp
        # the latents, and the tiny KL weight would take thousands of steps to shrink it.
        vae.quant_conv.bias[vae.config.latent_channels:] = -8.0
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(recipe.seed + 1)
    vae.train()
    for step in range(1, recipe.vae_steps + 1):
        _set_lr(opt, recipe.vae_lr, step, recipe.vae_steps, recipe.warmup)
        x = pixels[torch.randint(0, len(pixels), (recipe.vae_batch,), generator=g)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        y = vae.decode(z).sample
        recon = (y - x).abs().mean() + (y - x).pow(2).mean()
        loss = recon + recipe.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == recipe.vae_steps:
            score = psnr(y.detach(), x, peak=2.0)  # range [-1, 1]: peak-to-peak 2
            history.append((step, round(loss.item(), 5), round(score, 2)))
            log(f"vae  step {step:5d}/{recipe.vae_steps}  loss {loss.item():.4f}  reconstruction {score:.1f} dB")
    vae.eval()


def _train_unet(unet, text_encoder, mean, logvar, scaling, ids, empty, recipe: Recipe, history: list, log) -> None:
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(recipe.seed + 2)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled linear
    alphas_cumprod = torch.cumprod(1 - betas, 0).float()
    std = torch.exp(0.5 * logvar)
    unet.train()
    text_encoder.train()
    running = None
    for step in range(1, recipe.unet_steps + 1):
        _set_lr(opt, recipe.unet_lr, step, recipe.unet_steps, recipe.warmup)
        idx = torch.randint(0, len(mean), (recipe.unet_batch,), generator=g)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scaling
        tokens = ids[idx].clone()
        drop = torch.rand(len(idx), generator=g) < recipe.caption_dropout
        tokens[drop] = empty
        t = torch.randint(0, 1000, (len(idx),), generator=g)
        noise = torch.randn(z.shape, generator=g)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        context = text_encoder(tokens).last_hidden_state
        loss = (unet(noisy, t, context).sample - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(recipe.ema_decay, (1 + step) / (10 + step))  # short warm-up of the average
            for e, p in zip(ema, params):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == recipe.unet_steps:
            history.append((step, round(running, 5)))
            log(f"unet step {step:5d}/{recipe.unet_steps}  loss {running:.4f}")
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)


def _set_lr(opt, peak: float, step: int, total: int, warmup: int) -> None:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step <= warmup:
        lr = peak * step / warmup
    else:
        progress = (step - warmup) / max(1, total - warmup)
        lr = peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    for group in opt.param_groups:
        group["lr"] = lr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgediff.builtin.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="the diffusers-format folder to write")
    defaults = Recipe()
    for f in dataclasses.fields(Recipe):
        if f.type in ("int", "float"):
            p.add_argument(f"--{f.name.replace('_', '-')}", type=int if f.type == "int" else float,
                           default=getattr(defaults, f.name))
    args = p.parse_args(argv)
    recipe = dataclasses.replace(defaults, **{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)
                                              if f.type in ("int", "float")})
    train(args.out, recipe, log=lambda msg: print(msg, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
