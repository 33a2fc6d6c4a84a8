"""Facts about the host machine that more than one backend reads: memory, cores, the OS.

Memory comes from psutil, which reads each platform's own counters; the backends take it as an injected
function, so tests describe an 8 GB M1 or PC on any machine. Nothing here raises: what cannot be read is
None.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import psutil


def run_command(args: list[str]) -> str | None:
    """stdout of a short system command, or None when it is missing or fails."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def read_text(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def cores() -> int:
    # The cores this process may run on (containers and taskset restrict them), not the machine's.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call in the stdlib
        return os.cpu_count() or 1


def os_version(system: str | None = None) -> str:
    system = system or platform.system()
    if system == "Darwin":
        return f"macOS {platform.mac_ver()[0]}"
    return f"{system} {platform.release()}".strip()


# The x86 extensions that decide how ONNX Runtime's int8 (U8S8) kernels compute, best first: AMX tiles,
# VNNI dot products (AVX-512 or AVX), or AVX2's pmaddubsw, whose int16 sums of u8 x s8 pairs can
# saturate, so a UNet quantized and gated on a VNNI machine loses picture on an AVX2-only one (measured
# in issue 15: 42.5 dB at export on an AMX Xeon, 29.6 dB on an AVX2-only EPYC).
INT8_KERNELS = (("amx_int8", "amx"), ("avx512_vnni", "vnni"), ("avx_vnni", "vnni"), ("avx2", "avx2"))


def int8_kernels(cpuinfo: str | None = None) -> str | None:
    """Which int8 kernels ONNX Runtime runs on this CPU ("amx", "vnni", "avx2" or "other"), from the
    flags /proc/cpuinfo lists; None where they cannot be read (not Linux)."""
    text = read_text("/proc/cpuinfo") if cpuinfo is None else cpuinfo
    flags = next((set(line.split(":", 1)[1].split()) for line in (text or "").splitlines()
                  if line.startswith("flags")), None)
    if flags is None:
        return None
    return next((kind for flag, kind in INT8_KERNELS if flag in flags), "other")


def memory() -> tuple[int | None, int | None]:
    """Total and available bytes of the host's memory, from psutil: on Linux MemAvailable, the kernel's own
    estimate of what can be allocated without swapping (free + reclaimable page cache), not MemFree; on
    macOS free + inactive pages, Activity Monitor's "available"; on Windows GlobalMemoryStatusEx."""
    try:
        found = psutil.virtual_memory()
    except (OSError, RuntimeError, NotImplementedError):  # a platform or a sandbox psutil cannot read
        return None, None
    return int(found.total), int(found.available)


def peak_rss(pid: int | str = "self") -> int | None:
    """A process's peak resident memory (VmHWM, bytes) on Linux, else None: since its start or the last
    reset (writing 5 to /proc/PID/clear_refs). Read by hand: psutil has no peak on Linux or macOS (only
    Windows' peak_wset), and no reset of one anywhere, which is what a per-generation peak needs."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


_MALLOPT_DONE = False
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20


def return_freed_memory() -> bool:
    """Have glibc give every allocation of 1 MB or more its own mapping, returned to the system when
    freed. By default glibc raises that threshold as large blocks are freed, up to 32 MB, so the many
    8-32 MB tensors of a VAE decode end up in the heap, where freed ones stay resident: measured with
    the SD 1.5 VAE decoder at 192x192 (no ONNX Runtime arena), 475 MB peak by default, 115 MB with the
    threshold fixed (its graph's live tensors: 144 MB). Linux with glibc only; True when set."""
    global _MALLOPT_DONE
    if _MALLOPT_DONE:
        return True
    if platform.system() != "Linux":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        _MALLOPT_DONE = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # musl and others: no mallopt, nothing to do
        return False
    return _MALLOPT_DONE
