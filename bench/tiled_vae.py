"""Tiled VAE decode on the full-size SD 1.5 VAE: quality against the whole decode, and peak memory.

    python -m edgediff.bench.tiled_vae [--size 512] [--tile 192]

Exports only the VAE decoder parts of bench/sd15.py's model (the whole decoder, and the head and tail
of the split one; a minute or two), then decodes one latent three ways, each in a process of its own so
that peaks are apart: whole, in blended tiles of the whole decoder (what the runtime does for folders
without the split decoder), and with engine/tiling.shared_stats_decode. Prints PSNR against the whole
decode and each process's peak resident memory. The latent is a smooth random field (random weights
give no meaningful picture; white-noise latents would exaggerate every tile edge).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ..engine.metrics import psnr

PARTS = ("vae_decoder", "vae_decoder_head", "vae_decoder_tail")


def exported_vae() -> Path:
    from ..export.onnx_export import export_onnx
    from .sd15 import build_sd15, default_folder

    out = default_folder().parent / "sd15-vae-decoder-parts"
    if not (out / "edgediff.json").is_file():
        export_onnx(build_sd15(), out, only=PARTS)
    return out


def latent(size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    coarse = rng.standard_normal((1, 4, size // 64, size // 64)).astype(np.float32)
    z = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)  # smooth: blocks, then a box blur
    for axis in (2, 3):
        z = sum(np.roll(z, k, axis=axis) for k in range(-3, 4)) / 7
    return z + 0.1 * rng.standard_normal(z.shape).astype(np.float32)


def _decode(folder: str, how: str, size: int, tile: int, out: str) -> None:
    """One decode in this process (the child side)."""
    from ..backends.cpu import CpuBackend
    from ..engine.components import HIDDEN_SCALE, VAE_DECODER, VAE_DECODER_HEAD, VAE_DECODER_TAIL
    from ..engine.tiling import shared_stats_decode, tiled

    folder = Path(folder)
    z = latent(size)
    backend, device = CpuBackend(), CpuBackend().probe()
    if how == "split":
        extra = json.loads((folder / "edgediff.json").read_text())["components"]["vae_decoder_tail"]["extra"]
        head = backend.open(folder / VAE_DECODER_HEAD.onnx_path, VAE_DECODER_HEAD, device)
        tail = backend.open(folder / VAE_DECODER_TAIL.onnx_path, VAE_DECODER_TAIL, device)

        def run_tail(h, s, m, x):
            o = tail.run(hidden=h, norm_stats=s, stats_mask=m, stats_mix=x)
            return o["sample"], o["tile_stats"]
        per_hidden = 8 // HIDDEN_SCALE
        image = shared_stats_decode(lambda t: head.run(latent_sample=t)["hidden"], run_tail, z, tile // per_hidden,
                                    extra["margin"], extra["norms"], extra["groups"])
    else:
        vae = backend.open(folder / VAE_DECODER.onnx_path, VAE_DECODER, device)
        run = lambda t: vae.run(latent_sample=t)["sample"]  # noqa: E731
        image = run(z) if how == "whole" else tiled(run, z, tile // 8, 8, 8)
    np.save(out, image)


def main(argv: list[str] | None = None) -> None:
    from .measure import run_measured

    p = argparse.ArgumentParser(prog="python -m edgediff.bench.tiled_vae", description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--tile", type=int, default=192, help="tile core in pixels (default: the planner's)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    folder = exported_vae()
    if args.child:
        return _decode(str(folder), args.child[0], args.size, args.tile, args.child[1])
    results = {}
    print(f"SD 1.5 VAE (random weights), {args.size}x{args.size}, fp32, CPU; tiles of {args.tile} px")
    for how in ("whole", "blended", "split"):
        out = folder / f"{how}-{args.size}.npy"
        run = run_measured([sys.executable, "-m", "edgediff.bench.tiled_vae", "--size", str(args.size),
                            "--tile", str(args.tile), "--child", how, str(out)])
        if run.returncode:
            sys.exit(run.output)
        results[how] = np.load(out)
        # on the [-1, 1] image scale, as the pipeline clips it: a peak-to-peak of 2
        score = psnr(np.clip(results[how], -1, 1), np.clip(results["whole"], -1, 1), peak=2.0)
        vs = "" if how == "whole" else f"{score:6.1f} dB vs whole"
        print(f"  {how:8s} {run.seconds:6.1f} s  peak {run.peak_gib:5.2f} GB  {vs}")


if __name__ == "__main__":
    main()
