"""What machine a benchmark ran on, and an estimate of its CPU's arithmetic peak.

Everything is read, not imported: package versions come from their metadata (torch is never imported
here), GPUs from edgediff's own backend probes (backends/), the CPU from /proc/cpuinfo.

The peak is an estimate, and says so in the report. It is cores x clock x fp32 FLOPs per cycle per core,
where the FLOPs per cycle come from the widest vector FMA the CPU's flags announce and an assumed number
of FMA units. The flags cannot tell how many FMA units a core has (Intel's server Xeons have two 512-bit
units, several client and cloud parts one), nor the clock the cores really hold under an all-core vector
load (AVX-512 licence frequencies are below the nominal clock, turbo above it), so the figure is an
upper-bound guess, good for "the UNet reached about a third of what the silicon could do", not for more.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path

from ..backends import host

# fp32 FLOPs per cycle per core for the widest vector FMA the flags show: lanes x 2 (an FMA is a multiply
# and an add) x FMA units. The unit count is assumed (see the module's docstring).
FLOPS_PER_CYCLE = (  # (flag, FLOPs/cycle/core, what it assumes), widest first
    ("avx512f", 64, "AVX-512: 16 fp32 lanes x 2 (FMA) x 2 FMA units; parts with one 512-bit unit reach 32"),
    ("fma", 32, "AVX2 + FMA: 8 fp32 lanes x 2 (FMA) x 2 FMA units"),
    ("avx", 16, "AVX without FMA: 8 fp32 lanes, one add and one multiply unit"),
    ("sse2", 8, "SSE2: 4 fp32 lanes, one add and one multiply unit"),
    ("asimd", 16, "ARM NEON: 4 fp32 lanes x 2 (FMA) x 2 units (Apple's big cores have 4)"),
)
PACKAGES = ("edgediff", "onnxruntime", "onnxruntime-gpu", "numpy", "torch", "diffusers", "transformers")


def machine_facts() -> dict:
    """The machine, for the report: CPU, cores, RAM, GPUs and drivers, OS, package versions, CPU peak."""
    from ..backends import probe_all
    from ..backends.base import Device

    cpuinfo = host.read_text("/proc/cpuinfo") or ""
    total, available = host.memory()
    gpus, unavailable = [], {}
    for found in probe_all():
        if isinstance(found, Device):
            # a backend running on the host's cores (openvino's CPU device says how many) is not a GPU
            if found.backend != "cpu" and not found.cores:
                gpus.append({"backend": found.backend, "name": found.name, "driver": found.driver,
                             "memory_bytes": found.total_memory, "describe": found.describe()})
        else:
            unavailable[found.backend] = found.reason
    return {
        "cpu": cpu_name(cpuinfo),
        "cores": host.cores(),  # the cores this process may run on (ONNX Runtime uses one thread each)
        "logical_cpus": os.cpu_count(),
        "ram_bytes": total,
        "ram_available_bytes": available,
        "gpus": gpus,
        "backends_unavailable": unavailable,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": package_versions(),
        "cpu_peak": cpu_peak(cpuinfo, host.cores()),
        # other work on the machine when the benchmark started: on 2 cores, one busy process halves a result
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def cpu_name(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        if line.startswith(("model name", "Model")):  # x86; ARM boards say "Model"
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "CPU"


def package_versions() -> dict[str, str | None]:
    from .peers import versions

    return {**versions(PACKAGES), "python": sys.version.split()[0]}


def cpu_peak(cpuinfo: str, cores: int, sysfs: Path = Path("/sys/devices/system/cpu/cpu0/cpufreq")) -> dict:
    """The estimated fp32 peak of the cores this process may use: {"flops_per_s", and how it was got}.
    `flops_per_s` is None where the clock or the vector width cannot be read (macOS, Windows)."""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):  # x86; ARM
            flags = set(line.split(":", 1)[1].split())
            break
    isa = next(((flag, per, why) for flag, per, why in FLOPS_PER_CYCLE if flag in flags), None)
    hz, source = _clock(cpuinfo, sysfs)
    threads_per_core = _threads_per_core(cpuinfo)
    # Two hyperthreads of one core share its FMA units: count physical cores among those we may use.
    physical = max(1, cores // threads_per_core)
    estimate = physical * hz * isa[1] if isa and hz else None
    return {
        "flops_per_s": estimate,
        "cores": physical,
        "threads_per_core": threads_per_core,
        "clock_hz": hz,
        "clock_source": source,
        "flops_per_cycle_per_core": isa[1] if isa else None,
        "isa": isa[0] if isa else None,
        "assumes": isa[2] if isa else "no vector flags found",
        "note": "an estimate: the FMA unit count and the sustained all-core clock are assumed, not measured",
    }


def _clock(cpuinfo: str, sysfs: Path) -> tuple[float | None, str]:
    """The cores' clock in Hz: cpufreq's maximum where the kernel exposes it; else the nominal clock in
    the model name ("@ 2.20GHz"); else /proc/cpuinfo's current "cpu MHz" (a VM reports the host's)."""
    top = host.read_text(str(sysfs / "cpuinfo_max_freq"))
    if top and top.strip().isdigit():
        return int(top.strip()) * 1e3, "cpufreq cpuinfo_max_freq"
    nominal = re.search(r"@\s*([\d.]+)\s*GHz", cpu_name(cpuinfo))
    if nominal:
        return float(nominal.group(1)) * 1e9, "model name"
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)
    if mhz:
        return float(mhz.group(1)) * 1e6, "/proc/cpuinfo cpu MHz"
    return None, "unknown"


def _threads_per_core(cpuinfo: str) -> int:
    siblings = re.search(r"^siblings\s*:\s*(\d+)", cpuinfo, re.M)
    cores = re.search(r"^cpu cores\s*:\s*(\d+)", cpuinfo, re.M)
    if siblings and cores and int(cores.group(1)) > 0:
        return max(1, int(siblings.group(1)) // int(cores.group(1)))
    return 1
