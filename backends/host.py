"""Facts about the host machine that more than one backend reads: memory, cores, macOS's counters.

Every function takes the text it parses (or a command runner) as an argument, so tests feed it an M1's
`vm_stat` or an 8 GB PC's /proc/meminfo. Nothing here raises: what cannot be read is None.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path


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


def parse_meminfo(text: str | None) -> tuple[int | None, int | None]:
    """Total and available bytes from Linux's /proc/meminfo. MemAvailable is the kernel's own estimate of
    what can be allocated without swapping (free + reclaimable page cache), not MemFree."""
    if not text:
        return None, None
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if value.split() and value.split()[0].isdigit():
            fields[key.strip()] = int(value.split()[0]) * 1024  # kB
    return fields.get("MemTotal"), fields.get("MemAvailable")


def parse_vm_stat(text: str | None) -> int | None:
    """Bytes macOS can hand out without swapping, from `vm_stat`: free + inactive + speculative pages, the
    "available" of Activity Monitor. The page size is in the header (16 KiB on Apple Silicon)."""
    if not text:
        return None
    size = re.search(r"page size of (\d+) bytes", text)
    pages = dict(re.findall(r'^"?Pages ([a-z ]+)"?:\s+(\d+)\.', text, re.M))
    if not size or not {"free", "inactive", "speculative"} <= set(pages):
        return None
    return int(size.group(1)) * sum(int(pages[k]) for k in ("free", "inactive", "speculative"))


def mac_memory(run=run_command) -> tuple[int | None, int | None]:
    """Total (sysctl hw.memsize) and available (vm_stat) memory of a Mac."""
    total = run(["sysctl", "-n", "hw.memsize"])
    total = int(total.strip()) if total and total.strip().isdigit() else None
    return total, parse_vm_stat(run(["vm_stat"]))


def windows_memory() -> tuple[int | None, int | None]:
    """Total and available physical memory through kernel32's GlobalMemoryStatusEx (stdlib ctypes)."""
    import ctypes

    class MemoryStatus(ctypes.Structure):
        _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                    ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                    ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                    ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                    ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

    status = MemoryStatus()
    status.dwLength = ctypes.sizeof(MemoryStatus)
    try:
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
            return int(status.ullTotalPhys), int(status.ullAvailPhys)
    except (AttributeError, OSError):
        pass
    return None, None


def sysconf_total() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def peak_rss(pid: int | str = "self") -> int | None:
    """A process's peak resident memory (VmHWM, bytes) on Linux, else None: since its start or the last
    reset (writing 5 to /proc/PID/clear_refs)."""
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
