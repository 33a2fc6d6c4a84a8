"""Reading an exported model folder (edgediff's or optimum's ONNX layout, or edgediff's Core ML packages)
into one frozen description.

Everything the pipeline needs to know about a model before loading any weights comes from here: the
paths, the UNet's input channels and native size, the VAE's scale factors, the scheduler config. Each
problem is reported as one line that names the file and what to do.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .components import UNET, ComponentSpec
from .errors import EdgediffError
from .families import Family, by_name, recognise
from .schedulers.base import SchedulerConfig

LATENT_CHANNELS = 4
# Each component's artifact in its folder, by the export's format (the manifest's "format" says which)
ARTIFACTS = {"onnx": "model.onnx", "coreml": "model.mlpackage"}
FORMATS = {"edgediff-onnx": "onnx", "edgediff-coreml": "coreml"}


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    name: str
    family: Family  # engine/families.py: its components and how prompts become conditioning
    unet_in_channels: int  # 4, or 9 for inpainting checkpoints (latents + mask + masked-image latents)
    sample_size: int  # the UNet's native latent size
    vae_scale_factor: int  # pixels per latent (8 for SD)
    # Image sides must be multiples of this: the VAE's factor times the UNet's downsamplings (SD: 8 x 8 =
    # 64). diffusers' UNet resizes odd latents on the way up; the exported graph upsamples by exactly 2,
    # and a side that does not halve evenly fails inside ONNX Runtime (a Concat of 5 and 6 columns).
    size_multiple: int
    scaling_factor: float  # latents are scaled by this before the UNet sees them
    scheduler_config: SchedulerConfig
    scheduler_class: str  # diffusers class named in scheduler_config.json, to pick the default
    export_manifest: dict  # edgediff.json (dtype, attention, parity); empty for optimum's folders
    # model_index.json's force_zeros_for_empty_prompt, else the family's: an unset negative prompt is
    # zero conditioning rather than the encoded ""
    zeros_for_empty_negative: bool = False
    format: str = "onnx"  # "coreml": one .mlpackage per component, run by the coreml backend
    # Core ML packages take the (width, height) sizes and up to the batch they were exported for; an
    # ONNX folder takes any (empty, None)
    sizes: tuple[tuple[int, int], ...] = ()
    max_batch: int | None = None
    # the tiny autoencoder's (vae_decoder_tiny) own scaling factor: 1 for TAESD, which decodes the UNet's
    # latents as they are
    tiny_scaling_factor: float = 1.0

    @property
    def native_size(self) -> int:
        return self.sample_size * self.vae_scale_factor

    @property
    def is_inpainting(self) -> bool:
        return self.unet_in_channels == 9

    def component(self, spec: ComponentSpec) -> Path:
        return self.path / spec.name / ARTIFACTS[self.format]

    def has(self, spec: ComponentSpec) -> bool:
        return self.component(spec).exists()  # a Core ML package is a folder

    def check_request(self, width: int, height: int, batch: int) -> None:
        """One line when the exported artifacts cannot take this size or batch (Core ML packages take
        the shapes they were exported for, and nothing else)."""
        if self.sizes and (width, height) not in self.sizes:
            have = [f"{w}x{h}" for w, h in self.sizes]
            raise EdgediffError(f"{self.name}'s Core ML packages take {', '.join(have)} only, not {width}x{height}: "
                                f"generate at one of those sizes, or export again with --sizes "
                                f"{','.join(have)},{width}x{height}")
        if self.max_batch is not None and batch > self.max_batch:
            raise EdgediffError(f"{self.name}'s Core ML packages make at most {self.max_batch} image(s) a call, "
                                f"not {batch}: generate fewer at a time, or export again with --batch {batch}")

    def dtype(self, name: str) -> str:
        """The dtype the component's graph was exported in ("fp32", "fp16", "int8"), as the manifest
        records it; fp32 where it records none (optimum's folders)."""
        record = self.export_manifest.get("components", {}).get(name, {})
        return str(record.get("dtype") or self.export_manifest.get("dtype") or "fp32")


def read_model_folder(path: str | Path) -> ModelInfo:
    path = Path(path)
    if not path.is_dir():
        raise EdgediffError(f"model folder {path} does not exist; export one with `edgediff export SRC --out DIR`")
    if (path / "unet" / "diffusion_pytorch_model.safetensors").exists() and not (path / UNET.onnx_path).exists():
        raise EdgediffError(f"{path} is a diffusers (PyTorch) folder; export it first: "
                            f"edgediff export {path} --out {path.name}-onnx")
    unet_file, vae_file = path / "unet" / "config.json", path / "vae_decoder" / "config.json"
    tiny_file = path / "vae_decoder_tiny" / "config.json"
    unet, vae = _config(unet_file), _config(vae_file)
    manifest = _config(path / "edgediff.json")
    _check_manifest(path / "edgediff.json", manifest)
    fmt = FORMATS.get(manifest.get("format"), "onnx")  # optimum's folders have no manifest: ONNX
    sizes, max_batch = _coreml_shapes(path / "edgediff.json", manifest) if fmt == "coreml" else ((), None)
    # The export names the family; optimum's folders are recognised from their UNet's config.
    family = by_name(manifest["family"], str(path / "edgediff.json")) if "family" in manifest \
        else recognise(unet, str(unet_file))
    for spec in family.required:
        artifact = f"{spec.name}/{ARTIFACTS[fmt]}"
        if not (path / artifact).exists():
            raise EdgediffError(f"model folder {path} has no {artifact}, which a {family.title} model "
                                "needs; export the model again with `edgediff export`")
    for required in (*family.tokenizers, "scheduler/scheduler_config.json"):
        if not (path / required).exists():
            raise EdgediffError(f"model folder {path} has no {required}; export the model again")

    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler_raw = _config(scheduler_file, required=True)
    index = _config(path / "model_index.json")
    zeros = index.get("force_zeros_for_empty_prompt", family.zeros_for_empty_negative)
    if not isinstance(zeros, bool):
        raise EdgediffError(f"{path / 'model_index.json'}: force_zeros_for_empty_prompt is {zeros!r}, not true or "
                            "false; fix the file or export the model again")
    vae_factor = scale_factor(_blocks(vae_file, vae, "VAE"))  # pixels per latent: 8 for SD
    sample_size = unet.get("sample_size", family.native_size // vae_factor)
    if isinstance(sample_size, (list, tuple)) and sample_size:
        sample_size = sample_size[0]
    unet_factor = scale_factor(_blocks(unet_file, unet, "UNet"))  # the UNet's downsamplings: 8 for SD
    name = manifest.get("name") or path.resolve().name
    try:
        scheduler_config = SchedulerConfig.from_dict(scheduler_raw)
    except (TypeError, ValueError) as e:
        raise EdgediffError(f"{scheduler_file}: {e}; fix the file or export the model again") from None
    return ModelInfo(
        path=path,
        name=str(name),
        family=family,
        unet_in_channels=_number(unet_file, "in_channels", unet.get("in_channels", LATENT_CHANNELS), (4, 9)),
        sample_size=_number(unet_file, "sample_size", sample_size, range(1, 1025)),
        vae_scale_factor=vae_factor,
        size_multiple=vae_factor * unet_factor,
        scaling_factor=_number(vae_file, "scaling_factor", vae.get("scaling_factor", family.scaling_factor), None),
        scheduler_config=scheduler_config,
        scheduler_class=str(scheduler_raw.get("_class_name", "")),
        export_manifest=manifest,
        zeros_for_empty_negative=zeros,
        format=fmt,
        sizes=sizes,
        max_batch=max_batch,
        tiny_scaling_factor=_number(tiny_file, "scaling_factor", _config(tiny_file).get("scaling_factor", 1.0), None),
    )


def _coreml_shapes(file: Path, manifest: dict) -> tuple[tuple[tuple[int, int], ...], int]:
    """The sizes and batch a Core ML export was made for (export/coreml_export.py writes them)."""
    sizes, batch = manifest.get("sizes"), manifest.get("batch")
    ok = isinstance(sizes, list) and sizes and all(
        isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s) for s in sizes)
    if not ok or not isinstance(batch, int) or batch < 1:
        raise EdgediffError(f"{file} does not say which sizes and batch its Core ML packages take (an export made "
                            "before flexible shapes); export the model again with `edgediff export --format coreml`")
    return tuple((w, h) for w, h in sizes), batch


def scale_factor(block_out_channels) -> int:
    """How much a VAE's or a UNet's blocks shrink an image's side, from its config's block_out_channels:
    each block but the last halves it (SD's four VAE blocks: 8 pixels per latent)."""
    return 2 ** (len(block_out_channels) - 1)


def _blocks(file: Path, config: dict, what: str) -> list:
    """The block widths a VAE's or UNet's config.json lists (SD's four blocks when it says nothing)."""
    blocks = config.get("block_out_channels") or [0] * 4
    if not isinstance(blocks, list) or not 1 <= len(blocks) <= 8:
        raise EdgediffError(f"{file}: block_out_channels is {blocks!r}, not a list of the {what}'s block widths; "
                            "export the model again")
    return blocks


def _number(file: Path, key: str, value, allowed):
    """A config's number, checked: whole numbers from `allowed` (a collection), or a positive finite real
    number when `allowed` is None."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if allowed is None:
        ok = ok and value > 0
    else:
        ok = ok and float(value).is_integer() and int(value) in allowed
    if not ok:
        expected = "a positive number" if allowed is None else (
            f"{' or '.join(map(str, allowed))}" if len(allowed) < 5 else f"a whole number from {allowed[0]} to {allowed[-1]}")
        raise EdgediffError(f"{file}: {key} is {value!r}, but it must be {expected}; export the model again")
    return float(value) if allowed is None else int(value)


def _check_manifest(file: Path, manifest: dict) -> None:
    """edgediff.json's shape, as far as anything reads it: a damaged or hand-edited manifest fails here,
    naming the field, rather than as a KeyError mid-generation."""
    components = manifest.get("components", {})
    if isinstance(components, list) and all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in components):
        components = manifest["components"] = {c["name"]: c for c in components}  # version 1 listed them
    if not isinstance(components, dict) or not all(isinstance(c, dict) for c in components.values()):
        raise EdgediffError(f"{file}: 'components' must map each component's name to its record; "
                            "export the model again")
    for key in ("name", "dtype", "attention", "family"):
        if key in manifest and not isinstance(manifest[key], str):
            raise EdgediffError(f"{file}: '{key}' must be a string, not {manifest[key]!r}; export the model again")
    for component, record in components.items():
        for key, kind in (("dtype", str), ("extra", dict), ("activations", dict), ("bytes", int)):
            if key in record and not isinstance(record[key], kind):
                raise EdgediffError(f"{file}: components.{component}.{key} is {record[key]!r}, not a "
                                    f"{kind.__name__}; export the model again")
        fit = record.get("activations", {}).get("fit")
        if fit is not None and not (isinstance(fit, list) and len(fit) == 3 and all(
                isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in fit)):
            raise EdgediffError(f"{file}: components.{component}.activations.fit is {fit!r}, not three numbers; "
                                "export the model again")
    if "source" in manifest and not isinstance(manifest["source"], dict):
        raise EdgediffError(f"{file}: 'source' must be a record of where the model came from; "
                            "export the model again")


def _config(path: Path, required: bool = False) -> dict:
    if not path.is_file():
        if required:
            raise EdgediffError(f"{path} is missing; export the model again")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EdgediffError(f"{path} is not valid JSON ({e}); export the model again") from None
    if not isinstance(data, dict):
        raise EdgediffError(f"{path} is not a JSON object; export the model again")
    return data

