"""Shared fixtures: tiny Stable Diffusion models built with diffusers' real classes, exported once per
test session. Nothing here downloads anything."""

from __future__ import annotations

import os

import pytest

# PyTorch on one thread, here and in every process the tests start (set before anything imports torch).
# The tests' models are tiny, and on the 2-core CI machine a tiny UNet call took 1.7 s with PyTorch's
# two OpenMP threads and 21 ms with one: each of its ~150 kernels of microseconds waited milliseconds
# for the second thread to wake. (ONNX Runtime keeps its own pool; edgediff sets its threads itself.)
# Measured with the tiny SD 1.x UNet, 8x8 latents, batch 2; a user's full-size export keeps all cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from edgediff.builtin.random_model import TinySpec, build_random_model


class TinyModels:
    def __init__(self, root):
        self.root = root
        self._built: dict[str, tuple] = {}

    def __call__(self, kind: str):
        """(diffusers folder, exported ONNX folder) of a tiny model: "sd1", "sd2" or "inpaint"."""
        if kind not in self._built:
            from edgediff.export.onnx_export import export_onnx

            src = build_random_model(self.root / f"{kind}-diffusers", TinySpec(kind=kind, seed=1))
            onnx = self.root / f"{kind}-onnx"
            export_onnx(src, onnx)
            self._built[kind] = (src, onnx)
        return self._built[kind]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Exports the tests cause go to a cache of their own, never the user's."""
    import os

    old = os.environ.get("EDGEDIFF_CACHE")
    os.environ["EDGEDIFF_CACHE"] = str(tmp_path_factory.mktemp("edgediff-cache"))
    yield
    if old is None:
        os.environ.pop("EDGEDIFF_CACHE", None)
    else:
        os.environ["EDGEDIFF_CACHE"] = old


@pytest.fixture(scope="session")
def builtin_model(private_cache):
    """The built-in model exported once for the whole session (about 8 s) into the private cache: every
    test that needs a real, trained model shares this folder. Tests that damage a model copy it first."""
    from edgediff.export.sources import ensure_exported

    return ensure_exported("builtin")
