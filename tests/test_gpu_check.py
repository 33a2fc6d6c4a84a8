"""bench/gpu_check.py where there is no NVIDIA GPU: one line that says why, exit status 3, and nothing
installed, exported or written. The machine is made GPU-less whatever runs the test: PATH holds no
nvidia-smi but the stand-ins below, and a pynvml that cannot be imported shadows any installed one.
What is not run here: everything the check does on a GPU (its docstring lists it)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

import pytest

from edgediff.bench import gpu_check

# What nvidia-smi -L says where it cannot check a GPU, as (stdout, exit status)
DRIVER_NOT_LOADED = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure "
                     "that the latest NVIDIA driver is installed and running.", 9)
NO_DEVICES = ("No devices were found", 6)


def nvidia_smi(folder, said, status):
    """A stand-in nvidia-smi on `folder` that prints the lines `said` and exits with `status`."""
    folder.mkdir(exist_ok=True)
    smi = folder / "nvidia-smi"
    lines = "".join(f"echo {shlex.quote(line)}\n" for line in said.splitlines())
    smi.write_text(f"#!/bin/sh\n{lines}exit {status}\n")
    smi.chmod(0o755)


def run_check(tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "pynvml.py").write_text("raise ImportError('no NVML on this simulated machine')\n")
    env = {**os.environ, "PATH": str(tmp_path / "bin"), "PYTHONPATH": str(shadow),
           "EDGEDIFF_CACHE": str(tmp_path / "cache")}
    begin = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "edgediff.bench.gpu_check", "--out", str(tmp_path / "check.json"),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    return done, time.monotonic() - begin


@pytest.mark.parametrize("smi, why", [
    (None, "nvidia-smi is not on PATH and nvidia-ml-py (pynvml) is not installed"),
    (DRIVER_NOT_LOADED, f"nvidia-smi -L lists none ({DRIVER_NOT_LOADED[0]})"),
    (NO_DEVICES, "nvidia-smi -L lists none (No devices were found)"),
])
def test_no_gpu_is_one_line_and_nothing_is_installed(tmp_path, smi, why):
    if smi:
        nvidia_smi(tmp_path / "bin", *smi)
    done, seconds = run_check(tmp_path)
    assert done.returncode == gpu_check.NO_GPU == 3
    assert (done.stdout + done.stderr).splitlines() == [
        f"gpu_check: no NVIDIA GPU here: {why}; nothing was installed, exported or run"]
    # no venv, no export, no report: what is there is what the test made
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["shadow"] + (["bin"] if smi else []))
    assert seconds < 60  # the import and one nvidia-smi call; an install or an export takes minutes


def test_gpus_are_read_from_nvidia_smi(tmp_path, monkeypatch):
    nvidia_smi(tmp_path, "GPU 0: NVIDIA H200 (UUID: GPU-3f1c)\nGPU 1: NVIDIA H200 (UUID: GPU-77aa)", 0)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_check.find_gpus() == (
        ["GPU 0: NVIDIA H200 (UUID: GPU-3f1c)", "GPU 1: NVIDIA H200 (UUID: GPU-77aa)"], None)
