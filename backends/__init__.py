"""The backend registry: one table, highest priority first, the CPU as the fallback.

`select("auto")` takes the first backend that runs here, and the CPU always does, so the CPU ends what
`auto` chooses from. The backends after it are opt-in, run only when asked for by name: OpenVINO runs
on the same CPU (or an Intel GPU) as the cpu backend, faster or not depending on the CPU and the model,
and its first run of each shape compiles for seconds to minutes, which `auto` should not spring on
anyone; `--backend openvino` asks for it.

Each backend lives in its own subpackage and is imported only when probed, so a missing
onnxruntime-gpu, amdsmi, coremltools or openvino never breaks `import edgediff` (tinygrad's device.py
does the same). `select` is the only place that chooses among them; `open_with_fallback` the only place
that moves a component to another backend when its own fails.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from ..engine.components import ComponentSpec
from ..engine.errors import EdgediffError
from .base import Backend, Device, MissingComponent, Session, Unavailable, first_line

log = logging.getLogger("edgediff")

# name -> module that defines BACKEND; order is priority.
REGISTRY: dict[str, str] = {
    "cuda": "edgediff.backends.cuda",
    "rocm": "edgediff.backends.rocm",
    "coreml": "edgediff.backends.coreml",
    "cpu": "edgediff.backends.cpu",
    "openvino": "edgediff.backends.openvino",  # opt-in: after the cpu, which `auto` always finds first
}
FALLBACK = "cpu"  # where a component goes when its backend cannot open it, if nothing before it could


def automatic() -> list[str]:
    """The backends `auto` chooses among, in priority order: the registry up to the CPU."""
    names = list(REGISTRY)
    return names[:names.index(FALLBACK) + 1]


def get_backend(name: str) -> Backend:
    if name not in REGISTRY:
        raise EdgediffError(f"unknown backend {name!r}; use one of: auto, {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name]).BACKEND


def probe(name: str) -> Device | Unavailable:
    try:
        return get_backend(name).probe()
    except Exception as e:  # a broken driver package must not stop the others from being probed
        return Unavailable(name, f"probe failed: {type(e).__name__}: {e}")


def probe_all() -> list[Device | Unavailable]:
    """Every backend's probe, in priority order."""
    return [probe(name) for name in REGISTRY]


def select(preferred: str = "auto") -> tuple[Backend, Device]:
    """The backend to run on: the one asked for, or the first available in priority order."""
    if preferred != "auto":
        backend = get_backend(preferred)
        found = backend.probe()
        if isinstance(found, Unavailable):
            raise EdgediffError(f"backend {preferred!r} is not available here: {found.reason}")
        return backend, found
    # the opt-in backends are not even probed: OpenVINO's probe starts every plugin it has (GPU drivers too)
    for name in automatic():
        found = probe(name)
        if isinstance(found, Device):
            return get_backend(name), found
        log.debug("backend %s unavailable: %s", found.backend, found.reason)
    raise EdgediffError("no backend is available, not even the CPU; is onnxruntime installed?")


def open_with_fallback(path: Path, spec: ComponentSpec, backend: Backend, device: Device,
                       memory_limit: int | None = None,
                       fallbacks: list[Backend] | None = None,
                       overrides=None, dtype: str = "fp32",
                       precision: str = "f32") -> tuple[Session, Backend, Device]:
    """Open `spec` on `backend`; if that fails (a provider that cannot start, a driver that refuses the
    graph), try the backends after it among those `auto` chooses from that are available here, with a
    warning naming the backend and the reason. Returns the session, the backend that took it and its
    device. An opt-in backend (after the CPU in the registry: openvino) falls back to the CPU alone.

    `fallbacks` replaces the registry's backends after `backend` (tests inject one whose open raises).
    `memory_limit` was sized for `device`; it is passed on unchanged (the CPU backend ignores it).
    `overrides` (backends/base.Overrides): weights that replace exported ones, for every candidate;
    `dtype`: the graph's, as the model folder records it; `precision`: the plan's ("f32" or "bf16"),
    passed to every candidate (those that run the graph's own dtype ignore it).
    A missing file is not the backend's fault and is raised at once; when every backend fails, the first
    (the chosen backend's) error is raised.
    """
    if fallbacks is None:
        names = automatic()
        later = names[names.index(backend.name) + 1:] if backend.name in names else [FALLBACK]
        fallbacks = [get_backend(name) for name in later]
    first = failed = reason = None
    for candidate in [backend, *fallbacks]:
        if candidate is backend:
            found = device
        else:
            try:
                found = candidate.probe()
            except Exception as e:  # probes should not raise; a broken one must not hide the others
                found = Unavailable(candidate.name, f"probe failed: {first_line(e)}")
            if isinstance(found, Unavailable):
                log.debug("backend %s unavailable: %s", found.backend, found.reason)
                continue
            log.warning("%s could not open the %s (%s); running it on %s instead", failed, spec.name, reason,
                        candidate.name)
        try:
            return candidate.open(path, spec, found, memory_limit, overrides, dtype, precision), candidate, found
        except MissingComponent:
            raise
        except Exception as e:
            first = first or e
            failed, reason = candidate.name, first_line(e)
    if isinstance(first, EdgediffError):
        raise first
    raise EdgediffError(f"{backend.name} could not open the {spec.name}: {first_line(first)}") from first
