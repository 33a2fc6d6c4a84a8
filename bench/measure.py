"""Run a command in its own process and measure it: wall time and peak resident memory.

Each measured thing runs in a child process of its own, so one library's allocator arenas or caches
never count against another's; `os.wait4` returns the kernel's own peak-RSS figure for that child
(and the grandchildren it waited for), which is what a user's task manager would have shown at worst.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass


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
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measured(time.perf_counter() - start, usage.ru_maxrss * 1024, proc.returncode, output)
