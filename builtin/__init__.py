"""The built-in model: a small Stable Diffusion trained on captioned shapes, shipped with edgediff.

Its weights live in builtin/model/ (diffusers format, safetensors, with a model card that says how
they were trained: `python -m edgediff.builtin.train`). Wherever a model is accepted, `builtin` names
it; the first use exports it to ONNX into the user's cache, later uses reuse that export. Exporting
needs the `export` extra (torch); running the export does not.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..engine.errors import EdgediffError

log = logging.getLogger("edgediff")

MODEL_DIR = Path(__file__).resolve().parent / "model"
NAME = "builtin"


def ensure_builtin() -> Path:
    """The exported built-in model folder, exporting it the first time."""
    if not (MODEL_DIR / "model_index.json").is_file():
        raise EdgediffError(f"the built-in model's weights are missing from {MODEL_DIR}; reinstall edgediff")
    from ..export.sources import ensure_exported

    return ensure_exported(NAME)
