"""Writing files and folders so that nothing half-written ever looks complete, or stays behind.

Everything edgediff writes goes first to a temporary name beside its destination, made by
`partial_prefix`, and is renamed when complete. An interrupted run (Ctrl-C, SIGTERM: the command turns
both into KeyboardInterrupt) deletes its temporary on the way out; one that could not (SIGKILL, power
loss) leaves it, and the next run that writes in the same folder sweeps it (`sweep_partials`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import EdgediffError

log = logging.getLogger("edgediff")

# `.{name}.partial-{host}-{pid}-{random}`: the host has no "-" (_host) and tempfile's random tail has
# none either (letters, digits, "_"), so the last two dashes delimit the pid whatever the name holds.
_PARTIAL = re.compile(r"^\..+\.partial-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+$")


def cache_root() -> Path:
    """edgediff's cache folder: EDGEDIFF_CACHE, else the platform's user cache folder. Exports of sources
    (export/sources.py), compiled engines (backends) and the benchmark's models live under it."""
    from platformdirs import user_cache_dir

    return Path(os.environ.get("EDGEDIFF_CACHE") or user_cache_dir("edgediff"))


def partial_prefix(name: str) -> str:
    """The prefix of a temporary file or folder that becomes `name` (or holds scratch work for it).

    It carries the writer's host and process id, so that a later run can tell what a dead process left
    from what a live one is still writing: a pid alone is not enough where a folder is shared between
    machines (a network disk) or between containers (each with its own pid numbers, usually its own
    host name); an age threshold would not do either, since an export can spend many minutes inside a
    subfolder without touching the top one."""
    return f".{name}.partial-{_host()}-{os.getpid()}-"


def sweep_partials(folder: str | Path) -> None:
    """Delete the temporaries that earlier runs on this machine left in `folder` when they were killed:
    those whose process is gone. Others' (another machine's, a live process') are left alone."""
    try:
        entries = list(os.scandir(folder))
    except OSError:  # absent or unreadable: nothing of ours can be there
        return
    for entry in entries:
        m = _PARTIAL.match(entry.name)
        if not m or m["host"] != _host() or _alive(int(m["pid"])):
            continue
        log.debug("removing %s, left by an earlier run that was killed (process %s)", entry.path, m["pid"])
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError as e:  # a leftover we cannot remove costs disk space, not this run
            log.debug("could not remove %s: %s", entry.path, e)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine. A pid that a new process reuses keeps its leftovers
    until that process ends: the safe side."""
    if os.name == "nt":  # os.kill(pid, 0) terminates the process on Windows: sweep nothing there
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        return True
    return True


@contextmanager
def scratch_folder(parent: str | Path, name: str):
    """A private folder in `parent` for work towards `name`, deleted when the block ends, however it ends."""
    sweep_partials(parent)
    tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(name), dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_folder(out: str | Path):
    """Yield a temporary folder beside `out`; when the block ends without an error, rename it to `out`
    (replacing what was there: callers decide first whether they may, with `check_out`), otherwise
    delete it. Beside, not in /tmp, so the rename stays on one disk and cannot half-happen."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with scratch_folder(out.parent, out.name) as tmp:
        yield tmp
        os.chmod(tmp, 0o755 & ~umask())  # mkdtemp makes it private; the result is an ordinary folder
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)


def check_out(out: Path, force: bool, folder: bool = False) -> None:
    """The policy for everything the command writes (`export --out`, each PNG of `generate --out`),
    decided before any work starts so that a wrong --out costs nothing: a path of the wrong kind is
    refused; one that already holds something is replaced only with --force; a folder that cannot be
    created or written to is refused."""
    if folder and out.is_file():
        raise EdgediffError(f"{out} is a file; --out must name a folder")
    if not folder and out.is_dir():
        raise EdgediffError(f"{out} is a folder; --out must name a file")
    if not force and (out.is_dir() and any(out.iterdir()) if folder else out.exists()):
        # edgediff.json: the manifest every export writes (export/onnx_export.MANIFEST)
        what = "exists" if not folder else "holds an edgediff export" if (out / "edgediff.json").is_file() \
            else f"holds {sum(1 for _ in out.iterdir())} other entries (e.g. {next(out.iterdir()).name})"
        raise EdgediffError(f"{out} already {what}; choose another --out or pass --force to replace it")
    _check_writable(out)


def _check_writable(out: Path) -> None:
    """Refuse an output whose folder cannot be created (a file stands in its path) or written to."""
    folder = out.absolute().parent
    while not folder.exists() and folder != folder.parent:  # the nearest that exists: mkdir starts there
        folder = folder.parent
    if not folder.is_dir():
        raise EdgediffError(f"cannot write {out}: {folder} is a file, not a folder; choose another --out")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EdgediffError(f"cannot write {out}: no permission to write in {folder}; choose another --out")


def umask() -> int:
    """The process' umask (os.umask can only read it by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
