"""CPU backend: ONNX Runtime's CPU execution provider, the fallback that always runs."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from ...engine.components import ComponentSpec
from ..base import Device, OrtSession, Unavailable


def _cores() -> int:
    # The cores this process may run on (containers and taskset restrict them), not the machine's.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _memory() -> tuple[int | None, int | None]:
    """Total and available host memory in bytes, from /proc/meminfo where there is one."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        kib = lambda key: int(fields[key].split()[0]) * 1024  # noqa: E731
        return kib("MemTotal"), kib("MemAvailable")
    except (OSError, KeyError, ValueError):
        return None, None


class CpuBackend:
    name = "cpu"

    def probe(self) -> Device | Unavailable:
        try:
            import onnxruntime as ort
        except ImportError:
            return Unavailable(self.name, "onnxruntime is not installed (pip install onnxruntime)")
        if "CPUExecutionProvider" not in ort.get_available_providers():
            return Unavailable(self.name, "this onnxruntime build has no CPU execution provider")
        total, free = _memory()
        name = _cpu_name()
        return Device(self.name, f"{name} ({_cores()} cores)", ("CPUExecutionProvider",),
                      total_memory=total, free_memory=free, unified_memory=True)

    def open(self, path: Path, spec: ComponentSpec, device: Device) -> OrtSession:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # One thread per core we may use: more threads than cores only adds contention.
        options.intra_op_num_threads = _cores()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: ORT's warnings are about its internals
        return OrtSession(path, spec, ["CPUExecutionProvider"], options)


BACKEND = CpuBackend()
