"""AMD GPUs through ONNX Runtime's MIGraphX execution provider, or the older ROCm one, whichever the
installed onnxruntime build carries (AMD ships them as onnxruntime-migraphx / onnxruntime-rocm; ROCm 7.1
dropped the ROCm provider, so MIGraphX is preferred).

The probe reads the GPU through amdsmi (AMD SMI's Python package: name, VRAM total and used, driver),
or `rocm-smi --json` where amdsmi is not importable. Without either, the backend still runs with memory
unknown.

What is not run here (no AMD GPU on the development machines): a session on the GPU. The probe runs
against simulated amdsmi and rocm-smi answers and the provider options are checked as built.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...engine.components import ComponentSpec
from .. import host
from ..base import Device, OrtProviderBackend, OrtSession, Overrides, Unavailable, first_line, session_options

MIGRAPHX = "MIGraphXExecutionProvider"
ROCM = "ROCMExecutionProvider"
MISSING = ("no ONNX Runtime build with the MIGraphX or ROCm execution provider is installed "
           "(install AMD's onnxruntime-migraphx wheel for your ROCm version)")
ROCM_SMI = ["rocm-smi", "--showproductname", "--showmeminfo", "vram", "--showdriverversion", "--json"]


def migraphx_provider_options(device_id: int) -> dict[str, str]:
    """MIGraphX's options. It compiles the graph itself and allocates outside ONNX Runtime's arena, so
    there is no memory limit to pass: the plan's prediction is the only guard there."""
    return {
        "device_id": str(device_id),
        # Keep the graph's dtype: fp16_enable would quantize an fp32 export to fp16 inside MIGraphX, past
        # the export's parity check and its fp32 islands (the VAE overflows in fp16: black images). An fp16
        # export runs in fp16 without it; which one to load is the plan's decision.
        "migraphx_fp16_enable": "0",
        # Compiling the SD UNet already takes minutes; exhaustive tuning multiplies that, on every start,
        # since compiled programs are not cached yet.
        "migraphx_exhaustive_tune": "0",
    }


def rocm_provider_options(device_id: int, memory_limit: int | None = None) -> dict[str, str]:
    """The ROCm provider's options: the CUDA provider's, with MIOpen in cuDNN's place."""
    options = {
        "device_id": str(device_id),
        "arena_extend_strategy": "kSameAsRequested",  # a plan sized the arena; powers of two overshoot
        # MIOpen times each convolution's algorithms once per shape, as cuDNN's EXHAUSTIVE does: SD calls
        # the UNet with one shape many times.
        "miopen_conv_exhaustive_search": "1",
        "do_copy_in_default_stream": "1",
    }
    if memory_limit:
        options["gpu_mem_limit"] = str(int(memory_limit))
    return options


def fp16_fast(arch: str | None) -> bool:
    """Packed fp16 math (2x the fp32 rate) came with Vega (gfx9, "rapid packed math") and is in every
    RDNA and CDNA GPU since; Polaris (gfx8) has none. ROCm supports nothing older than gfx9, so an
    unknown architecture counts as fast."""
    if not arch or not arch.startswith("gfx") or len(arch) < 6:
        return True
    major = arch[3:-2]
    return not major.isdigit() or int(major) >= 9


def _import_amdsmi():
    import amdsmi  # its native library may be missing even when the package is installed

    return amdsmi


def _amdsmi_facts(smi, index: int) -> dict:
    smi.amdsmi_init()
    try:
        handles = smi.amdsmi_get_processor_handles()
        if index >= len(handles):
            raise LookupError(f"amdsmi sees {len(handles)} AMD GPU(s), so there is no device {index}")
        handle = handles[index]
        asic = smi.amdsmi_get_gpu_asic_info(handle)
        name = asic.get("market_name") or ""
        if not name or name == "N/A":
            try:
                name = smi.amdsmi_get_gpu_board_info(handle).get("product_name") or "AMD GPU"
            except Exception:  # older amdsmi, or a board without the field
                name = "AMD GPU"
        vram = smi.AmdSmiMemoryType.VRAM
        total = int(smi.amdsmi_get_gpu_memory_total(handle, vram))  # bytes
        used = int(smi.amdsmi_get_gpu_memory_usage(handle, vram))
        driver = smi.amdsmi_get_gpu_driver_info(handle)
        arch = asic.get("target_graphics_version")
        return {"name": name, "total": total, "free": total - used,
                "driver": f"{driver.get('driver_name') or 'amdgpu'} {driver.get('driver_version', '?')}",
                "arch": arch if isinstance(arch, str) and arch.startswith("gfx") else None}
    finally:
        smi.amdsmi_shut_down()


def _rocm_smi_facts(text: str, index: int) -> dict:
    """rocm-smi's JSON: {"card0": {"Card Series": ..., "GFX Version": ..., "VRAM Total Memory (B)": ...,
    "VRAM Total Used Memory (B)": ...}, "system": {"Driver version": ...}}; key case varies by version."""
    data = {k: {kk.lower(): v for kk, v in fields.items()} for k, fields in json.loads(text).items()
            if isinstance(fields, dict)}
    cards = sorted((k for k in data if k.startswith("card")), key=lambda k: int(k[4:] or 0))
    if index >= len(cards):
        raise LookupError(f"rocm-smi sees {len(cards)} AMD GPU(s), so there is no device {index}")
    card = data[cards[index]]
    total = int(card["vram total memory (b)"])
    used = int(card["vram total used memory (b)"])
    driver = data.get("system", {}).get("driver version")
    arch = card.get("gfx version")
    return {"name": card.get("card series") or card.get("card model") or "AMD GPU", "total": total,
            "free": total - used, "driver": f"amdgpu {driver}" if driver else None,
            "arch": arch if isinstance(arch, str) and arch.startswith("gfx") else None}


class RocmBackend(OrtProviderBackend):
    """Probe inputs, each injectable: `available_providers()`; `amdsmi()` returns the amdsmi module (raises
    when it is not importable); `run(args) -> stdout | None` runs rocm-smi."""

    def __init__(self, available_providers=None, amdsmi=None, run=None, device_id: int = 0):
        super().__init__("rocm", (MIGRAPHX, ROCM), MISSING, available_providers)
        self._amdsmi = amdsmi or _import_amdsmi
        self._run = run or host.run_command
        # HIP's device ids follow HIP_VISIBLE_DEVICES, amdsmi's do not; like the CUDA backend, one GPU is
        # the case this handles exactly.
        self.device_id = device_id

    def probe(self) -> Device | Unavailable:
        present = self._present()
        if not present:
            return Unavailable(self.name, self._missing_hint)
        provider = present[0]
        kind = "MIGraphX" if provider == MIGRAPHX else "ROCm"
        try:
            smi = self._amdsmi()
        except Exception:  # ImportError, or OSError from its native library
            smi = None
        try:
            if smi is not None:
                facts = _amdsmi_facts(smi, self.device_id)
            else:
                text = self._run(ROCM_SMI)
                if text is None:
                    return Device(self.name, f"AMD GPU {self.device_id}", (provider, "CPUExecutionProvider"),
                                  fp16=True, device_id=self.device_id,
                                  notes=("memory unknown: neither amdsmi (pip install amdsmi) nor rocm-smi "
                                         "is available",))
                facts = _rocm_smi_facts(text, self.device_id)
        except Exception as e:
            tool = "amdsmi" if smi is not None else "rocm-smi"
            return Unavailable(self.name, f"{kind} provider present but no AMD GPU driver found "
                                          f"({tool}: {first_line(e)})")
        return Device(self.name, facts["name"], (provider, "CPUExecutionProvider"),
                      total_memory=facts["total"], free_memory=facts["free"], fp16=fp16_fast(facts["arch"]),
                      driver=facts["driver"], device_id=self.device_id, arch=facts["arch"])

    def open(self, path: Path, spec: ComponentSpec, device: Device, memory_limit: int | None = None,
             overrides: Overrides | None = None, dtype: str = "fp32", precision: str = "f32") -> OrtSession:
        """`precision` is accepted and ignored: ONNX Runtime runs the graph's own dtype."""
        provider = device.providers[0]
        options = (migraphx_provider_options(device.device_id) if provider == MIGRAPHX
                   else rocm_provider_options(device.device_id, memory_limit))
        # Kept inputs are bound on the host: ORT's Python names AMD device memory differently across its
        # MIGraphX and ROCm builds, and the one input kept (the text embeddings, half a MB) costs
        # microseconds to copy per step.
        return OrtSession(path, spec, [(provider, options), "CPUExecutionProvider"], session_options(),
                          require=provider, bind_device=("cpu", 0), overrides=overrides)


BACKEND = RocmBackend()
