"""Export a diffusers-format Stable Diffusion folder to ONNX, in Hugging Face optimum's folder layout.

    out/
      model_index.json                 the source's, unchanged
      edgediff_export.json             what was exported, how, and the parity of each component
      text_encoder/model.onnx + config.json
      unet/model.onnx + config.json
      vae_encoder/model.onnx + config.json   (the VAE's config)
      vae_decoder/model.onnx + config.json
      tokenizer/  scheduler/scheduler_config.json

Everything is written to a temporary folder beside `out` and renamed into place at the end, so an
interrupted export never leaves a half-written model that looks whole. Every component is checked
against PyTorch on sample inputs before the rename (Apple's torch2coreml does the same with PSNR).

This is the foundation's fp32 export; fp16, attention variants, Core ML and single-file checkpoints
extend it (the export-stage issue).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engine.components import TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER, ComponentSpec
from ..engine.errors import EdgediffError

log = logging.getLogger("edgediff")

OPSET = 17  # LayerNormalization is native from 17; every ONNX Runtime since 1.14 runs it
# fp32 ONNX vs fp32 PyTorch differ only by operation order; worse than this means a broken export.
MAX_RELATIVE_ERROR = 1e-3
SOURCE_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass(frozen=True)
class ComponentReport:
    name: str
    seconds: float
    bytes: int
    max_abs_error: float
    relative_error: float  # ||onnx - torch|| / ||torch|| on the sample inputs


def export_onnx(src: str | Path, out: str | Path, overwrite: bool = False,
                name: str | None = None) -> list[ComponentReport]:
    """Export the diffusers folder `src` to `out`; returns the per-component parity report. `name` is
    the model's name in PNG metadata (default: the source folder's name)."""
    import torch

    src, out = Path(src), Path(out)
    _check_source(src)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise EdgediffError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        with torch.no_grad(), _quiet():
            reports = _export_all(src, tmp)
        manifest = {
            "format": "edgediff-onnx",
            "version": 1,
            "name": name or src.resolve().name,
            "source": str(src.resolve()),
            "dtype": "fp32",
            "attention": "standard",
            "opset": OPSET,
            "components": [r.__dict__ for r in reports],
        }
        (tmp / "edgediff_export.json").write_text(json.dumps(manifest, indent=2))
        os.chmod(tmp, 0o755 & ~_umask())  # mkdtemp makes it private; the model is an ordinary folder
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return reports


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _quiet():
    """Silence the tracer's and the libraries' chatter about their internals during export: users get
    our one line per component instead."""
    import diffusers
    import transformers

    levels = diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers.utils.logging.set_verbosity(levels[0])
        transformers.utils.logging.set_verbosity(levels[1])


def _check_source(src: Path) -> None:
    if not src.exists():
        raise EdgediffError(f"{src} does not exist; give a diffusers model folder")
    if not src.is_dir():
        raise EdgediffError(f"{src} is a file; this export reads diffusers model folders "
                            "(single-file checkpoints come with the export-stage work)")
    missing = [p for p in SOURCE_PARTS if not (src / p).exists()]
    if missing:
        raise EdgediffError(f"{src} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}")


def _export_all(src: Path, tmp: Path) -> list[ComponentReport]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from . import wrappers

    # Eager attention: a plain softmax(QK^T)V graph that ONNX Runtime's optimizer recognises and fuses.
    text_encoder = CLIPTextModel.from_pretrained(src / "text_encoder", attn_implementation="eager").eval()
    unet = UNet2DConditionModel.from_pretrained(src / "unet").eval()
    vae = AutoencoderKL.from_pretrained(src / "vae").eval()

    g = torch.Generator().manual_seed(0)
    seq = text_encoder.config.max_position_embeddings
    ids = torch.randint(0, text_encoder.config.vocab_size, (2, seq), generator=g)
    ids[:, 0] = text_encoder.config.bos_token_id
    ids[:, -1] = text_encoder.config.eos_token_id
    size = unet.config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = torch.randn(2, unet.config.in_channels, size, size, generator=g)
    context = torch.randn(2, seq, unet.config.cross_attention_dim, generator=g)
    image = torch.rand(1, 3, size * vae_scale, size * vae_scale, generator=g) * 2 - 1
    z = torch.randn(1, vae.config.latent_channels, size, size, generator=g)

    jobs = [
        (TEXT_ENCODER, wrappers.TextEncoder(text_encoder), (ids,), text_encoder.config),
        (UNET, wrappers.Unet(unet), (latent, torch.tensor([981.0, 981.0]), context), unet.config),
        (VAE_ENCODER, wrappers.VaeEncoder(vae), (image,), vae.config),
        (VAE_DECODER, wrappers.VaeDecoder(vae), (z,), vae.config),
    ]
    reports = []
    for spec, module, args, config in jobs:
        folder = tmp / spec.name
        folder.mkdir()
        _write_config(folder / "config.json", config)
        reports.append(_export_one(spec, module, args, folder / "model.onnx"))
        log.info("exported %s: %.1f s, relative error %.2e", spec.name, reports[-1].seconds,
                 reports[-1].relative_error)
    shutil.copytree(src / "tokenizer", tmp / "tokenizer")
    shutil.copytree(src / "scheduler", tmp / "scheduler")
    shutil.copy2(src / "model_index.json", tmp / "model_index.json")
    return reports


def _export_one(spec: ComponentSpec, module, args: tuple, path: Path) -> ComponentReport:
    import torch

    start = time.perf_counter()
    dynamic = {t.name: {i: axis for i, axis in enumerate(t.axes) if axis not in _FIXED_AXES}
               for t in spec.inputs + spec.outputs}
    # The TorchScript exporter: the dynamo one (torch 2.9's default) still fails on parts of diffusers'
    # UNet with dynamic spatial sizes, and its graphs are no faster in ONNX Runtime.
    torch.onnx.export(module, args, str(path), input_names=[t.name for t in spec.inputs],
                      output_names=[t.name for t in spec.outputs], dynamic_axes=dynamic,
                      opset_version=OPSET, do_constant_folding=True, dynamo=False)
    seconds = time.perf_counter() - start
    expected = module(*args)
    expected = expected if isinstance(expected, tuple) else (expected,)
    report = _parity(spec, path, args, [e.numpy() for e in expected], seconds)
    if not report.relative_error <= MAX_RELATIVE_ERROR:
        raise EdgediffError(f"the exported {spec.name} differs from PyTorch by {report.relative_error:.2e} "
                            f"(relative; at most {MAX_RELATIVE_ERROR:g} expected); the export is broken")
    return report


_FIXED_AXES = {"channels", "latent_channels", "moments", "rgb", "hidden"}


def _parity(spec: ComponentSpec, path: Path, args: tuple, expected: list[np.ndarray],
            seconds: float) -> ComponentReport:
    from ..backends.base import OrtSession

    session = OrtSession(path, spec, ["CPUExecutionProvider"])
    got = session.run(**{t.name: a.numpy() for t, a in zip(spec.inputs, args)})
    errors, rels = [], []
    for t, want in zip(spec.outputs, expected):
        diff = got[t.name].astype(np.float64) - want
        errors.append(float(np.abs(diff).max()))
        rels.append(float(np.linalg.norm(diff) / max(np.linalg.norm(want), 1e-12)))
    size = sum(f.stat().st_size for f in path.parent.iterdir() if f.name != "config.json")
    return ComponentReport(spec.name, round(seconds, 2), size, max(errors), max(rels))


def _write_config(path: Path, config) -> None:
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    path.write_text(json.dumps(data, indent=2, default=str))
