"""Where a model comes from, and the one entry point that turns any source into an exported folder.

A source is a diffusers folder, a single-file checkpoint (`.safetensors`, or `.ckpt` read with
`torch.load(weights_only=True)`), a Hugging Face hub id, or `builtin`. `export_model` makes a diffusers
folder of it (converting or downloading into a scratch folder when needed) and exports that;
`ensure_exported` does the same once per (content, options) into the user's cache, which is how
`edgediff generate --model SRC` and `Pipeline.from_pretrained(SRC)` accept any source.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from ..engine.errors import EdgediffError, first_line
from ..engine.files import cache_root, check_out, scratch_folder, sweep_partials
from .onnx_export import MANIFEST, ExportOptions, folder_hash

log = logging.getLogger("edgediff")

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
INDEX_LOCK_SECONDS = 30  # writing the hash index takes milliseconds; a lock held longer is a hung process
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a Stable Diffusion pipeline needs from a hub repository; the safetensors weights only, never
# the pickled .bin duplicates many repositories also carry.
HUB_PATTERNS = ["model_index.json", "*/config.json", "*/*.safetensors", "tokenizer/*", "tokenizer_2/*", "scheduler/*",
                "feature_extractor/*", "*/preprocessor_config.json"]


@dataclass(frozen=True)
class Source:
    kind: str  # "diffusers-folder", "single-file", "hub" or "builtin"
    ref: str  # the path or hub id the user gave
    sha256: str  # of the content: the file, the folder's configs and weights, or the hub revision

    def describe(self) -> dict:
        return {"kind": self.kind, "ref": self.ref, "sha256": self.sha256}


def identify(src: str | Path) -> Source:
    """What `src` names, cheaply: file hashes are remembered by (path, size, mtime) in the cache."""
    text = str(src)
    if text == "builtin":
        from ..builtin import MODEL_DIR

        return Source("builtin", "builtin", _cached_hash(MODEL_DIR))
    path = Path(src).expanduser()
    if path.is_dir():
        if (path / MANIFEST).is_file() or (path / "unet" / "model.onnx").is_file():
            raise EdgediffError(f"{path} is already an exported model; give it to `generate --model` directly")
        return Source("diffusers-folder", str(path.resolve()), _cached_hash(path))
    if path.is_file():
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise EdgediffError(f"{path} is not a checkpoint edgediff reads; give a .safetensors or .ckpt "
                                "file, a diffusers folder or a Hugging Face hub id")
        return Source("single-file", str(path.resolve()), _cached_hash(path))
    if HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return Source("hub", text, _hub_revision(text))
    raise EdgediffError(f"{src} does not exist; give a diffusers folder, a .safetensors file or a hub id "
                        "such as stable-diffusion-v1-5/stable-diffusion-v1-5")


def export_model(src: str | Path, out: str | Path, options: ExportOptions = ExportOptions(),
                 force: bool = False, config: str | Path | None = None, prediction_type: str | None = None,
                 name: str | None = None, coreml: dict | None = None) -> dict:
    """Export any source to `out` and return the manifest (out/edgediff.json): ONNX in optimum's
    layout, or Core ML packages when `coreml` gives their shapes (sizes: [(width, height), ...], batch, and
    optionally compute_units)."""
    if coreml is not None and options.deep_cache:
        raise EdgediffError("--deep-cache is for ONNX exports: Core ML packages have no shallow UNet yet; "
                            "leave out --deep-cache or --format coreml")
    if coreml is not None and options.tiny_vae:
        raise EdgediffError("--tiny-vae exports a tiny autoencoder for ONNX exports only; leave it out with "
                            "--format coreml")
    if coreml is not None and options.dtype != "fp16":
        raise EdgediffError("Core ML packages compute in fp16 (with fp32 inputs and outputs); "
                            "use --dtype fp16 or leave --dtype out")
    source = identify(src)
    out = Path(out)
    check_out(out, force, folder=True)  # before any download or conversion, so a wrong --out costs nothing
    with scratch_folder(_scratch_dir(out), "edgediff-src") as scratch:
        folder = materialize(source, scratch, config=config, prediction_type=prediction_type)
        default_name = {"builtin": "builtin", "hub": source.ref.split("/")[-1]}.get(
            source.kind, Path(source.ref).stem if source.kind == "single-file" else Path(source.ref).name)
        if coreml is None:
            from .onnx_export import export_onnx

            return export_onnx(folder, out, options, force=force, name=name or default_name,
                               source=source.describe())
        from .coreml_export import export_coreml

        # "fused" is ONNX Runtime's own operator; for Core ML the default is the plain graph
        attention = "standard" if options.attention == "fused" else options.attention
        export_coreml(folder, out, attention=attention, force=force, name=name or default_name,
                      source=source.describe(), loras=options.loras, **coreml)
        return json.loads((out / MANIFEST).read_text())


def materialize(source: Source, scratch: Path, config=None, prediction_type=None) -> Path:
    """A diffusers folder holding `source`: the folder itself, or a conversion or download in `scratch`."""
    if source.kind == "builtin":
        from ..builtin import MODEL_DIR

        return MODEL_DIR
    if source.kind == "diffusers-folder":
        if prediction_type:
            raise EdgediffError("--prediction-type applies to single-file checkpoints; a diffusers folder "
                                "says it in scheduler/scheduler_config.json")
        return Path(source.ref)
    if source.kind == "single-file":
        from .single_file import to_diffusers

        return to_diffusers(Path(source.ref), scratch / "diffusers", config=Path(config) if config else None,
                            prediction_type=prediction_type)
    return _download(source.ref)


def ensure_exported(src: str | Path, options: ExportOptions = ExportOptions(), **kwargs) -> Path:
    """The cached export of `src` with `options`, exporting it the first time (needs the export extra)."""
    source = identify(src)
    key = f"{source.sha256[:16]}-{options.key()}"
    extra = {k: v for k, v in kwargs.items() if v}
    if extra:  # --config/--prediction-type change the result: they are part of the key
        key += "-" + hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode()).hexdigest()[:8]
    out = cache_root() / "models" / key
    sweep_partials(out.parent)  # what killed exports left, even when this one is already there
    if (out / MANIFEST).is_file():
        return out
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        raise EdgediffError(f"{src} is not exported yet, and exporting needs torch and diffusers: "
                            "pip install 'edgediff[export]', or export on another machine with "
                            "`edgediff export` and pass the folder") from None
    what = "the built-in model" if source.kind == "builtin" else source.ref
    log.info("exporting %s to %s (once; later runs reuse it)", what, out)
    export_model(src, out, options, force=True, **kwargs)
    return out


def _scratch_dir(out: Path) -> Path:
    # beside the output: the same disk, which the export needs room on anyway
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def _cached_hash(path: Path) -> str:
    """sha256 of a file or a folder's weights, remembered by path, size and modification time: hashing
    a 4 GB checkpoint takes seconds, and `generate --model file` should not pay that every run."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stamp = json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    index_path = cache_root() / "hashes.json"
    index = _read_index(index_path)
    if stamp in index:
        return index[stamp]
    if path.is_file():
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        digest = h.hexdigest()
    else:
        digest = folder_hash(path)
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        # Read again under the lock and add to that: other processes (two `generate` runs, a bench) may
        # have added their entries while this one hashed, and writing the copy read above would drop them.
        with FileLock(index_path.with_name(index_path.name + ".lock"), timeout=INDEX_LOCK_SECONDS):
            index = {**_read_index(index_path), stamp: digest}
            tmp = index_path.with_name(f".hashes-{os.getpid()}.json")
            tmp.write_text(json.dumps(index))
            os.replace(tmp, index_path)  # readers, who take no lock, see the old index or the new one
    except OSError:  # filelock's Timeout is one too
        pass  # a read-only cache only costs the hash again next time
    return digest


def _read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def _hub_revision(repo_id: str) -> str:
    """The commit a hub id resolves to now (or, offline, in the local Hugging Face cache)."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        return HfApi().model_info(repo_id).sha
    except Exception as online_error:  # offline, unknown repository, gated: try the local cache first
        try:
            folder = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True)
            return Path(folder).name  # snapshots are stored under their commit hash
        except Exception:
            raise EdgediffError(_hub_message(repo_id, online_error)) from None


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        raise EdgediffError(_hub_message(repo_id, e)) from None
    if not (folder / "model_index.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        raise EdgediffError(f"hub repository {repo_id} is not a diffusers Stable Diffusion pipeline "
                            "(no model_index.json); download its .safetensors file and export that")
    return folder


def tiny_vae_folder(ref: str | Path) -> Path:
    """A tiny autoencoder's folder (config.json and its weights): `ref` itself, or a hub id downloaded
    into the Hugging Face cache (its .safetensors only: never a pickle)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    text = str(ref)
    if not HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise EdgediffError(f"--tiny-vae {ref} is neither a folder nor a hub id; give a TAESD folder or a hub id "
                            "such as madebyollin/taesd")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=["config.json", "*.safetensors"]))
    except Exception as e:
        raise EdgediffError(_hub_message(text, e)) from None


def _hub_message(repo_id: str, error: Exception) -> str:
    """One line for a failed look-up or download. The hub answered with an HTTP status (HfHubHTTPError,
    RepositoryNotFoundError for a missing, private or gated one), or it never answered: offline mode
    (OfflineModeIsEnabled), no cached copy (LocalEntryNotFoundError), or no connection, which its HTTP
    client raises in its own types (requests' or httpx's, depending on huggingface_hub's version)."""
    from huggingface_hub.utils import HfHubHTTPError, RepositoryNotFoundError  # also from 0.23's

    first = first_line(error)
    if isinstance(error, RepositoryNotFoundError):  # GatedRepoError is one too
        return (f"the Hugging Face Hub has no repository {repo_id} you can read (misspelt, private or "
                "gated: log in with `hf auth login`)")
    if isinstance(error, HfHubHTTPError):
        return f"cannot download {repo_id} from the Hugging Face Hub ({first})"
    return (f"cannot download {repo_id} from the Hugging Face Hub: this machine is offline or cannot reach it "
            f"({first}), and it is not in the local Hugging Face cache; download it where you are online, or "
            "give a local folder or .safetensors file")
