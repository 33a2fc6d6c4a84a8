"""The built-in model: a small Stable Diffusion trained on captioned shapes, shipped with edgediff.

Its weights live in builtin/model/ (diffusers format, safetensors, with a model card that says how
they were trained: `python -m edgediff.builtin.train`). Wherever a model is accepted, `builtin` names
it; the first use exports it to ONNX into the user's cache, later uses reuse that export. Exporting
needs the `export` extra (torch); running the export does not.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from ..engine.errors import EdgediffError

log = logging.getLogger("edgediff")

MODEL_DIR = Path(__file__).resolve().parent / "model"
NAME = "builtin"


def cache_root() -> Path:
    from platformdirs import user_cache_dir

    return Path(os.environ.get("EDGEDIFF_CACHE") or user_cache_dir("edgediff")) / "builtin"


def fingerprint(folder: Path = MODEL_DIR) -> str:
    """A short hash of the shipped weights and configs, so that new weights never reuse an old export."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".txt")):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def ensure_builtin() -> Path:
    """The exported built-in model folder, exporting it the first time."""
    if not (MODEL_DIR / "model_index.json").is_file():
        raise EdgediffError(f"the built-in model's weights are missing from {MODEL_DIR}; reinstall edgediff")
    onnx = cache_root() / fingerprint() / "onnx"
    if (onnx / "edgediff_export.json").is_file():
        return onnx
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        raise EdgediffError("the built-in model is exported on first use with torch and diffusers: "
                            "pip install 'edgediff[export]' (or run ./dev demo)") from None
    from ..export.onnx_export import export_onnx

    log.info("exporting the built-in model to %s (first use only)", onnx)
    export_onnx(MODEL_DIR, onnx, overwrite=True, name=NAME)
    return onnx
