"""Export a diffusers-format Stable Diffusion folder to Core ML: one `.mlpackage` per component.

    out/
      model_index.json                       the source's, unchanged
      edgediff.json                          what was exported, how, and each component's check
      text_encoder/model.mlpackage + config.json
      unet/model.mlpackage + config.json
      vae_encoder/model.mlpackage + config.json   (the VAE's config)
      vae_decoder/model.mlpackage + config.json
      tokenizer/  scheduler/scheduler_config.json

The layout and the tensor names are those of the ONNX export (engine/components.py). Core ML wants
static shapes to place a model on the Neural Engine, so every package takes the shapes of one width,
height and batch (`coreml_shapes`). Format mlprogram, fp16 compute (but the UNet's timestep sinusoids,
`_Fp16Selector`), fp32 inputs and outputs (int32 token ids), for macOS 13 / iOS 16 and later.

The data flow, per component: load -> install the attention variant -> torch.export -> run the exported
program and check it against diffusers' module with standard attention -> convert -> save. Conversion
goes through torch.export, not torch.jit.trace: coremltools 9 fails on the trace of diffusers' UNet
(inside its int cast) and converts the exported program.

What is not checked here: running the packages. Core ML runs only on macOS; off it, coremltools
converts and saves but cannot predict, so the check stops at the torch program that was converted.

Everything is written to a temporary folder beside `out` and renamed into place at the end, so a failed
export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..backends.coreml.session import COMPUTE_UNITS
from ..engine.components import TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER, ComponentSpec
from ..engine.errors import EdgediffError
from ..engine.files import atomic_folder, check_out
from ..engine.metrics import relative_error, tensor_psnr
from ..engine.model_folder import scale_factor
from ..engine.tokenizer import CLIP_CONTEXT
from . import weight_map
from .onnx_export import (MANIFEST, VARIANT_MAX_RELATIVE_ERROR, ComponentReport, _check_source, _quiet,
                          manifest_header, source_family)

log = logging.getLogger("edgediff")

# export/attention.py's variants that make sense on Core ML: "sliced" exists for memory-bound ONNX
# providers; Apple's answer to the same problem is split-einsum's per-head ops.
ATTENTIONS = ("standard", "split-einsum")
COMPONENTS = (TEXT_ENCODER.name, UNET.name, VAE_ENCODER.name, VAE_DECODER.name)
DEPLOYMENT_TARGET = "macOS13"  # = iOS 16 (Core ML 6): the minimum of Apple's ml-stable-diffusion
# Keys of the packages' user-defined metadata. Core ML picks compute units when a model is loaded, not
# when it is converted, so the package records the units it was made for and a loader reads them here.
META = "com.edgediff."


def coreml_shapes(width: int, height: int, batch: int, in_channels: int = 4, hidden: int = 768,
                  vae_scale: int = 8, latent_channels: int = 4) -> dict[str, dict[str, tuple[int, ...]]]:
    """Static input shapes of each package, as edgediff's pipeline calls the components: the text encoder
    and the UNet take the unconditional and conditional halves together (2B); the VAE takes one image
    at a time (the pipeline decodes image by image, the decoder's activations being a run's largest,
    and encodes its one init image)."""
    h, w = height // vae_scale, width // vae_scale
    return {
        TEXT_ENCODER.name: {"input_ids": (2 * batch, CLIP_CONTEXT)},
        UNET.name: {"sample": (2 * batch, in_channels, h, w), "timestep": (2 * batch,),
                    "encoder_hidden_states": (2 * batch, CLIP_CONTEXT, hidden)},
        VAE_ENCODER.name: {"sample": (1, 3, height, width)},
        VAE_DECODER.name: {"latent_sample": (1, latent_channels, h, w)},
    }


def export_coreml(src: str | Path, out: str | Path, width: int, height: int, batch: int = 1,
                  attention: str = "standard", compute_units: str = "ALL", force: bool = False,
                  components: tuple[str, ...] = COMPONENTS, name: str | None = None,
                  source: dict | None = None, loras: tuple = ()) -> list[ComponentReport]:
    """Export the diffusers folder `src` to Core ML packages in `out` for `width` x `height` images made
    `batch` at a time; returns the per-component reports (also in out/edgediff.json). `components`
    selects a subset, as Apple's torch2coreml does with its --convert-* flags (each one takes minutes).
    `name` and `source` are export_onnx's: the model's name and where the folder came from. `loras`,
    ((path, weight), ...), are baked into the weights: a package cannot change its weights when loaded."""
    import torch

    try:
        with _quiet_coremltools():
            import coremltools  # noqa: F401
    except ImportError:
        raise EdgediffError("the Core ML export needs coremltools: pip install 'edgediff[export]'") from None
    src, out = Path(src), Path(out)
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        raise EdgediffError(f"unknown Core ML components {', '.join(unknown) or '(none given)'}; "
                            f"choose from {', '.join(COMPONENTS)}")
    if attention not in ATTENTIONS:
        raise EdgediffError(f"attention {attention!r} is not available for Core ML; "
                            f"supported: {', '.join(ATTENTIONS)}")
    if compute_units not in COMPUTE_UNITS:
        raise EdgediffError(f"unknown compute units {compute_units!r}; use one of {', '.join(COMPUTE_UNITS)}")
    if batch < 1:
        raise EdgediffError(f"batch must be at least 1 (got {batch})")
    _check_source(src)
    family = source_family(src)
    # The packages' static shapes (coreml_shapes) are those of one text encoder and the plain UNet; SDXL's
    # second encoder and added conditioning are not converted yet.
    if len(family.text_encoders) != 1 or family.unet.inputs != UNET.inputs:
        raise EdgediffError(f"{src} is a {family.title} model, and the Core ML export converts SD 1.x and 2.x "
                            "models only so far; export it with --format onnx (the coreml backend runs that)")
    # matched against the source's weights now: a LoRA that does not fit is refused before any conversion
    baked = weight_map.bake_plan(src, family, json.loads((src / "unet" / "config.json").read_text()),
                                 loras) if loras else {}
    check_out(out, force, folder=True)
    with atomic_folder(out) as tmp:
        with torch.no_grad(), _quiet(), _quiet_coremltools():
            reports, shapes = _export_all(src, tmp, width, height, batch, attention, compute_units,
                                          components, baked)
        manifest = {
            **manifest_header("edgediff-coreml", 1, src, name, source),
            "width": width, "height": height, "batch": batch,
            "shapes": shapes,
            "dtype": "fp16",  # compute; inputs and outputs are fp32 (input_ids int32)
            "attention": attention,
            "compute_units": compute_units,
            "minimum_deployment_target": DEPLOYMENT_TARGET,
            # LoRAs baked into the weights, as the ONNX manifest names them: name, AUTOMATIC1111's hash, weight
            "loras": [{"name": Path(f).stem, "hash": h, "weight": float(w)} for (f, w), h in
                      zip(loras, weight_map.lora_hashes(loras))],
            "components": {r.name: asdict(r) for r in reports},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return reports


@contextlib.contextmanager
def _quiet_coremltools():
    """coremltools warns at import that it has no native runtime (true off macOS, and we never load a
    model) and that it was tested with an older torch (the parity check below answers that)."""
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _export_all(src: Path, tmp: Path, width: int, height: int, batch: int, attention: str,
                compute_units: str, components: tuple[str, ...],
                baked: dict | None = None) -> tuple[list[ComponentReport], dict]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from . import wrappers

    text = CLIPTextConfig.from_pretrained(src / "text_encoder")
    unet = UNet2DConditionModel.load_config(src / "unet")
    vae = AutoencoderKL.load_config(src / "vae")
    vae_scale = scale_factor(vae["block_out_channels"])
    multiple = vae_scale * scale_factor(unet["block_out_channels"])  # each UNet level halves the side too
    if width <= 0 or height <= 0 or width % multiple or height % multiple:
        raise EdgediffError(f"width and height must be positive multiples of {multiple} for this model "
                            f"(its VAE and UNet downsample that much), not {width}x{height}")
    if text.max_position_embeddings != CLIP_CONTEXT:
        raise EdgediffError(f"the text encoder reads {text.max_position_embeddings} tokens; "
                            f"this export expects CLIP's {CLIP_CONTEXT}")
    shapes = coreml_shapes(width, height, batch, unet["in_channels"], unet["cross_attention_dim"], vae_scale,
                           vae["latent_channels"])

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, text.vocab_size, shapes[TEXT_ENCODER.name]["input_ids"], generator=g)
    ids[:, 0], ids[:, -1] = text.bos_token_id, text.eos_token_id
    u = shapes[UNET.name]
    loaded = {}

    def load(name):  # each model once, and only when a selected component needs it
        if name not in loaded:
            if name == "text_encoder":
                # Eager attention: a plain softmax(QK^T)V, as in the ONNX export; Core ML has no fused
                # attention op before iOS 18, so the converter would spell SDPA out the same way.
                loaded[name] = CLIPTextModel.from_pretrained(src / name, attn_implementation="eager").eval()
            elif name == "unet":
                loaded[name] = UNet2DConditionModel.from_pretrained(src / name).eval()
            else:
                loaded[name] = AutoencoderKL.from_pretrained(src / name).eval()
            # before the parity check and the conversion: both see the weights with the LoRAs in
            weight_map.bake(loaded[name], (baked or {}).get(name), text=name == "text_encoder")
        return loaded[name]

    jobs = [  # spec, wrapper, sample inputs, source folder, has diffusers attention layers
        (TEXT_ENCODER, wrappers.TextEncoder, (ids,), "text_encoder", False),
        (UNET, wrappers.Unet, (torch.randn(u["sample"], generator=g), torch.full(u["timestep"], 981.0),
                               torch.randn(u["encoder_hidden_states"], generator=g)), "unet", True),
        (VAE_ENCODER, wrappers.VaeEncoder,
         (torch.rand(shapes[VAE_ENCODER.name]["sample"], generator=g) * 2 - 1,), "vae", True),
        (VAE_DECODER, wrappers.VaeDecoder,
         (torch.randn(shapes[VAE_DECODER.name]["latent_sample"], generator=g),), "vae", True),
    ]
    reports = []
    for spec, wrapper, args, source, has_attention in jobs:
        if spec.name not in components:
            continue
        folder = tmp / spec.name
        folder.mkdir()
        shutil.copy2(src / source / "config.json", folder / "config.json")
        reports.append(_convert_one(spec, wrapper(load(source)), args, folder / "model.mlpackage",
                                    attention if has_attention else "standard", has_attention, compute_units))
        r = reports[-1]
        log.info("converted %s to Core ML in %.1f s; the converted torch program is %s dB PSNR against "
                 "diffusers", spec.name, r.seconds, "inf" if r.psnr is None else f"{r.psnr:.1f}")
    for part in ("tokenizer", "scheduler"):
        shutil.copytree(src / part, tmp / part)
    shutil.copy2(src / "model_index.json", tmp / "model_index.json")
    return reports, {name: {k: list(v) for k, v in shape.items()}
                     for name, shape in shapes.items() if name in components}


def _convert_one(spec: ComponentSpec, module, args: tuple, path: Path, variant: str, has_attention: bool,
                 compute_units: str) -> ComponentReport:
    import coremltools as ct
    import torch

    from . import attention

    start = time.perf_counter()
    if has_attention:
        attention.install(module.m, "standard")
    reference = module(*args)  # diffusers' standard attention: what every variant must compute
    if variant != "standard":
        attention.install(module.m, variant)
    # torch.export gives the TRAINING dialect; coremltools converts ATEN, which run_decompositions
    # produces, decomposing only what its table names (coremltools' advice is an empty table).
    program = torch.export.export(module, args).run_decompositions(_decompositions())
    got = program.module()(*args)
    err = relative_error(got, reference)
    if not err <= VARIANT_MAX_RELATIVE_ERROR:
        raise EdgediffError(f"the exported torch program of the {spec.name} ({variant} attention) differs "
                            f"from diffusers' by {err:.1e} (relative); nothing was written")
    scores = [tensor_psnr(a.numpy(), b.numpy()) for a, b in zip(_tuple(got), _tuple(reference))]

    # fp32 inputs and outputs around fp16 compute: the pipeline's numpy side (scheduler, guidance) stays
    # fp32 as with ONNX, and two casts cost nothing next to a UNet. Core ML has no int64 arrays.
    inputs = [ct.TensorType(name=t.name, shape=a.shape, dtype=np.int32 if t.dtype == "int64" else np.float32)
              for t, a in zip(spec.inputs, args)]
    outputs = [ct.TensorType(name=t.name, dtype=np.float32) for t in spec.outputs]
    try:
        model = ct.convert(program, inputs=inputs, outputs=outputs, convert_to="mlprogram",
                           compute_precision=ct.transform.FP16ComputePrecision(op_selector=_Fp16Selector()),
                           minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET),
                           compute_units=ct.ComputeUnit[compute_units],
                           skip_model_load=True)  # loading needs macOS; nothing here runs the model
    except Exception as e:  # coremltools reports an unsupported op as a bare NotImplementedError
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise EdgediffError(f"coremltools could not convert the {spec.name}: {type(e).__name__}: "
                            f"{first}") from e
    model.short_description = f"Stable Diffusion {spec.name}, exported by edgediff"
    model.user_defined_metadata.update({
        META + "component": spec.name,
        META + "compute_units": compute_units,
        META + "attention": variant,
        META + "compute_precision": "fp16",
    })
    model.save(str(path))
    seconds = time.perf_counter() - start
    description = model.get_spec().description
    worst = [s for s, _ in scores if s is not None]
    return ComponentReport(
        name=spec.name, format="coreml", dtype="fp16", attention=variant,
        inputs=_features(description.input), outputs=_features(description.output),
        parameters=int(sum(p.numel() for p in module.parameters())),
        bytes=sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
        psnr=round(min(worst), 2) if worst else None, max_abs_diff=max(m for _, m in scores),
        seconds=round(seconds, 2),
        extra={"compute_units": compute_units, "minimum_deployment_target": DEPLOYMENT_TARGET,
               "checked": "the converted torch program against diffusers' module (Core ML runs on macOS)"})


def _decompositions() -> dict:
    """Rewrites for the two ATen ops of our components that coremltools 9 has no converter for, into ops
    it has. Passed to run_decompositions, so the program that is checked is the one that is converted."""
    import torch

    aten = torch.ops.aten
    return {
        # CLIP's `position_ids[:, :77]` takes the whole buffer, which torch.export records as an alias
        aten.alias.default: lambda x: x.view(x.shape),
        # transformers' causal mask: torch.where(mask, tensor, min_float)
        aten.where.ScalarOther: lambda cond, x, other: torch.where(cond, x, torch.full_like(x, other)),
    }


class _Fp16Selector:
    """Which ops compute in fp16 (True) or stay fp32: all but the timestep sinusoids. The UNet takes
    sin/cos of t * f for t up to 999; near 1000 fp16 numbers are 0.5 apart, so in fp16 the highest
    frequencies of the embedding would be off by up to half a radian. The ONNX fp16 export keeps the same
    part fp32 (FP16_KEEP_NODES). Kept: every sin and cos and the ops they are computed from (the timestep
    input, its reshapes, the multiply by the frequencies), a handful of scalar-sized ops."""

    def __init__(self):
        self.kept: dict[int, set[int]] = {}  # per block: ids of the ops that stay fp32

    def __call__(self, op) -> bool:
        block = op.enclosing_block
        if id(block) not in self.kept:
            kept, todo = set(), [o for o in block.operations if o.op_type in ("sin", "cos")]
            while todo:
                o = todo.pop()
                if id(o) in kept or o.op_type == "const":
                    continue
                kept.add(id(o))
                for value in o.inputs.values():
                    todo.extend(v.op for v in (value if isinstance(value, (list, tuple)) else (value,))
                                if v.op is not None)
            self.kept[id(block)] = kept
        return id(op) not in self.kept[id(block)]


def _features(features) -> list[dict]:
    """Name, dtype and shape of a package's inputs or outputs, read back from its spec."""
    from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType

    dtype = ArrayFeatureType.ArrayDataType.Name
    return [{"name": f.name, "dtype": dtype(f.type.multiArrayType.dataType).lower(),  # "float32", "int32"
             "shape": list(f.type.multiArrayType.shape)} for f in features]


def _tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)
