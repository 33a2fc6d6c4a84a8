"""Nothing left behind: a run stopped by SIGTERM deletes what it had half-written, one killed outright
(SIGKILL) has its leftovers swept by the next run, and what is written gets the user's usual permissions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from PIL import Image

from edgediff.cli import EXIT_TERMINATED
from edgediff.engine.files import atomic_folder, partial_prefix
from edgediff.engine.images import save_png
from edgediff.export.sources import ensure_exported


@pytest.fixture(scope="module")
def builtin_onnx(private_cache):
    """The built-in model exported once for this module (about 8 s), in the tests' private cache."""
    return ensure_exported("builtin")


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


def start(folder, *argv):
    """`edgediff ...` in its own process, as a user runs it; stdout and stderr go to folder/log.txt."""
    log = folder / "log.txt"
    with log.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "edgediff.cli", *argv], cwd=folder, stdout=f,
                                stderr=subprocess.STDOUT)
    return proc, log


def wait_for(proc, log, condition, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"ended (status {proc.returncode}) before the signal:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"still waiting after {timeout} s:\n{log.read_text()}"
        time.sleep(0.05)


def terminate(proc, log):
    """SIGTERM, then the exit status; the run must say so in one line, without a traceback."""
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    text = log.read_text()
    assert "Traceback" not in text, text
    # the line's end: generate's progress bar is left open when the loop is interrupted (engine/pipeline.py)
    assert text.replace("\r", "\n").strip().splitlines()[-1].endswith("edgediff: terminated"), text
    assert text.count("edgediff: terminated") == 1, text
    return code


@pytest.mark.slow
def test_sigterm_during_export_leaves_nothing(tmp_path):
    proc, log = start(tmp_path, "export", "builtin", "--out", "X")
    try:
        def writing():  # the export's folder beside X exists and already holds a component
            return any(any(p.iterdir()) for p in tmp_path.glob(".X.partial-*") if p.is_dir())
        wait_for(proc, log, writing)
        assert terminate(proc, log) == EXIT_TERMINATED == 143
    finally:
        proc.kill()
    assert not (tmp_path / "X").exists()
    assert leftovers(tmp_path) == []  # neither the export's folder nor the source's scratch folder


def test_sigterm_during_generate_leaves_nothing(builtin_onnx, tmp_path):
    proc, log = start(tmp_path, "generate", "a red circle on a blue background", "--model", str(builtin_onnx),
                      "--steps", "1000", "--out", "out.png")  # about 10 s of denoising: time to signal it
    try:
        wait_for(proc, log, lambda: "denoising" in log.read_text())  # the progress bar: it has started
        assert terminate(proc, log) == EXIT_TERMINATED
    finally:
        proc.kill()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt"]


def test_interrupted_png_write_removes_its_temporary(tmp_path, monkeypatch):
    """The PNG's own window: Ctrl-C or SIGTERM (both KeyboardInterrupt) while the bytes are written."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_png(Image.new("RGB", (8, 8)), tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []


# A run killed outright: SIGKILL while it writes an export folder, its source's scratch folder and a PNG.
KILLED_RUN = """
import os, signal, sys
from pathlib import Path
from PIL import Image
from edgediff.engine.files import atomic_folder, scratch_folder
from edgediff.engine.images import save_png

folder = Path(sys.argv[1])
def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
with atomic_folder(folder / "X") as tmp, scratch_folder(folder, "edgediff-src"):
    (tmp / "unet").mkdir()
    Image.Image.save = killed
    save_png(Image.new("RGB", (8, 8)), folder / "out.png")
"""


def next_run_writes_png(folder):
    save_png(Image.new("RGB", (8, 8)), folder / "next.png")


def next_run_exports(folder):
    with atomic_folder(folder / "next"):  # every export's folder, ONNX, Core ML or converted checkpoint
        pass


@pytest.mark.parametrize("next_run", [next_run_writes_png, next_run_exports])
def test_what_a_killed_run_left_is_swept_by_the_next(tmp_path, next_run):
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tmp_path)])
    assert killed.returncode == -signal.SIGKILL
    stale = leftovers(tmp_path)
    assert [name.split(".partial-")[0] for name in stale] == [".X", ".edgediff-src", ".out.png"]
    # what must survive: a run still writing (this process), another machine's on a shared disk, and
    # a name that only looks like ours
    live = tempfile.mkdtemp(prefix=partial_prefix("live"), dir=tmp_path)
    dead = stale[0].rsplit("-", 2)[1]  # the killed run's pid
    (tmp_path / f".other.partial-elsewhere-{dead}-abcd1234").mkdir()
    (tmp_path / ".notes.partial-draft").write_text("mine")
    kept = set(leftovers(tmp_path)) - set(stale)

    next_run(tmp_path)
    assert set(leftovers(tmp_path)) == kept
    assert os.path.basename(live) in kept


def test_the_cache_is_swept_when_a_cached_export_is_reused(builtin_onnx, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDIFF_CACHE", str(tmp_path / "cache"))
    models = tmp_path / "cache" / "models"
    models.mkdir(parents=True)
    (models / builtin_onnx.name).symlink_to(builtin_onnx)  # the export is there: nothing to export
    assert subprocess.run([sys.executable, "-c", KILLED_RUN, str(models)]).returncode == -signal.SIGKILL
    assert len(leftovers(models)) == 3
    assert ensure_exported("builtin") == models / builtin_onnx.name
    assert leftovers(models) == []


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_pngs_get_the_users_usual_permissions(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        path = save_png(Image.new("RGB", (8, 8)), tmp_path / "out.png")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode
