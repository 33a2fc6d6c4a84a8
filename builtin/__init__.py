"""The built-in model: made on first use, then cached, so the demo and `--model builtin` run offline.

For now it is a tiny SD 1.x-shaped model with random weights (builtin/random_model.py), which draws
noise; a trained one replaces it in issue 3. Building and exporting it needs the `export` extra (torch);
once cached, running it does not.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..engine.errors import EdgediffError

log = logging.getLogger("edgediff")

BUILTIN_VERSION = "random-sd1-v1"  # bump when the recipe changes, so old caches are not reused


def cache_root() -> Path:
    import os

    from platformdirs import user_cache_dir

    return Path(os.environ.get("EDGEDIFF_CACHE") or user_cache_dir("edgediff")) / "builtin" / BUILTIN_VERSION


def ensure_builtin() -> Path:
    """The exported built-in model folder, building and exporting it the first time."""
    root = cache_root()
    onnx = root / "onnx"
    if (onnx / "edgediff_export.json").is_file():
        return onnx
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        raise EdgediffError("the built-in model is built on first use with torch and diffusers: "
                            "pip install 'edgediff[export]' (or run ./dev demo)") from None
    from ..export.onnx_export import export_onnx
    from .random_model import TinySpec, build_random_model

    log.info("building the built-in model in %s (first run only)", root)
    root.mkdir(parents=True, exist_ok=True)
    source = build_random_model(root / "diffusers", TinySpec(kind="sd1", seed=0))
    export_onnx(source, onnx, overwrite=True, name="builtin")
    return onnx
