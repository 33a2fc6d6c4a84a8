"""Run a command in its own process and measure it: wall time and peak resident memory.

Each measured thing runs in a child process of its own, so one library's allocator arenas or caches
never count against another's. The peak is the child's own high-water mark (VmHWM in /proc/PID/status),
sampled every few milliseconds while it runs: `os.wait4`'s ru_maxrss is not usable for this, because
Linux carries the parent's resident size at fork into the child's figure across exec (measured: a
`python -c pass` child of a parent holding 2 GB reports 1.9 GB, with fork and with posix_spawn alike).
Where /proc is missing (macOS), ru_maxrss is the figure, with that caveat.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass

from ..backends.host import peak_rss

POLL_SECONDS = 0.005


@dataclass(frozen=True)
class Measured:
    seconds: float
    peak_rss_bytes: int
    returncode: int
    output: str

    @property
    def peak_gib(self) -> float:
        return self.peak_rss_bytes / 2**30


def run_measured(cmd: list[str], env: dict | None = None, cwd=None) -> Measured:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd, text=True)
    peak, done = [0], threading.Event()

    def sample():  # VmHWM only grows: the last reading before exit is the peak, give or take the last few ms
        while not done.is_set():
            hwm = peak_rss(proc.pid)
            if hwm is not None:
                peak[0] = max(peak[0], hwm)
            time.sleep(POLL_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.stdout.read()
    done.set()  # stdout closed: the child is exiting
    sampler.join()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss = peak[0] if os.path.isdir("/proc") else usage.ru_maxrss * 1024
    return Measured(time.perf_counter() - start, rss, proc.returncode, output)
