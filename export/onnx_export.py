"""Export a diffusers-format Stable Diffusion folder to ONNX, in Hugging Face optimum's folder layout.

    out/
      model_index.json                 the source's, unchanged
      edgediff.json                    what was exported, how, and each component's parity with PyTorch
      text_encoder/model.onnx + config.json
      unet/model.onnx (+ model.onnx_data above 2 GB) + config.json
      vae_encoder/model.onnx + config.json   (the VAE's config)
      vae_decoder/model.onnx + config.json
      safety_checker/model.onnx + config.json, feature_extractor/   (when the source has them)
      tokenizer/  scheduler/scheduler_config.json

The data flow, per component: load it alone -> install the attention variant (checked against the
standard one) -> trace to fp32 ONNX -> run PyTorch once on sample inputs, recording activation ranges
-> free PyTorch -> fp16 conversion, keeping the fragile parts fp32 -> run ONNX Runtime on the same
inputs -> gate on PSNR. One component at a time, so the export's peak is about one component twice.

Everything is written to a temporary folder beside `out` and renamed into place at the end, so an
interrupted or failed export never leaves anything that looks like a model.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..engine.clip_vocab import add_vocab_files
from ..engine.components import (FP32_FALLBACK, INT8_GRAPH, SAFETY_CHECKER, UNET, VAE, VAE_DECODER, VAE_DECODER_HEAD,
                                 VAE_DECODER_TAIL, VAE_DECODER_TINY, VAE_ENCODER, ComponentSpec, with_cache_feature)
from ..engine.families import Family, recognise
from ..engine.errors import EdgediffError, first_line
from ..engine.files import atomic_folder, check_out
from ..engine.metrics import relative_error, tensor_psnr
from ..engine.model_folder import scale_factor
from ..engine.tokenizer import CLIP_CONTEXT
from . import memory_profile, probes, weight_map
from .attention import DEFAULT_SLICES, VARIANTS

log = logging.getLogger("edgediff")

OPSET = 17  # LayerNormalization is native from 17; every ONNX Runtime since 1.14 runs it
MANIFEST = "edgediff.json"
# The parity gate, PSNR of ONNX Runtime's output against PyTorch fp32 on the same inputs. fp32 graphs
# differ from PyTorch only by operation order (measured: above 100 dB); fp16 loses about 11 bits.
# int8: the UNet only (export/quantize.py), its output (the noise prediction) against the fp32 graph's
MIN_PSNR = {"fp32": 60.0, "fp16": 35.0, "int8": 20.0}
# Variants must compute what standard attention does; they differ only by summation order.
VARIANT_MAX_RELATIVE_ERROR = 1e-4
EXTERNAL_DATA_BYTES = 2_000_000_000  # protobuf's 2 GB limit: larger graphs keep weights beside them

# fp16: the op types that stay fp32 in every graph; each component's description adds the node-name
# patterns of its own fragile parts (ComponentSpec.fp16_keep).
FP16_KEEP_OPS = (
    "InstanceNormalization",  # GroupNorm's statistics: sums of squares overflow fp16 in SD's VAE
    "Softmax",  # the exponent of attention scores (SD 2.x upcasts them for the same reason)
    "Range", "CumSum",  # index arithmetic, never worth halving
)
# Beyond the fixed list, every node that reads or writes a value reaching this magnitude on the sample
# inputs stays fp32: fp16 ends at 65504, and the margin covers inputs larger than the sample ones. This
# is what turns SD's VAE black in fp16, and it is measured here rather than assumed.
FP16_CALIBRATION_LIMIT = 2048.0


@dataclass(frozen=True)
class ExportOptions:
    # "fp16": half weights and compute, the FP16_KEEP parts fp32; I/O stays fp32. "int8": the UNet
    # quantized for CPUs (export/quantize.py), everything else fp32.
    dtype: str = "fp32"
    # export/attention.py: fused (ONNX Runtime's MultiHeadAttention; measured on the built-in model's UNet
    # at 512x512 on 2 cores: 0.48 s and 0.24 GB a call, against 2.5 s and 3.4 GB with standard),
    # standard, sliced or split-einsum
    attention: str = "fused"
    slices: int = DEFAULT_SLICES  # sliced only: query slices at the UNet's full-resolution level
    safety_checker: bool = True  # export the source's safety checker when it has one
    # LoRAs baked into the weights before export, ((path, weight), ...): what Core ML packages need (they
    # cannot change weights when loaded), and an int8 UNet (its weights are quantized)
    loras: tuple = ()
    # a tiny autoencoder (diffusers' AutoencoderTiny: a hub id such as madebyollin/taesd, or a folder)
    # whose decoder is exported beside the VAE's, as vae_decoder_tiny
    tiny_vae: str | None = None
    # feature caching (engine/components.shallow_unet): None off; "auto" the depth measured at export
    # (_cache_depth), or a depth "1".."3" (SD's last up block has 3 layers; 1 is the cheapest)
    deep_cache: str | None = None

    def __post_init__(self):
        if self.dtype not in MIN_PSNR:
            raise EdgediffError(f"unknown dtype {self.dtype!r}; use fp32, fp16 or int8")
        if self.attention not in VARIANTS:
            raise EdgediffError(f"unknown attention {self.attention!r}; use one of {', '.join(VARIANTS)}")
        if self.slices < 1 or self.slices & (self.slices - 1):
            raise EdgediffError(f"--slices must be a power of two (got {self.slices})")
        object.__setattr__(self, "loras", tuple((str(p), float(w)) for p, w in self.loras))
        if self.deep_cache is not None:
            object.__setattr__(self, "deep_cache", str(self.deep_cache))
            if not (self.deep_cache == "auto" or self.deep_cache in "123" and len(self.deep_cache) == 1):
                raise EdgediffError(f"--deep-cache takes auto or a depth 1, 2 or 3, not {self.deep_cache!r}")

    def key(self) -> str:
        """A short name for cache folders: the options that change the graphs."""
        k = f"{self.dtype}-{self.attention}"
        if self.attention == "sliced":
            k += f"{self.slices}"
        if self.loras:  # the files' contents and weights, not their paths
            from ..engine.adapters import read_lora

            k += "-lora" + "_".join(f"{read_lora(p).hash}x{w:g}" for p, w in self.loras)
        if self.tiny_vae:  # the source as named: a hub id, or a folder's path
            import hashlib

            k += "-tiny" + hashlib.sha256(str(self.tiny_vae).encode()).hexdigest()[:8]
        if self.deep_cache:
            k += f"-deepcache{self.deep_cache}"
        return k + ("" if self.safety_checker else "-nosafety")


@dataclass
class ComponentReport:
    name: str
    format: str
    dtype: str
    attention: str
    inputs: list
    outputs: list
    parameters: int
    bytes: int
    psnr: float | None  # dB against PyTorch fp32; None when identical
    max_abs_diff: float
    seconds: float
    fp32_nodes: int = 0  # fp16 exports: nodes kept fp32 (FP16_KEEP and calibration)
    nodes: int = 0
    # activation memory by size, from the graph (export/memory_profile.py): what the planner reads
    activations: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def export_onnx(src: str | Path, out: str | Path, options: ExportOptions = ExportOptions(), force: bool = False,
                name: str | None = None, source: dict | None = None, profile_memory: bool = True,
                only: tuple[str, ...] | None = None) -> dict:
    """Export the diffusers folder `src` to `out` and return the manifest (also written to
    out/edgediff.json). `name` is the model's name in PNG metadata (default: the source folder's name);
    `source` describes where the folder came from (export/sources.py) for the manifest.
    `profile_memory=False` skips the activation profile the planner reads (a few seconds per model):
    the tests that only check graphs do without it. `only` names the components to export (benchmarks
    of one part); the folder is then not a runnable model."""
    import torch

    src, out = Path(src), Path(out)
    _check_source(src)
    check_out(out, force, folder=True)
    try:
        with atomic_folder(out) as tmp:
            with torch.no_grad(), _quiet():
                family, reports = _export_all(src, tmp, options, profile_memory, only)
            manifest = {
                **manifest_header("edgediff-onnx", 2, src, name, source),
                "family": family.name,
                "dtype": options.dtype,
                "attention": options.attention,
                "slices": options.slices if options.attention == "sliced" else None,
                "opset": OPSET,
                "min_psnr": MIN_PSNR[options.dtype],
                # LoRAs baked into the weights (export --lora): name, AUTOMATIC1111's hash, weight
                "loras": [{"name": Path(f).stem, "hash": h, "weight": w} for (f, w), h in
                          zip(options.loras, weight_map.lora_hashes(options.loras))],
                "tiny_vae": options.tiny_vae,
                "deep_cache": options.deep_cache,
                "components": {r.name: asdict(r) for r in reports},
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise EdgediffError(f"no space left on the disk of {out.parent} while exporting; nothing was "
                                "written: free some space (an SD 1.5 fp32 export takes about 4 GB) and retry") from None
        raise
    return manifest


def manifest_header(fmt: str, version: int, src: Path, name: str | None, source: dict | None) -> dict:
    """What every edgediff.json starts with: the format, and what was exported by which edgediff."""
    from .. import __version__

    return {
        "format": fmt,
        "version": version,
        "edgediff_version": __version__,
        "name": name or src.resolve().name,
        "source": source or {"kind": "diffusers-folder", "path": str(src.resolve()), "sha256": folder_hash(src)},
    }


def folder_hash(folder: Path) -> str:
    """sha256 over a diffusers folder's configs and weights (names and bytes), in a stable order."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()
                       and p.suffix in (".json", ".safetensors", ".bin", ".txt")):
        h.update(path.relative_to(folder).as_posix().encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()



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
    if not src.is_dir():
        raise EdgediffError(f"{src} is not a diffusers model folder")
    parts = ("model_index.json", "unet", "vae", "scheduler")
    missing = [p for p in parts if not (src / p).exists()]
    if not missing:
        family = source_family(src)
        parts = (*family.tokenizers, *(t.spec.name for t in family.text_encoders))
        missing = [p for p in parts if not (src / p).exists()]
    if missing:
        raise EdgediffError(f"{src} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}")


def _export_all(src: Path, tmp: Path, options: ExportOptions, profile_memory: bool,
                only: tuple[str, ...] | None = None) -> tuple[Family, list[ComponentReport]]:
    """Every component of the source's family (engine/families.py), one after the other."""
    import torch

    from tqdm import tqdm

    from . import wrappers

    family = source_family(src)
    has_checker = options.safety_checker and (src / SAFETY_CHECKER.name / "config.json").is_file()
    unet_config = json.loads((src / "unet" / "config.json").read_text())
    size = unet_config.get("sample_size", 64)
    size = size[0] if isinstance(size, (list, tuple)) else size
    vae_config = json.loads((src / "vae" / "config.json").read_text())
    vae_scale = scale_factor(vae_config.get("block_out_channels", [0] * 4))
    split = len(vae_config.get("block_out_channels", ())) > 1  # the decoder's head ends with an upsampler
    specs = [c for c in family.components if c is not SAFETY_CHECKER or has_checker]
    specs = [c for c in specs if split or c not in (VAE_DECODER_HEAD, VAE_DECODER_TAIL)]
    if only is not None:
        specs = [c for c in specs if c.name in only]
    # disable=None: a bar on a terminal, nothing in logs and CI
    bar = tqdm(total=len(specs), desc="exporting", unit="component", disable=None, leave=False)
    g = torch.Generator().manual_seed(0)
    index = json.loads((src / "model_index.json").read_text())
    vae_cache, tail_shape, reports, slots, cached = {}, {}, [], {}, {}
    # LoRAs to bake in, matched against the source's weights before anything is exported
    baked = weight_map.bake_plan(src, family, unet_config, options.loras) if options.loras else {}
    # and the tiny autoencoder found and checked, before anything is exported too
    tiny_vae = _tiny_vae_source(options.tiny_vae, vae_config) if options.tiny_vae and only is None else None

    def text_encoder(spec):
        import transformers

        # model_index.json names the class: CLIPTextModel, or CLIPTextModelWithProjection for SDXL's
        # second encoder. Eager attention: a plain softmax(QK^T)V graph that ONNX Runtime's optimizer
        # recognises and fuses.
        cls = getattr(transformers, index.get(spec.name, [None, "CLIPTextModel"])[1])
        m = cls.from_pretrained(src / spec.name, attn_implementation="eager").eval()
        weight_map.bake(m, baked.get(spec.name), text=True)
        slots[spec.name] = weight_map.reserve_embedding_slots(m)
        c = m.config
        ids = torch.randint(0, c.vocab_size, (2, c.max_position_embeddings), generator=g)
        ids[:, 0], ids[:, -1] = c.bos_token_id, c.eos_token_id
        return wrappers.TextEncoder(m, [t.name for t in spec.outputs]), (ids,), spec.name

    def unet(spec):
        from diffusers import UNet2DConditionModel

        m = UNet2DConditionModel.from_pretrained(src / "unet").eval()
        weight_map.bake(m, baked.get(spec.name), text=False)
        c = m.config
        text = json.loads((src / family.text_encoders[0].spec.name / "config.json").read_text())
        args = {"sample": torch.randn(2, c.in_channels, size, size, generator=g),
                "timestep": torch.tensor([981.0, 981.0]),
                "encoder_hidden_states": torch.randn(2, text.get("max_position_embeddings", CLIP_CONTEXT),
                                                     c.cross_attention_dim, generator=g)}
        if "text_embeds" in [t.name for t in spec.inputs]:  # SDXL's pooled text and micro-conditioning
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            pixels = float(size * vae_scale)
            args["text_embeds"] = torch.randn(2, pooled, generator=g)
            args["time_ids"] = torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]] * 2)
        names, args = [t.name for t in spec.inputs], tuple(args[t.name] for t in spec.inputs)
        if not options.deep_cache:
            return wrappers.Unet(m, names), args, "unet"
        depth, scores, feature = _cache_depth(m, names, args, options.deep_cache)
        cached.update(depth=depth, scores=scores, feature=feature, args=args, names=names)
        return wrappers.UnetWithFeature(m, names, depth), args, "unet"

    def unet_shallow(spec):
        from diffusers import UNet2DConditionModel

        m = UNet2DConditionModel.from_pretrained(src / "unet").eval()  # the UNet's export freed its copy
        weight_map.bake(m, baked.get(family.unet.name), text=False)
        return (wrappers.UnetShallow(m, cached["names"], cached["depth"]), (*cached["args"], cached["feature"]),
                "unet")

    def vae(spec):
        from diffusers import AutoencoderKL

        if "vae" not in vae_cache:
            vae_cache["vae"] = AutoencoderKL.from_pretrained(src / "vae").eval()
        m = vae_cache["vae"]
        latent = torch.randn(1, m.config.latent_channels, size, size, generator=g)
        if spec is VAE_ENCODER:
            return wrappers.VaeEncoder(m), (torch.rand(1, 3, size * vae_scale, size * vae_scale, generator=g) * 2 - 1,), "vae"
        if spec is VAE_DECODER:
            return wrappers.VaeDecoder(m), (latent,), "vae"
        if spec is VAE_DECODER_HEAD:
            return wrappers.VaeDecoderHead(m), (latent,), "vae"
        # The tail rewires the VAE's GroupNorms: it comes last. Realistic inputs: the head's output for
        # a latent, and for statistics the tail's own on it, so the parity run (mix 1) goes through the
        # given-statistics path and still decodes that latent.
        module = wrappers.VaeDecoderTail(m)
        with torch.no_grad():
            hidden = wrappers.decoder_head(m, latent)
            mask = torch.ones(1, 1, *hidden.shape[-2:])
            _, stats = module(hidden, torch.zeros(module.norms, 1, module.groups, 2), mask, torch.zeros(1))
        tail_shape.update(norms=module.norms, groups=module.groups, channels=int(hidden.shape[1]),
                          margin=wrappers.tail_margin(m.config))
        return module, (hidden, stats, mask, torch.ones(1)), "vae"

    def safety_checker(spec):
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        m = StableDiffusionSafetyChecker.from_pretrained(src / "safety_checker").eval()
        side = m.config.vision_config.image_size
        # a batch of 2: traced with 1, the exporter ties broadcasts to the batch size
        args = (torch.randn(2, 3, side, side, generator=g), torch.rand(2, 64, 64, 3, generator=g))
        return wrappers.SafetyChecker(m), args, "safety_checker"

    # How to build each component in PyTorch, by the role its description plays in the family.
    builders = {**{t.spec.name: text_encoder for t in family.text_encoders}, "unet": unet,
                family.unet_shallow.name: unet_shallow, **{v.name: vae for v in VAE},
                SAFETY_CHECKER.name: safety_checker}
    if options.deep_cache and family.unet in specs:  # the shallow UNet right after the full one
        specs.insert(specs.index(family.unet) + 1, family.unet_shallow)
    for spec in specs:
        module, args, config_dir = builders[spec.name](spec)
        if spec is family.unet and options.deep_cache:
            spec = with_cache_feature(spec)
        folder = tmp / spec.name
        folder.mkdir()
        shutil.copy2(src / config_dir / "config.json", folder / "config.json")
        holder = [module]
        del module  # _export_one frees the weights before ONNX Runtime loads its copy
        has_attention = spec.name in (family.unet.name, family.unet_shallow.name, VAE_ENCODER.name,
                                      VAE_DECODER.name, VAE_DECODER_HEAD.name)
        # The UNet's and the text encoders' weights are mapped for LoRAs and embeddings at load time
        mapped = "text" if spec.name in slots else "unet" if spec.name == family.unet.name else None
        report = _export_one(spec, holder, args, folder / "model.onnx", options, has_attention, mapped,
                             slots.get(spec.name))
        if spec is VAE_DECODER_TAIL:
            report.extra = dict(tail_shape)
        if spec.name == family.unet_shallow.name:
            report.extra = {"cache_depth": cached["depth"], "cache_psnr": cached["scores"]}
        if profile_memory and spec is not SAFETY_CHECKER:  # the checker's input is fixed at 224 px
            report.activations = memory_profile.profile(folder / "model.onnx", spec, vae_scale)
        reports.append(report)
        bar.update(1)
        log.info("exported %s: %.1f s, %s, PSNR %s dB against PyTorch", spec.name, report.seconds, report.dtype,
                 "inf" if report.psnr is None else f"{report.psnr:.1f}")
        gc.collect()
    vae_cache.clear()
    if tiny_vae is not None:
        reports.append(_export_tiny_vae(options, tiny_vae, tmp, vae_config, size, vae_scale, profile_memory, g))
    bar.close()
    if has_checker:
        shutil.copytree(src / "feature_extractor", tmp / "feature_extractor")
    for part in (*family.tokenizers, "scheduler"):
        shutil.copytree(src / part, tmp / part)
    for part in family.tokenizers:
        add_vocab_files(tmp / part)
    shutil.copy2(src / "model_index.json", tmp / "model_index.json")
    if options.dtype == "int8" and (only is None or UNET.name in only):
        unet_report = next(r for r in reports if r.name == UNET.name)
        decoder_report = next((r for r in reports if r.name == VAE_DECODER.name), None)
        _quantize(tmp, family.unet, unet_report, size * vae_scale, decoder_report)
        if profile_memory:
            unet_report.activations = memory_profile.profile(tmp / UNET.onnx_path, family.unet, vae_scale)
    return family, reports


# The PSNR a caching depth must reach for "auto" to take it: the shallow network's noise prediction on
# the next CACHE_AGES steps, from the feature of this one, against the full UNet's (the worst of them).
# Set between the two models measured end to end (20 Euler steps, cache_interval 3, against the exact
# picture): the built-in model's depth 1 rates 24.7 dB here and drew an 18 dB picture (depth 2: 37.2
# here, 27 dB); SD 1.5's architecture with random weights rates depth 1 at 27.4 dB and drew 37.0 dB
# against diffusers at 2.4x less UNet time (depth 3: 31.9 here, 41.9 dB, 1.5x).
CACHE_MIN_PSNR = 26.0
# Timesteps between two steps measured, and how far the (scaled) sample moves along the predicted noise
# in one: a 20-step Euler schedule's, whose scaled sample moves by about a quarter of its scale a step
CACHE_STEP, CACHE_MOVE = 50, 0.25
CACHE_AGES = 2  # a feature used two steps after it was made: what cache_interval 3 does


def _cache_depth(m, names: list[str], args: tuple, choice: str) -> tuple[int, dict, object]:
    """The caching depth (wrappers.UnetShallow), each depth's measured PSNR, and the chosen depth's
    feature on `args` (the shallow UNet's export input): the shallow network runs the next CACHE_AGES
    steps from the feature the full UNet left at this one, against the full UNet on those steps. "auto" takes the cheapest depth that reaches CACHE_MIN_PSNR, or the deepest when none
    does. One small step (0.05) alone rated the built-in model's depth 1 at 47 dB, whose picture at
    cache_interval 3 is 18 dB from the exact one; two realistic steps rate it 24.7 dB (CACHE_MIN_PSNR)."""
    from . import wrappers

    full = wrappers.Unet(m, names)
    sample, timestep, *rest = args
    # the next steps' samples: each moved a small way along the predicted noise, as a solver would
    steps, x = [], sample
    for age in range(1, CACHE_AGES + 1):
        x = x - CACHE_MOVE * full(x, timestep - CACHE_STEP * (age - 1), *rest)
        steps.append((x, timestep - CACHE_STEP * age, *rest))
    wants = [full(*later).numpy() for later in steps]
    scores, features = {}, {}
    for depth in range(1, wrappers.cache_depths(m) + 1):
        _, features[depth] = wrappers.UnetWithFeature(m, names, depth)(*args)
        feature = features[depth]
        shallow = wrappers.UnetShallow(m, names, depth)
        found = [tensor_psnr(shallow(*later, feature).numpy(), want)[0] for later, want in zip(steps, wants)]
        found = [v for v in found if v is not None]
        scores[str(depth)] = round(min(found), 2) if found else None
    if choice != "auto":
        depth = int(choice)
        if str(depth) not in scores:
            raise EdgediffError(f"--deep-cache {depth}: this UNet's last up block has {len(scores)} layers; "
                                f"use a depth from 1 to {len(scores)}, or auto")
        return depth, scores, features[depth]
    good = [int(d) for d, v in scores.items() if v is None or v >= CACHE_MIN_PSNR]
    depth = min(good) if good else len(scores)
    return depth, scores, features[depth]


def _tiny_vae_source(ref: str, vae_config: dict) -> Path:
    """The tiny autoencoder's folder, checked from its config: an AutoencoderTiny whose latents are the
    model's."""
    from .sources import tiny_vae_folder

    folder = tiny_vae_folder(ref)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise EdgediffError(f"--tiny-vae {ref}: no readable config.json ({first_line(e)}); give a TAESD folder or "
                            "hub id such as madebyollin/taesd") from None
    if not isinstance(config, dict) or config.get("_class_name") != "AutoencoderTiny":
        kind = config.get("_class_name") if isinstance(config, dict) else None
        raise EdgediffError(f"--tiny-vae {ref}: not a diffusers AutoencoderTiny ({kind or 'no _class_name'}); "
                            "give a TAESD folder or hub id such as madebyollin/taesd")
    channels = vae_config.get("latent_channels", 4)
    if config.get("latent_channels", 4) != channels:
        raise EdgediffError(f"--tiny-vae {ref} decodes {config.get('latent_channels', 4)}-channel latents and this "
                            f"model's are {channels}-channel; use the tiny autoencoder of its family "
                            "(madebyollin/taesd for SD 1.x and 2.x, madebyollin/taesdxl for SDXL)")
    return folder


def _export_tiny_vae(options: ExportOptions, folder: Path, tmp: Path, vae_config: dict, size: int,
                     vae_scale: int, profile_memory: bool, g) -> ComponentReport:
    """The tiny autoencoder's decoder, through the same export and parity gate as every component."""
    import torch
    from diffusers import AutoencoderTiny

    from . import wrappers

    m = AutoencoderTiny.from_pretrained(folder).eval()
    out = tmp / VAE_DECODER_TINY.name
    out.mkdir()
    shutil.copy2(folder / "config.json", out / "config.json")
    latent = torch.randn(1, vae_config.get("latent_channels", 4), size, size, generator=g)
    report = _export_one(VAE_DECODER_TINY, [wrappers.VaeDecoder(m)], (latent,), out / "model.onnx", options,
                         has_attention=False)
    report.extra = {"source": str(options.tiny_vae)}
    if profile_memory:
        report.activations = memory_profile.profile(out / "model.onnx", VAE_DECODER_TINY, vae_scale)
    log.info("exported %s: %.1f s, PSNR %s dB against PyTorch", VAE_DECODER_TINY.name, report.seconds,
             "inf" if report.psnr is None else f"{report.psnr:.1f}")
    return report


def source_family(src: Path) -> Family:
    """The family of a diffusers folder, from its UNet's config (engine/families.py)."""
    try:
        unet_config = json.loads((src / "unet" / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise EdgediffError(f"{src / 'unet' / 'config.json'} cannot be read ({e}); is {src} a diffusers folder?") from None
    return recognise(unet_config, str(src))


def _quantize(tmp: Path, spec: ComponentSpec, report: ComponentReport, native: int,
              decoder_report: ComponentReport | None = None) -> None:
    """Replace the fp32 UNet in `tmp` by its int8 version, calibrated on generations with the fp32
    export at half the native size; the gate compares the two graphs on a call calibration never saw.
    The VAE decoder, when exported, gets an int8 graph beside its fp32 one, calibrated on those
    generations' final latents (_quantize_decoder)."""
    from ..backends.base import OrtSession
    from . import quantize

    start = time.perf_counter()
    size = max(64, native // 2 // 64 * 64)
    from ..backends.host import int8_kernels

    # the int8 kernels of this machine, which the gate's figures are measured with; AVX2's get 7-bit
    # weights (quantize.quantize_graph), the price of not saturating
    kernels = int8_kernels()
    reduce_range = kernels == "avx2"
    decoder_calls: list[dict] | None = [] if decoder_report is not None else None
    calls, held_out = quantize.calibration_inputs(tmp, size, decoder=decoder_calls)
    if decoder_report is not None:
        _quantize_decoder(tmp, decoder_calls, decoder_report, reduce_range)
    folder = tmp / UNET.name
    fp32 = folder / "fp32"
    fp32.mkdir()
    for f in folder.glob("model.onnx*"):
        f.rename(fp32 / f.name)
    # Quantized weights cannot take a LoRA's fp32 delta: the map stays (a LoRA's keys still resolve, so
    # the refusal can say why) marked quantized; LoRAs are baked in before (export --lora)
    weight_map.mark_quantized(folder / weight_map.WEIGHT_MAP)
    # the layers whose inputs lose the most to uint8 stay fp32, measured on the calibration calls
    keep, sensitivity = quantize.sensitive_nodes(fp32 / "model.onnx", calls)
    quantize.quantize_graph(fp32 / "model.onnx", folder / "model.onnx", calls, reduce_range=reduce_range,
                           keep=tuple(keep))
    want = OrtSession(fp32 / "model.onnx", spec, ["CPUExecutionProvider"]).run(**held_out)["out_sample"]
    shutil.rmtree(fp32)
    _consolidate(folder / "model.onnx")  # the quantizer's layout puts even shape constants in its data file
    got = OrtSession(folder / "model.onnx", spec, ["CPUExecutionProvider"]).run(**held_out)["out_sample"]
    score, max_abs = tensor_psnr(got, want)
    report.dtype, report.psnr, report.max_abs_diff = "int8", score, max_abs
    report.bytes = sum(f.stat().st_size for f in folder.glob("model.onnx*"))
    report.seconds = round(report.seconds + time.perf_counter() - start, 2)
    # the gate's figure holds for the int8 kernels of the machine that measured it (backends/host.py)
    report.extra = {"calibration": {"prompts": len(quantize.CALIBRATION_PROMPTS), "calls": len(calls),
                                    "size": size, "against": "the fp32 graph"},
                    "int8_kernels": kernels, "reduce_range": reduce_range, "fp32_layers": sensitivity}
    if score is not None and not score >= MIN_PSNR["int8"]:
        raise EdgediffError(f"the int8 UNet is {score:.1f} dB PSNR against the fp32 one, below the "
                            f"{MIN_PSNR['int8']:g} dB gate; this model does not quantize well: use --dtype fp32")


def _quantize_decoder(tmp: Path, calls: list[dict], report: ComponentReport, reduce_range: bool) -> None:
    """vae_decoder/model_int8.onnx: the decoder quantized like the UNet, calibrated on the calibration
    generations' final latents, its fragile parts (the component's fp16_keep patterns: the first and last
    layers, the mid block's attention, the last norm) kept fp32; gated on the held-out generation's
    latents (the last of `calls`) against the fp32 decoder. The fp32 decoder stays the default."""
    import tempfile

    import onnx

    from ..backends.base import OrtSession
    from . import quantize

    start = time.perf_counter()
    calibration, held_out = calls[:-1], calls[-1]
    fp32 = tmp / VAE_DECODER.onnx_path
    with tempfile.TemporaryDirectory(dir=tmp) as scratch:
        quantized = Path(scratch) / "model.onnx"
        quantize.quantize_graph(fp32, quantized, calibration, exclude=VAE_DECODER.fp16_keep, reduce_range=reduce_range)
        onnx.save(onnx.load(str(quantized)), str(fp32.with_name(INT8_GRAPH)))  # one file: about 50 MB
    want = OrtSession(fp32, VAE_DECODER, ["CPUExecutionProvider"]).run(**held_out)["sample"]
    got = OrtSession(fp32.with_name(INT8_GRAPH), VAE_DECODER, ["CPUExecutionProvider"]).run(**held_out)["sample"]
    score, max_abs = tensor_psnr(got, want)
    report.extra = {**report.extra, "int8": {
        "file": INT8_GRAPH, "psnr": None if score is None else round(score, 2), "max_abs_diff": max_abs,
        "bytes": fp32.with_name(INT8_GRAPH).stat().st_size, "calibration_latents": len(calibration),
        "reduce_range": reduce_range,
        "seconds": round(time.perf_counter() - start, 2), "against": "the fp32 decoder, held-out latents"}}


def _export_one(spec: ComponentSpec, holder: list, args: tuple, path: Path, options: ExportOptions,
                has_attention: bool, mapped: str | None = None,
                embedding_slots: tuple[int, int] | None = None) -> ComponentReport:
    import torch

    from . import attention

    module = holder.pop()  # the only reference: dropping it below frees the PyTorch weights
    start = time.perf_counter()
    variant = options.attention if has_attention else "standard"
    reference = None
    if has_attention:
        attention.install(module.m, "standard")
        if variant != "standard":
            reference = module(*args)
            attention.install(module.m, variant, options.slices)
            got = module(*args)
            err = relative_error(got, reference)
            if not err <= VARIANT_MAX_RELATIVE_ERROR:
                raise EdgediffError(f"{variant} attention in the {spec.name} differs from standard attention "
                                    f"by {err:.1e} (relative); the variant is broken for this model")
    dynamic = spec.dynamic_axes()
    # The TorchScript exporter: the dynamo one still fails on parts of diffusers' UNet with dynamic
    # spatial sizes, and its graphs are no faster in ONNX Runtime.
    torch.onnx.export(module, args, str(path), input_names=[t.name for t in spec.inputs],
                      output_names=[t.name for t in spec.outputs], dynamic_axes=dynamic,
                      opset_version=OPSET, do_constant_folding=True, dynamo=False)
    traced = shapes = None
    if mapped:  # which initializer holds each weight, found while PyTorch's values are at hand
        traced = weight_map.trace(module, path, text=mapped == "text")
        shapes = {weight_map.canonical(n, mapped == "text"): tuple(p.shape) for n, p in module.named_parameters()}
    expected = module(*args)
    expected = [e.numpy().copy() for e in (expected if isinstance(expected, tuple) else (expected,))]
    parameters = sum(p.numel() for p in module.parameters())
    del module, reference
    gc.collect()  # the export's peak is one component's weights in one library at a time, not two
    inputs = {t.name: a.numpy() for t, a in zip(spec.inputs, args)}
    kept = nodes = 0
    if options.dtype == "fp16":
        if spec.fp32_fallback:  # small, and what the runtime re-runs on overflow
            shutil.copy2(path, path.with_name(FP32_FALLBACK))
        kept, nodes = _to_fp16(path, spec, inputs)
    if traced is None:
        _consolidate(path)
    else:  # gathers the data file as _consolidate does, with every mapped weight in it
        weight_map.write(path, traced, shapes, embedding_slots, keep=("config.json", FP32_FALLBACK))
    seconds = time.perf_counter() - start
    psnr, max_abs = _parity(spec, path, inputs, expected)
    report = ComponentReport(
        name=spec.name, format="onnx", dtype="fp32" if options.dtype == "int8" else options.dtype, attention=variant,
        inputs=[_io(t) for t in spec.inputs], outputs=[_io(t) for t in spec.outputs],
        parameters=int(parameters), bytes=sum(f.stat().st_size for f in path.parent.glob("model.onnx*")),
        psnr=psnr, max_abs_diff=max_abs, seconds=round(seconds, 2), fp32_nodes=kept, nodes=nodes)
    floor = MIN_PSNR[report.dtype]
    if psnr is not None and not psnr >= floor:
        raise EdgediffError(f"the exported {spec.name} ({report.dtype}) is {psnr:.1f} dB PSNR against PyTorch, "
                            f"below the {floor:g} dB gate; the export is broken, nothing was written")
    return report


def _io(t) -> dict:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.axes)}


def _parity(spec: ComponentSpec, path: Path, inputs: dict, expected: list[np.ndarray]):
    from ..backends.base import OrtSession

    session = OrtSession(path, spec, ["CPUExecutionProvider"])
    got = session.run(**inputs)
    del session
    scores = [tensor_psnr(got[t.name], want) for t, want in zip(spec.outputs, expected)]
    worst = [s for s, _ in scores if s is not None]
    return (round(min(worst), 2) if worst else None), max(m for _, m in scores)


def _calibrate(path: Path, inputs: dict) -> dict[str, float]:
    """The largest |value| of every float tensor of the fp32 graph on the sample inputs: the tensors ONNX
    Runtime's MinMax calibrator measures (node inputs and outputs that ONNX's type inference calls float,
    weights aside), with the same result (tests/test_export.py compares the two), in one pass
    (export/probes.py says why not with that calibrator)."""
    ranges = {name: v["absmax"] for name, v in probes.tensor_statistics(path, [inputs]).items()}
    # attention masks hold finfo.min, meant to saturate: not a reason to keep anything fp32
    return {k: v for k, v in ranges.items() if v < 1e30}


def _to_fp16(path: Path, spec: ComponentSpec, inputs: dict) -> tuple[int, int]:
    """Convert to fp16 with ONNX Runtime's own converter (measured here: onnxconverter-common's gave a
    graph ONNX Runtime refused), keeping FP16_KEEP_* and every node that touches a value calibration
    found too large in fp32. Returns (nodes kept fp32, nodes)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    for chatty in ("onnxruntime.transformers", "float16"):  # per-pass counts of removed Casts
        logging.getLogger(chatty).setLevel(logging.WARNING)
    hot = {name for name, value in _calibrate(path, inputs).items() if value >= FP16_CALIBRATION_LIMIT}
    model = OnnxModel(onnx.load(str(path)))
    patterns = [re.compile(p) for p in spec.fp16_keep]
    keep_ops = set(DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_OPS)
    keep = [n.name for n in model.nodes()
            if n.op_type in keep_ops or any(p.search(n.name) for p in patterns)
            or hot.intersection(n.input) or hot.intersection(n.output)]
    if hot:
        log.info("%s: %d values reach %g or more on the sample inputs; the nodes around them stay fp32",
                 spec.name, len(hot), FP16_CALIBRATION_LIMIT)
    model.convert_float_to_float16(keep_io_types=True, op_block_list=sorted(keep_ops), node_block_list=keep)
    # The converter inserts the same Cast twice when a value feeds two fp32 nodes of one block (ONNX
    # Runtime 1.31): identical nodes, same output name, which ONNX Runtime then refuses to load.
    seen, graph = set(), model.model.graph
    for node in list(graph.node):
        ident = (node.op_type, tuple(node.input), tuple(node.output))
        if node.op_type == "Cast" and ident in seen:
            graph.node.remove(node)
        seen.add(ident)
    nodes = len(model.nodes())
    onnx.save(model.model, str(path))
    return len(keep), nodes


def _consolidate(path: Path) -> None:
    """Above protobuf's 2 GB the exporter writes one file per weight; gather them into one
    model.onnx_data beside the graph, the layout optimum and ONNX Runtime's tools expect."""
    import onnx

    extra = [f for f in path.parent.iterdir()
             if f.name not in ("model.onnx", "config.json", FP32_FALLBACK, INT8_GRAPH, weight_map.WEIGHT_MAP)]
    if not extra:
        return
    model = onnx.load(str(path))  # loads the external tensors too
    for f in extra:
        f.unlink()
    # Weight matrices go to the data file; tensors under 1 MB (norms, biases, shape constants) stay in
    # the graph, where tools that read values to infer shapes find them without the weights.
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx_data", size_threshold=1 << 20)
