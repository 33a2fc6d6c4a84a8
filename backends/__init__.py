"""The backend registry: one table, highest priority first, CPU last as the fallback.

Each backend lives in its own subpackage and is imported only when probed, so a missing
onnxruntime-gpu, amdsmi or coremltools never breaks `import edgediff` (tinygrad's device.py does the
same). `select` is the only place that chooses among them.
"""

from __future__ import annotations

import importlib
import logging

from ..engine.errors import EdgediffError
from .base import Backend, Device, Unavailable

log = logging.getLogger("edgediff")

# name -> module that defines BACKEND; order is priority.
REGISTRY: dict[str, str] = {
    "cuda": "edgediff.backends.cuda",
    "rocm": "edgediff.backends.rocm",
    "coreml": "edgediff.backends.coreml",
    "cpu": "edgediff.backends.cpu",
}


def get_backend(name: str) -> Backend:
    if name not in REGISTRY:
        raise EdgediffError(f"unknown backend {name!r}; use one of: auto, {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name]).BACKEND


def probe_all() -> list[Device | Unavailable]:
    """Every backend's probe, in priority order."""
    results = []
    for name in REGISTRY:
        try:
            results.append(get_backend(name).probe())
        except Exception as e:  # a broken driver package must not stop the others from being probed
            results.append(Unavailable(name, f"probe failed: {type(e).__name__}: {e}"))
    return results


def select(preferred: str = "auto") -> tuple[Backend, Device]:
    """The backend to run on: the one asked for, or the first available in priority order."""
    if preferred != "auto":
        backend = get_backend(preferred)
        found = backend.probe()
        if isinstance(found, Unavailable):
            raise EdgediffError(f"backend {preferred!r} is not available here: {found.reason}")
        return backend, found
    for found in probe_all():
        if isinstance(found, Device):
            return get_backend(found.backend), found
        log.debug("backend %s unavailable: %s", found.backend, found.reason)
    raise EdgediffError("no backend is available, not even the CPU; is onnxruntime installed?")
