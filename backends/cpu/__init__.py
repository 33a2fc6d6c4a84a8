"""CPU backend: ONNX Runtime's CPU execution provider, the fallback that always runs.

Memory is the host's, as psutil reads it (backends/host.py). Threads: one per core this process may use.
"""

from __future__ import annotations

import platform
from pathlib import Path

from ...engine.components import ComponentSpec
from .. import host
from ..base import BackendCost, Device, MiB, OrtSession, Overrides, Unavailable, session_options


def _cpu_name(system: str, run) -> str:
    if system == "Linux":
        for line in (host.read_text("/proc/cpuinfo") or "").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    elif system == "Darwin":
        brand = run(["sysctl", "-n", "machdep.cpu.brand_string"])
        if brand and brand.strip():
            return brand.strip()
    return platform.processor() or platform.machine() or "CPU"


ARENA_COMPONENTS = ("text_encoder", "unet", "unet_shallow")  # the shallow UNet: the UNet's calls, smaller


class CpuBackend:
    """Probe inputs, each injectable: `available_providers()`, `system()` ("Linux", "Darwin", "Windows"),
    `memory() -> (total, available)` in bytes, `run(args) -> stdout | None` (sysctl), `cores()`,
    `cpu_name()`."""

    name = "cpu"
    host = True
    # Measured on the 2-core CI machine with the full-size SD 1.5 architecture, fp32, one step
    # (`python -m edgediff.bench.plan_memory`): with factors 1.0 the predictions came out 2.4% (256 px,
    # resident), 7.4% (512, resident) and 8.2% (512, streamed-lean) under the measured peaks, the gap
    # growing with the activations (the allocator's slack around large tensors) and a little with the
    # weights (the session's copies of small initializers).
    cost = BackendCost(fixed=350 * MiB, weights=1.03, activations=1.2, session=32 * MiB)

    def __init__(self, available_providers=None, system=None, memory=None, run=None, cores=None,
                 cpu_name=None):
        self._available = available_providers
        self._system = system or platform.system
        self._memory = memory or host.memory
        self._run = run or host.run_command
        self._cores = cores or host.cores
        self._cpu_name = cpu_name

    def _available_providers(self) -> list[str] | None:
        if self._available is not None:
            return list(self._available())
        try:
            import onnxruntime as ort
        except ImportError:
            return None
        return ort.get_available_providers()

    def probe(self) -> Device | Unavailable:
        providers = self._available_providers()
        if providers is None:
            return Unavailable(self.name, "onnxruntime is not installed (pip install onnxruntime)")
        if "CPUExecutionProvider" not in providers:
            return Unavailable(self.name, "this onnxruntime build has no CPU execution provider")
        system = self._system()
        total, free = self._memory()
        cores = self._cores()
        name = self._cpu_name() if self._cpu_name else _cpu_name(system, self._run)
        return Device(self.name, f"{name} ({cores} cores)", ("CPUExecutionProvider",),
                      total_memory=total, free_memory=free, unified_memory=True,
                      # ORT's CPU kernels run most fp16 ops by casting to fp32 and back (MLAS has fp16
                      # GEMM/conv only on ARM64 with the FP16 extension), so fp16 saves memory, not time.
                      fp16=False, driver=host.os_version(system), cores=cores,
                      notes=() if total else ("host memory unknown on this OS",))

    def open(self, path: Path, spec: ComponentSpec, device: Device, memory_limit: int | None = None,
             overrides: Overrides | None = None, dtype: str = "fp32", precision: str = "f32") -> OrtSession:
        """`precision` is accepted and ignored: ONNX Runtime runs the graph's own dtype (its CPU provider
        has no bf16 kernels for SD's convolutions; OpenVINO's CPU has, backends/openvino)."""
        # memory_limit: ONNX Runtime has no cap on CPU memory; the plan's prediction is the guard here.
        options = session_options()
        # One thread per core we may use: more threads than cores only adds contention.
        options.intra_op_num_threads = device.cores or host.cores()
        options.inter_op_num_threads = 1
        # ONNX Runtime's arena where it pays, measured on SD 1.5 at 512x512 (2 cores): the int8 UNet runs
        # 3.05 s a call with it and 3.72 s without (first call 3.1 s against 7.1 s), at the same 1.28 GB
        # peak. The VAE's few huge activations are the opposite case: its decoder peaked at 2.30 GB with
        # the arena, which grows in powers of two and never shrinks, and 1.14 GB without (8.3 s a call
        # either way). Without an arena, glibc must return freed blocks: host.return_freed_memory.
        options.enable_cpu_mem_arena = spec.name in ARENA_COMPONENTS
        host.return_freed_memory()
        return OrtSession(path, spec, ["CPUExecutionProvider"], options, overrides=overrides)


BACKEND = CpuBackend()
