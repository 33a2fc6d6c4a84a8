"""Writing a folder so that nothing half-written ever looks complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(out: str | Path):
    """Yield a temporary folder beside `out`; when the block ends without an error, rename it to `out`
    (replacing what was there: callers decide first whether they may), otherwise delete it. Beside, not
    in /tmp, so the rename stays on one disk and cannot half-happen."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
