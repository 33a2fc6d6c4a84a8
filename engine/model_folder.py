"""Reading an exported model folder (edgediff's or optimum's ONNX layout) into one frozen description.

Everything the pipeline needs to know about a model before loading any weights comes from here: the
paths, the UNet's input channels and native size, the VAE's scale factors, the scheduler config. Each
problem is reported as one line that names the file and what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .components import TEXT_ENCODER, UNET, VAE_DECODER, ComponentSpec
from .errors import EdgediffError
from .schedulers.base import SchedulerConfig

VAE_SCALING_FACTOR = 0.18215  # SD 1.x and 2.x; the VAE's config.json says so where it has the key
LATENT_CHANNELS = 4
DEFAULT_SAMPLE_SIZE = 64  # SD 1.x: 64 latents = 512 pixels


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    name: str
    unet_in_channels: int  # 4, or 9 for inpainting checkpoints (latents + mask + masked-image latents)
    sample_size: int  # the UNet's native latent size
    vae_scale_factor: int  # pixels per latent (8 for SD)
    scaling_factor: float  # latents are scaled by this before the UNet sees them
    scheduler_config: SchedulerConfig
    scheduler_class: str  # diffusers class named in scheduler_config.json, to pick the default
    export_manifest: dict  # edgediff.json (dtype, attention, parity); empty for optimum's folders

    @property
    def native_size(self) -> int:
        return self.sample_size * self.vae_scale_factor

    @property
    def is_inpainting(self) -> bool:
        return self.unet_in_channels == 9

    def component(self, spec: ComponentSpec) -> Path:
        return self.path / spec.onnx_path

    def has(self, spec: ComponentSpec) -> bool:
        return self.component(spec).is_file()


def read_model_folder(path: str | Path) -> ModelInfo:
    path = Path(path)
    if not path.is_dir():
        raise EdgediffError(f"model folder {path} does not exist; export one with `edgediff export SRC --out DIR`")
    if (path / "unet" / "diffusion_pytorch_model.safetensors").exists() and not (path / UNET.onnx_path).exists():
        raise EdgediffError(f"{path} is a diffusers (PyTorch) folder; export it first: "
                            f"edgediff export {path} --out {path.name}-onnx")
    for spec in (TEXT_ENCODER, UNET, VAE_DECODER):
        if not (path / spec.onnx_path).is_file():
            raise EdgediffError(f"model folder {path} has no {spec.onnx_path}; "
                                "export the model again with `edgediff export`")
    for required in ("tokenizer", "scheduler/scheduler_config.json"):
        if not (path / required).exists():
            raise EdgediffError(f"model folder {path} has no {required}; export the model again")

    unet = _config(path / "unet" / "config.json")
    vae = _config(path / "vae_decoder" / "config.json")
    scheduler_raw = _config(path / "scheduler" / "scheduler_config.json", required=True)
    sample_size = unet.get("sample_size", DEFAULT_SAMPLE_SIZE)
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    blocks = vae.get("block_out_channels")
    manifest = _config(path / "edgediff.json")
    name = manifest.get("name") or path.resolve().name
    try:
        scheduler_config = SchedulerConfig.from_dict(scheduler_raw)
    except TypeError as e:
        raise EdgediffError(f"{path}/scheduler/scheduler_config.json has an unexpected value: {e}") from None
    return ModelInfo(
        path=path,
        name=str(name),
        unet_in_channels=int(unet.get("in_channels", LATENT_CHANNELS)),
        sample_size=int(sample_size),
        vae_scale_factor=2 ** (len(blocks) - 1) if blocks else 8,
        scaling_factor=float(vae.get("scaling_factor", VAE_SCALING_FACTOR)),
        scheduler_config=scheduler_config,
        scheduler_class=str(scheduler_raw.get("_class_name", "")),
        export_manifest=manifest,
    )


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

