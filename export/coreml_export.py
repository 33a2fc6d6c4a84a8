"""Export a diffusers-format Stable Diffusion folder to Core ML: one `.mlpackage` per component.

    out/
      model_index.json                       the source's, unchanged
      edgediff.json                          what was exported, how, and each component's check
      text_encoder/model.mlpackage + config.json
      unet/model.mlpackage + config.json
      vae_encoder/model.mlpackage + config.json   (the VAE's config)
      vae_decoder/model.mlpackage + config.json
      tokenizer/  scheduler/scheduler_config.json

The layout and the tensor names are those of the ONNX export (engine/components.py). Core ML places a
model on the Neural Engine only for shapes it knows in advance, so each package takes an enumerated list
of shapes (`coreml_shapes`): every image size given at export (`--sizes 512x512,768x512`), the UNet and
the text encoder at every batch of up to the export's images per call, and twice that (guidance batched,
one half at a time, or off), and the VAE whole and in the planner's tiles. Core ML before iOS 18 allows
one enumerated input per model, and the UNet has three, so the packages are for macOS 15 / iOS 18.
Format mlprogram, fp16 compute (but the UNet's timestep sinusoids, `_Fp16Selector`), fp32 inputs and
outputs (int32 token ids).

The data flow, per component: load -> run diffusers' module with standard attention on every shape ->
install the attention variant -> torch.export with those axes dynamic -> run the exported program on
every shape and check it against the first run -> convert -> save. Conversion goes through torch.export,
not torch.jit.trace: coremltools 9 fails on the trace of diffusers' UNet (inside its int cast) and
converts the exported program.

What is not checked here: running the packages. Core ML runs only on macOS; off it, coremltools
converts and saves but cannot predict, so the check stops at the torch program that was converted.

Everything is written to a temporary folder beside `out` and renamed into place at the end, so a failed
export leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..backends.coreml.session import COMPUTE_UNITS
from ..engine.components import TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER, ComponentSpec
from ..engine.errors import EdgediffError, quiet
from ..engine.files import atomic_folder, check_out
from ..engine.metrics import relative_error, tensor_psnr
from ..engine.model_folder import scale_factor
from ..engine.plan import TILE
from ..engine.tokenizer import CLIP_CONTEXT
from . import weight_map
from .onnx_export import (MANIFEST, VARIANT_MAX_RELATIVE_ERROR, ComponentReport, _check_source, _quiet,
                          manifest_header, source_family)

log = logging.getLogger("edgediff")

# export/attention.py's variants that make sense on Core ML: "sliced" exists for memory-bound ONNX
# providers; Apple's answer to the same problem is split-einsum's per-head ops.
ATTENTIONS = ("standard", "split-einsum")
COMPONENTS = (TEXT_ENCODER.name, UNET.name, VAE_ENCODER.name, VAE_DECODER.name)
# = iOS 18 (Core ML 8): the first to take several enumerated inputs in one model (the UNet has three)
DEPLOYMENT_TARGET = "macOS15"
# Keys of the packages' user-defined metadata. Core ML picks compute units when a model is loaded, not
# when it is converted, so the package records the units it was made for and a loader reads them here.
META = "com.edgediff."


def coreml_shapes(sizes, batch: int, in_channels: int = 4, hidden: int = 768, vae_scale: int = 8,
                  latent_channels: int = 4, tile: int = TILE) -> dict[str, dict[str, list[tuple[int, ...]]]]:
    """The shapes each package takes, as {component: {input: [shape of configuration k, ...]}}: the k-th
    shapes of a component's inputs are one call the pipeline makes. `sizes` are (width, height) pairs.

    - text encoder: b or 2b rows for b from 1 to `batch` (the prompts, one per image at most, and with
      guidance their negatives);
    - UNet: every size at b or 2b rows for b from 1 to `batch` images (guidance batched: 2b; one half
      at a time, or off: b);
    - VAE: one image at a time (the pipeline decodes image by image), whole and in the tiles of the
      plan's tiled rungs (`tile` pixels, engine/plan.TILE; the last tile ends at the border, so every
      tile has one shape)."""
    rows = sorted({k * b for b in range(1, batch + 1) for k in (1, 2)})
    t = tile // vae_scale
    unet = [(b, w // vae_scale, h // vae_scale) for w, h in sizes for b in rows]
    decoder = _unique([(h // vae_scale, w // vae_scale) for w, h in sizes]
                      + [(min(h // vae_scale, t), min(w // vae_scale, t)) for w, h in sizes])
    encoder = _unique([(h, w) for w, h in sizes] + [(min(h, tile), min(w, tile)) for w, h in sizes])
    return {
        TEXT_ENCODER.name: {"input_ids": [(b, CLIP_CONTEXT) for b in rows]},
        UNET.name: {"sample": [(b, in_channels, h, w) for b, w, h in unet], "timestep": [(b,) for b, _, _ in unet],
                    "encoder_hidden_states": [(b, CLIP_CONTEXT, hidden) for b, _, _ in unet]},
        VAE_ENCODER.name: {"sample": [(1, 3, h, w) for h, w in encoder]},
        VAE_DECODER.name: {"latent_sample": [(1, latent_channels, h, w) for h, w in decoder]},
    }


def _unique(items: list) -> list:
    return list(dict.fromkeys(items))


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'512x512,768x512' -> [(512, 512), (768, 512)] as (width, height)."""
    sizes = []
    for part in str(text).split(","):
        w, x, h = part.strip().lower().partition("x")
        if not (x and w.isdigit() and h.isdigit()):
            raise EdgediffError(f"--sizes {text!r}: {part.strip()!r} is not WIDTHxHEIGHT; write it like "
                                "512x512,768x512")
        sizes.append((int(w), int(h)))
    return sizes


def export_coreml(src: str | Path, out: str | Path, sizes=((512, 512),), batch: int = 1,
                  attention: str = "standard", compute_units: str = "ALL", force: bool = False,
                  components: tuple[str, ...] = COMPONENTS, name: str | None = None,
                  source: dict | None = None, loras: tuple = ()) -> list[ComponentReport]:
    """Export the diffusers folder `src` to Core ML packages in `out` for images of `sizes`, (width,
    height) pairs, made up to `batch` at a time; returns the per-component reports (also in
    out/edgediff.json). `components` selects a subset, as Apple's torch2coreml does with its --convert-*
    flags (each one takes minutes). `name` and `source` are export_onnx's: the model's name and where
    the folder came from. `loras`, ((path, weight), ...), are baked into the weights: a package cannot
    change its weights when loaded."""
    import torch

    try:
        # coremltools warns at import that it has no native runtime (true off macOS, and we never load a
        # model) and that it was tested with an older torch (the parity check below answers that).
        with quiet("coremltools"):
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
    if not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
        raise EdgediffError(f"batch must be a whole number from 1 to {MAX_BATCH} (got {batch}): every batch up "
                            "to twice it becomes a shape of the UNet package")
    sizes = _unique([(int(w), int(h)) for w, h in sizes])
    if not 1 <= len(sizes) <= MAX_SIZES:
        raise EdgediffError(f"give 1 to {MAX_SIZES} sizes, like --sizes 512x512,768x512 (got {len(sizes)})")
    _check_source(src)
    family = source_family(src)
    # The packages' shapes (coreml_shapes) are those of one text encoder and the plain UNet; SDXL's
    # second encoder and added conditioning are not converted yet.
    if len(family.text_encoders) != 1 or family.unet.inputs != UNET.inputs:
        raise EdgediffError(f"{src} is a {family.title} model, and the Core ML export converts SD 1.x and 2.x "
                            "models only so far; export it with --format onnx (the coreml backend runs that)")
    # matched against the source's weights now: a LoRA that does not fit is refused before any conversion
    baked = weight_map.bake_plan(src, family, json.loads((src / "unet" / "config.json").read_text()),
                                 loras) if loras else {}
    check_out(out, force, folder=True)
    with atomic_folder(out) as tmp:
        with torch.no_grad(), _quiet(), quiet("coremltools"):
            reports, shapes = _export_all(src, tmp, sizes, batch, attention, compute_units, components, baked)
        manifest = {
            **manifest_header("edgediff-coreml", 2, src, name, source),
            "sizes": [list(size) for size in sizes], "batch": batch,
            "shapes": shapes,  # {component: {input: [shape, ...]}}: the k-th shapes of the inputs go together
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


# Each size and batch is a shape Core ML specialises the model for when it loads it: a handful is what
# Apple's own flexible-shape models carry; dozens would make the load slow for shapes never used.
MAX_SIZES = 8
MAX_BATCH = 4


def _export_all(src: Path, tmp: Path, sizes: list, batch: int, attention: str, compute_units: str,
                components: tuple[str, ...], baked: dict | None = None) -> tuple[list[ComponentReport], dict]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from . import wrappers

    text = CLIPTextConfig.from_pretrained(src / "text_encoder")
    unet = UNet2DConditionModel.load_config(src / "unet")
    vae = AutoencoderKL.load_config(src / "vae")
    vae_scale = scale_factor(vae["block_out_channels"])
    multiple = vae_scale * scale_factor(unet["block_out_channels"])  # each UNet level halves the side too
    for width, height in sizes:
        if width <= 0 or height <= 0 or width % multiple or height % multiple:
            raise EdgediffError(f"width and height must be positive multiples of {multiple} for this model "
                                f"(its VAE and UNet downsample that much), not {width}x{height}")
    if text.max_position_embeddings != CLIP_CONTEXT:
        raise EdgediffError(f"the text encoder reads {text.max_position_embeddings} tokens; "
                            f"this export expects CLIP's {CLIP_CONTEXT}")
    shapes = coreml_shapes(sizes, batch, unet["in_channels"], unet["cross_attention_dim"], vae_scale,
                           vae["latent_channels"])
    g = torch.Generator().manual_seed(0)

    def text_inputs(s):
        ids = torch.randint(0, text.vocab_size, s["input_ids"], generator=g)
        ids[:, 0], ids[:, -1] = text.bos_token_id, text.eos_token_id
        return (ids,)

    def unet_inputs(s):
        return (torch.randn(s["sample"], generator=g), torch.full(s["timestep"], 981.0),
                torch.randn(s["encoder_hidden_states"], generator=g))

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

    jobs = [  # spec, wrapper, sample inputs of one configuration, source folder, has diffusers attention
        (TEXT_ENCODER, wrappers.TextEncoder, text_inputs, "text_encoder", False),
        (UNET, wrappers.Unet, unet_inputs, "unet", True),
        (VAE_ENCODER, wrappers.VaeEncoder, lambda s: (torch.rand(s["sample"], generator=g) * 2 - 1,), "vae", True),
        (VAE_DECODER, wrappers.VaeDecoder, lambda s: (torch.randn(s["latent_sample"], generator=g),), "vae", True),
    ]
    reports = []
    for spec, wrapper, inputs, source, has_attention in jobs:
        if spec.name not in components:
            continue
        folder = tmp / spec.name
        folder.mkdir()
        shutil.copy2(src / source / "config.json", folder / "config.json")
        configs = [inputs(dict(zip(shapes[spec.name], k))) for k in zip(*shapes[spec.name].values())]
        reports.append(_convert_one(spec, wrapper(load(source)), configs, folder / "model.mlpackage",
                                    attention if has_attention else "standard", has_attention, compute_units))
        r = reports[-1]
        log.info("converted %s to Core ML in %.1f s; the converted torch program is %s dB PSNR against "
                 "diffusers on %d shapes", spec.name, r.seconds, "inf" if r.psnr is None else f"{r.psnr:.1f}",
                 len(configs))
    for part in ("tokenizer", "scheduler"):
        shutil.copytree(src / part, tmp / part)
    shutil.copy2(src / "model_index.json", tmp / "model_index.json")
    return reports, {name: {k: [list(s) for s in v] for k, v in shape.items()}
                     for name, shape in shapes.items() if name in components}


def _dynamic_shapes(spec: ComponentSpec, configs: list[tuple]) -> tuple[int, dict | None]:
    """torch.export's dynamic_shapes for these configurations, and the one to export with (the largest:
    torch.export specialises an axis whose example is 1). An axis that takes several values becomes a
    Dim, shared by every axis that takes the same values in every configuration (the batch of the
    UNet's three inputs), in steps of the values' common divisor (a latent side of 8k)."""
    import math

    import torch

    example = max(range(len(configs)), key=lambda k: sum(math.prod(a.shape) for a in configs[k]))
    dims: dict[tuple, object] = {}
    dynamic: dict[str, dict] = {}
    for i, t in enumerate(spec.inputs):
        for axis in range(configs[0][i].dim()):
            values = tuple(int(c[i].shape[axis]) for c in configs)
            if len(set(values)) == 1:
                continue
            if values not in dims:
                step = math.gcd(*values)
                dim = torch.export.Dim(f"{t.axes[axis]}_{len(dims)}", min=min(values) // step, max=max(values) // step)
                dims[values] = dim * step if step > 1 else dim
            dynamic.setdefault(t.name, {})[axis] = dims[values]
    if not dynamic:
        return example, None
    return example, {t.name: dynamic.get(t.name) for t in spec.inputs}


def _convert_one(spec: ComponentSpec, module, configs: list[tuple], path: Path, variant: str,
                 has_attention: bool, compute_units: str) -> ComponentReport:
    import coremltools as ct
    import torch

    from . import attention

    start = time.perf_counter()
    if has_attention:
        attention.install(module.m, "standard")
    references = [module(*args) for args in configs]  # diffusers' standard attention: what every variant must compute
    if variant != "standard":
        attention.install(module.m, variant)
    example, dynamic = _dynamic_shapes(spec, configs)
    # torch.export gives the TRAINING dialect; coremltools converts ATEN, which run_decompositions
    # produces, decomposing only what its table names (coremltools' advice is an empty table).
    program = torch.export.export(module, configs[example], dynamic_shapes=dynamic).run_decompositions(
        _decompositions())
    scores, worst_err = [], 0.0
    for args, reference in zip(configs, references):
        got = program.module()(*args)
        err = relative_error(got, reference)
        if not err <= VARIANT_MAX_RELATIVE_ERROR:
            raise EdgediffError(f"the exported torch program of the {spec.name} ({variant} attention) differs "
                                f"from diffusers' by {err:.1e} (relative) at {[tuple(a.shape) for a in args]}; "
                                "nothing was written")
        worst_err = max(worst_err, err)
        scores += [tensor_psnr(a.numpy(), b.numpy()) for a, b in zip(_tuple(got), _tuple(reference))]

    # fp32 inputs and outputs around fp16 compute: the pipeline's numpy side (scheduler, guidance) stays
    # fp32 as with ONNX, and two casts cost nothing next to a UNet. Core ML has no int64 arrays.
    inputs = []
    for i, t in enumerate(spec.inputs):
        shapes = [tuple(c[i].shape) for c in configs]
        # Core ML pairs the k-th shapes of every enumerated input (iOS 18), so each lists one per configuration
        shape = shapes[0] if len(set(shapes)) == 1 else ct.EnumeratedShapes(shapes=shapes, default=shapes[example])
        inputs.append(ct.TensorType(name=t.name, shape=shape, dtype=np.int32 if t.dtype == "int64" else np.float32))
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
               "shapes_checked": len(configs),
               "checked": "the converted torch program against diffusers' module on every shape (Core ML "
                          "runs on macOS)"})


def _decompositions() -> dict:
    """Rewrites of ATen ops that coremltools 9 cannot convert here into ops it can. Passed to
    run_decompositions, so the program that is checked is the one that is converted."""
    import torch

    aten = torch.ops.aten
    return {
        # CLIP's `position_ids[:, :77]` takes the whole buffer, which torch.export records as an alias
        aten.alias.default: lambda x: x.view(x.shape),
        # transformers' causal mask: torch.where(mask, tensor, min_float)
        aten.where.ScalarOther: lambda cond, x, other: torch.where(cond, x, torch.full_like(x, other)),
        # coremltools' group_norm builds a constant shape from the batch, which fails when the batch is
        # a dynamic axis ("Cannot add const [is1, 32, 1]"); spelled out, the reshapes take symbolic sizes
        aten.group_norm.default: _group_norm,
        # coremltools' einsum asserts on symbolic shapes ("input shapes incompatible"): split-einsum's two
        # per-head products as the matmuls it would have made of them
        aten.einsum.default: _einsum,
    }


def _einsum(equation: str, operands):
    """export/attention.SplitEinsumAttnProcessor's two einsums as batched matmuls over (B, H) (H = 1)."""
    import torch

    a, b = operands
    if equation == "bchq,bchk->bkhq":  # scores (B, K, H, Q) = sum over c of k[b,c,h,k] q[b,c,h,q]
        return torch.matmul(b.permute(0, 2, 3, 1), a.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
    if equation == "bkhq,bchk->bchq":  # out (B, C, H, Q) = sum over k of v[b,c,h,k] w[b,k,h,q]
        return torch.matmul(b.permute(0, 2, 1, 3), a.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
    raise EdgediffError(f"the Core ML export has no conversion for einsum {equation!r}")


def _group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5, cudnn_enabled: bool = True):
    """torch.nn.functional.group_norm in reshapes and means (biased variance, as GroupNorm)."""
    import torch

    y = x.reshape(x.shape[0], num_groups, -1)
    mean = y.mean(-1, keepdim=True)
    centred = y - mean
    y = (centred * torch.rsqrt((centred * centred).mean(-1, keepdim=True) + eps)).view_as(x)
    affine = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(affine)
    if bias is not None:
        y = y + bias.reshape(affine)
    return y


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
    """Name, dtype and shape (the default one; `shapes`: all it takes, where it takes several) of a
    package's inputs or outputs, read back from its spec."""
    from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType

    dtype = ArrayFeatureType.ArrayDataType.Name
    found = []
    for f in features:
        array = f.type.multiArrayType
        found.append({"name": f.name, "dtype": dtype(array.dataType).lower(),  # "float32", "int32"
                      "shape": list(array.shape)})
        if array.WhichOneof("ShapeFlexibility") == "enumeratedShapes":
            found[-1]["shapes"] = [list(s.shape) for s in array.enumeratedShapes.shapes]
    return found


def _tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)
