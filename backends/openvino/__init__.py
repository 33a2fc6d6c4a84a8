"""Intel CPUs and GPUs through OpenVINO (package openvino: pip install 'edgediff[openvino]'). Opt-in: it
comes after the cpu backend in the registry, so `auto` never picks it; `--backend openvino` does.

OpenVINO reads edgediff's ONNX exports as they are and compiles each component for one device (see
session.py). The probe lists OpenVINO's devices ("CPU", "GPU" or "GPU.0", "GPU.1", "NPU") and takes the
best for Stable Diffusion: a discrete Intel GPU, then an integrated one (on an Intel laptop the iGPU is
its fastest device, sharing the host's memory), then the CPU. EDGEDIFF_OPENVINO_DEVICE names another
("CPU", "GPU.1"). The other devices are listed in the Device's notes, so `edgediff devices` shows them.
The NPU is not used: OpenVINO's NPU plugin compiles static shapes in fp16 only, and SD has not been run
on one here.

Precision: OpenVINO computes in the precision it is told (INFERENCE_PRECISION_HINT), whatever the
graph's dtype, and its CPU plugin defaults to bf16 where the CPU has AVX512_BF16 or AMX (its GPU plugin
to fp16), so every session sets it: f32 for the exact plan, bf16 where the plan chose it and the device
is fast at it (the probe reads OPTIMIZATION_CAPABILITIES).

What is not run here (no Intel GPU or NPU on the development machines): a session on a GPU. The GPU
probe runs against injected answers; sessions on the CPU run for real in tests/test_openvino.py.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ...engine.components import ComponentSpec
from ...engine.files import cache_root
from .. import host
from ..base import BackendCost, Device, EdgediffError, MiB, Overrides, Unavailable
from .session import OpenVinoSession, reason

log = logging.getLogger("edgediff")

MISSING = "openvino is not installed (pip install 'edgediff[openvino]')"
DEVICE_ENV = "EDGEDIFF_OPENVINO_DEVICE"  # an OpenVINO device name, to run on it instead of the best one
PRECISIONS = ("f32", "bf16")  # what a plan may ask for; OpenVINO's own names for them
PROVIDER = "OpenVINO:"  # Device.providers holds "OpenVINO:<device>", the name compile_model takes


def _rank(family: str, kind: str) -> int | None:
    """Best first: a discrete GPU (Arc: its own fast memory), an integrated one (Iris Xe, Arc iGPU:
    faster than the CPU cores beside it), the CPU. None for the NPU (module docstring) and others."""
    if family == "GPU":
        return 0 if kind == "discrete" else 1
    return 2 if family == "CPU" else None


def _core():
    import openvino  # here, not at the top: `import edgediff` must work without openvino

    return openvino.Core()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("openvino")
    except PackageNotFoundError:
        return "?"


@dataclass(frozen=True)
class _Found:
    """One OpenVINO device, as its properties describe it."""
    device: str  # "CPU", "GPU.0", "NPU"
    name: str  # FULL_DEVICE_NAME
    kind: str  # DEVICE_TYPE: "integrated" or "discrete"
    capabilities: tuple[str, ...]  # OPTIMIZATION_CAPABILITIES: "FP32", "FP16", "BF16", "INT8", ...
    memory: int | None  # GPU_DEVICE_TOTAL_MEM_SIZE, GPUs only

    @property
    def family(self) -> str:
        return self.device.split(".")[0]


def _read(core, device: str) -> _Found:
    kind = str(core.get_property(device, "DEVICE_TYPE")).rsplit(".", 1)[-1].lower()  # Type.INTEGRATED
    memory = None
    if device.split(".")[0] == "GPU":
        try:
            memory = int(core.get_property(device, "GPU_DEVICE_TOTAL_MEM_SIZE"))
        except Exception:  # an old driver: the device runs, its size is unknown
            pass
    return _Found(device, str(core.get_property(device, "FULL_DEVICE_NAME")), kind,
                  tuple(str(c) for c in core.get_property(device, "OPTIMIZATION_CAPABILITIES")), memory)


def device_name(device: Device) -> str:
    """The OpenVINO device a Device of this backend stands for ("CPU", "GPU.0")."""
    first = device.providers[0] if device.providers else ""
    if not first.startswith(PROVIDER):
        raise EdgediffError(f"{device.name} is not an OpenVINO device (providers {', '.join(device.providers)})")
    return first[len(PROVIDER):]


def compile_config(device: Device, precision: str, cache_dir: Path | None) -> dict:
    """What compile_model is given: the precision, latency over throughput, the CPU's threads, the cache."""
    config = {
        "INFERENCE_PRECISION_HINT": precision,
        # one inference stream with every core on it: a generation makes one call at a time
        "PERFORMANCE_HINT": "LATENCY",
    }
    if device_name(device) == "CPU":
        # one thread per core we may use, as the cpu backend: more threads than cores only adds contention
        config["INFERENCE_NUM_THREADS"] = device.cores or host.cores()
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        config["CACHE_DIR"] = str(cache_dir)
    return config


class OpenVinoBackend:
    """Probe inputs, each injectable: `core()` returns an openvino.Core, or anything with its
    `available_devices` and `get_property(device, name)` (raises ImportError without openvino);
    `version()`; `memory() -> (total, available)` in bytes; `cores()`; `environ` (EDGEDIFF_OPENVINO_DEVICE)."""

    name = "openvino"
    # The device may be a GPU: the host's own components go to the cpu backend, not here
    host = False
    # Measured on the 2-core CI machine (OpenVINO 2026.4.1, CPU plugin, f32), peak resident memory (VmHWM):
    # - weights: graphs of 256 MiB (two MatMuls) and 288 MiB (eight 1024-channel 3x3 convolutions) grew the
    #   process by 2.13 and 2.12 times their weights at their first compile: the compiled model keeps the
    #   file's weights (memory-mapped, all touched) beside its plugin's repacked copy. In bf16 1.62 times.
    #   Each further shape set compiled adds one more copy (session.py bounds how many are kept).
    # - activations: the built-in model's generations at 512 and 1024 px (`edgediff generate --steps 1`,
    #   peak at the VAE decode, whose live tensors the memory profile puts at 134 and 541 MB): the peak
    #   grew 1.41 bytes per byte of the profile's growth (ONNX Runtime's cpu backend, the same way: 1.23).
    # - fixed: the same runs' peaks less that growth were 71 MB above the cpu backend's (OpenVINO's
    #   libraries, its CPU plugin and thread pool), added to the cpu backend's fixed cost.
    # - session: 20-25 MiB per compiled model of the built-in components beyond their weights.
    # Unmeasured: the full-size SD 1.5 architecture (where the cpu backend's figures come from), any GPU.
    cost = BackendCost(fixed=420 * MiB, weights=2.15, activations=1.4, session=32 * MiB)

    def __init__(self, core=None, version=None, memory=None, cores=None, environ=None):
        self._make_core = core or _core
        self._version = version or _version
        self._memory = memory or host.memory
        self._cores = cores or host.cores
        self._environ = os.environ if environ is None else environ
        self._core = None

    def core(self):
        """One openvino.Core for the probe and every session: it loads each device's plugin once."""
        if self._core is None:
            self._core = self._make_core()
        return self._core

    def probe(self) -> Device | Unavailable:
        try:
            core = self.core()
            names = list(core.available_devices)
        except ImportError:
            return Unavailable(self.name, MISSING)
        except Exception as e:  # a broken install or driver: say so, never raise from a probe
            return Unavailable(self.name, f"OpenVINO {self._version()} could not list its devices ({reason(e)})")
        found, notes = [], []
        for device in names:
            try:
                found.append(_read(core, device))
            except Exception as e:
                notes.append(f"{device}: OpenVINO could not read its properties ({reason(e)})")
        usable = sorted((f for f in found if _rank(f.family, f.kind) is not None),
                        key=lambda f: (_rank(f.family, f.kind), -(f.memory or 0)))
        wanted = self._environ.get(DEVICE_ENV, "").strip()
        if wanted:
            chosen = next((f for f in found if f.device == wanted), None)
            if chosen is None:
                return Unavailable(self.name, f"{DEVICE_ENV}={wanted}, but OpenVINO's devices here are "
                                              f"{', '.join(names) or 'none'}")
        elif usable:
            chosen = usable[0]
        else:
            return Unavailable(self.name, f"OpenVINO sees no CPU or GPU to run on (its devices: "
                                          f"{', '.join(names) or 'none'})")
        for f in found:
            if f is chosen:
                continue
            if f.family == "NPU":
                notes.append(f"also: {f.device} ({f.name}), not used: OpenVINO's NPU runs static fp16 graphs "
                             "and SD is untested on it")
            else:
                notes.append(f"also: {f.device} ({f.name}): {DEVICE_ENV}={f.device} to use it")
        return self._device(chosen, notes)

    def _device(self, f: _Found, notes: list[str]) -> Device:
        total, free = self._memory()
        common = dict(fp16="FP16" in f.capabilities, bf16="BF16" in f.capabilities,
                      driver=f"OpenVINO {self._version()}", providers=(PROVIDER + f.device,))
        if f.family == "CPU":
            cores = self._cores()
            return Device(self.name, f"{f.name} ({cores} cores)", total_memory=total, free_memory=free,
                          unified_memory=True, cores=cores, **common,
                          notes=tuple(notes) + (() if total else ("host memory unknown on this OS",)))
        if f.kind == "integrated":
            # An iGPU allocates from the host's memory: what is free there is what it can have, up to the
            # size its driver lets it address.
            gpu_total = f.memory or total
            gpu_free = None if free is None else (min(free, gpu_total) if gpu_total else free)
            return Device(self.name, f.name, total_memory=gpu_total, free_memory=gpu_free, unified_memory=True,
                          **common, notes=tuple(notes))
        return Device(self.name, f.name, total_memory=f.memory, free_memory=None, **common,
                      notes=tuple(notes) + ("free memory unknown: OpenVINO does not report it",))

    def open(self, path: Path, spec: ComponentSpec, device: Device, memory_limit: int | None = None,
             overrides: Overrides | None = None, dtype: str = "fp32", precision: str = "f32") -> OpenVinoSession:
        """`dtype` needs nothing here (OpenVINO computes in `precision` whatever the graph's dtype);
        `memory_limit` neither: OpenVINO has no cap on its allocations, the plan's prediction is the guard."""
        if precision not in PRECISIONS:
            raise EdgediffError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
        if precision == "bf16" and not device.bf16:
            # f32 gives the exact picture at the speed this device has; refusing would fail the generation
            # for an arithmetic the device lacks (a plan made for another device, or a moved component)
            log.warning("%s is not fast at bf16; running the %s in f32", device.name, spec.name)
            precision = "f32"
        try:
            core = self.core()
        except ImportError:
            raise EdgediffError(MISSING) from None
        name = device_name(device)
        # Models compile at their first call, when their shapes are known, which is past the point where
        # open_with_fallback could move the component: a device gone since the probe is caught here.
        try:
            core.get_property(name, "FULL_DEVICE_NAME")
        except Exception as e:
            raise EdgediffError(f"OpenVINO cannot use {name} here ({reason(e)})") from None
        # LoRAs: no cache. Each compiled model in it carries its weights (as large as the component's file),
        # so every LoRA mix would leave another copy on disk; compiling again is the cheaper price.
        cache = None if overrides else cache_root() / "openvino"
        return OpenVinoSession(core, path, spec, name, compile_config(device, precision, cache),
                               overrides=overrides, version=self._version())


BACKEND = OpenVinoBackend()
