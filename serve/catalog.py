"""The models and LoRAs a server offers, by name. A name from a request is looked up among what the
operator's folders hold, never joined onto a path: `../x` and `/etc/x` are names that match nothing."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..engine.components import COMPONENTS
from ..engine.errors import EdgediffError

MANIFEST = "edgediff.json"  # what engine/model_folder.py reads an export's dtype, family and source from


class NotFound(EdgediffError):
    """A name that is none of the server's models or LoRAs: HTTP 404, as A1111 answers."""


@dataclass(frozen=True)
class Checkpoint:
    """One model the server can load: an exported folder, named as A1111 names a checkpoint file."""

    name: str  # A1111's model_name: the folder's name in --models-dir, or the --model's own name
    path: Path  # the exported folder
    sha256: str | None  # of the source checkpoint, from the export's manifest; None when it records none

    @property
    def hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None  # A1111's short hash: sha256's first 10 digits

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]" if self.hash else self.name  # A1111's "name [hash]"

    def item(self) -> dict:
        """A1111's /sdapi/v1/sd-models entry."""
        return {"title": self.title, "model_name": self.name, "hash": self.hash, "sha256": self.sha256,
                "filename": str(self.path), "config": None}

    @classmethod
    def of_folder(cls, path: Path, name: str | None = None) -> "Checkpoint":
        try:
            source = json.loads((path / MANIFEST).read_text()).get("source", {})
        except (OSError, ValueError, AttributeError):  # optimum's folders have no manifest
            source = {}
        sha = source.get("sha256") if isinstance(source, dict) else None
        return cls(name or path.name, path, sha if isinstance(sha, str) else None)


def is_export(folder: Path) -> bool:
    """A folder Pipeline.from_pretrained opens as it is (the test it makes before exporting)."""
    return (folder / MANIFEST).is_file() or any((folder / c.onnx_path).is_file() for c in COMPONENTS)


class Catalog:
    """The model loaded at start and the exported folders of --models-dir, scanned again on each
    listing (A1111 refreshes its list when asked for a name it does not know; here every look-up does)."""

    def __init__(self, first: Checkpoint, models_dir: Path | None = None, lora_dir: Path | None = None):
        self.first = first
        self.models_dir = models_dir
        self.lora_dir = lora_dir

    def checkpoints(self) -> list[Checkpoint]:
        found = [self.first]
        # by absolute path, symbolic links kept: a link in the folder is a model under another name
        seen = {Path(os.path.abspath(self.first.path))}
        if self.models_dir is not None and self.models_dir.is_dir():
            for folder in sorted(p for p in self.models_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if is_export(folder) and Path(os.path.abspath(folder)) not in seen:
                    seen.add(Path(os.path.abspath(folder)))
                    found.append(Checkpoint.of_folder(folder))
        return found

    def find(self, name: str) -> Checkpoint:
        """A model by A1111's title ("name [hash]"), its name, or its name with the ".safetensors" A1111's
        clients add; one line listing the models otherwise."""
        wanted = name.strip()
        bare = wanted.rsplit(" [", 1)[0] if wanted.endswith("]") else wanted
        if bare.endswith(".safetensors"):
            bare = bare[: -len(".safetensors")]
        models = self.checkpoints()
        for checkpoint in models:
            if wanted == checkpoint.title or bare == checkpoint.name:
                return checkpoint
        raise NotFound(f"model {name!r} is not one of this server's models ({', '.join(c.title for c in models)}); "
                       "see /sdapi/v1/sd-models")

    def loras(self) -> list[dict]:
        """A1111's /sdapi/v1/loras: the LoRA folder's .safetensors files, by the names prompts use in
        <lora:name:weight>."""
        if self.lora_dir is None or not self.lora_dir.is_dir():
            return []
        files = sorted(p for p in self.lora_dir.glob("*.safetensors") if p.is_file())
        return [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": {}} for p in files]
