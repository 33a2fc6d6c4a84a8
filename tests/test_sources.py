"""Export sources: single-file checkpoints and folders give the same graphs, hub ids, and the cache that
lets `generate --model` take any of them."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from ldm_layout import folder_to_single_file
from onnx import numpy_helper

from edgediff import Pipeline
from edgediff.cli import main
from edgediff.engine.errors import EdgediffError
from edgediff.export import onnx_export
from edgediff.export.onnx_export import ExportOptions
from edgediff.export.sources import ensure_exported, export_model, identify

KINDS = ("sd1", "sd2", "inpaint")


def weights(folder, component) -> dict:
    model = onnx.load(str(folder / component / "model.onnx"))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_single_file_exports_the_same_graphs_as_the_folder(tiny, tmp_path, kind):
    src, from_folder = tiny(kind)
    single = folder_to_single_file(src, tmp_path / f"{kind}.safetensors", open_clip=kind == "sd2")
    m = export_model(single, tmp_path / "o", config=src)
    assert m["source"] == {"kind": "single-file", "ref": str(single.resolve()),
                           "sha256": hashlib.sha256(single.read_bytes()).hexdigest()}
    assert m["name"] == kind
    for component in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        a, b = weights(from_folder, component), weights(tmp_path / "o", component)
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k], b[k]) for k in a), component


@pytest.mark.slow
def test_single_file_sliced_passes_the_gate(tiny, tmp_path):
    """Options reach the export from a single file too. One kind: the test above shows that every kind's
    single file gives the folder's graphs, and tests/test_export.py gates each option from folders."""
    kind = "inpaint"
    src = tiny(kind)[0]
    single = folder_to_single_file(src, tmp_path / f"{kind}.safetensors", open_clip=kind == "sd2")
    # fp32: an fp16 export costs 50 s more here, and tests/test_export.py gates fp16 for every kind
    m = export_model(single, tmp_path / "o", ExportOptions(attention="sliced", slices=4), config=src)
    assert all(c["psnr"] is None or c["psnr"] >= 60 for c in m["components"].values())
    assert (m["dtype"], m["attention"], m["slices"]) == ("fp32", "sliced", 4)


@pytest.mark.slow
def test_generate_exports_a_source_once_then_reuses_it(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGEDIFF_CACHE", str(tmp_path / "cache"))
    src = tiny("sd1")[0]
    args = ["generate", "a red circle", "--model", str(src), "--steps", "2", "--seed", "1"]
    assert main(args + ["--out", str(tmp_path / "a.png")]) == 0
    cached = list((tmp_path / "cache" / "models").iterdir())
    assert len(cached) == 1 and (cached[0] / "edgediff.json").is_file()

    def no_second_export(*a, **k):
        raise AssertionError("exported again")
    monkeypatch.setattr(onnx_export, "export_onnx", no_second_export)
    assert main(args + ["--out", str(tmp_path / "b.png")]) == 0
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    # the same picture as from the folder exported by hand
    by_hand = Pipeline.from_pretrained(tiny("sd1")[1], backend="cpu")("a red circle", num_inference_steps=2, seed=1)
    assert np.array_equal(np.asarray(by_hand.images[0]), np.asarray(Image.open(tmp_path / "a.png")))


@pytest.mark.slow
def test_cache_key_follows_content_and_options(tiny, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("EDGEDIFF_CACHE", str(tmp_path / "cache"))
    src = shutil.copytree(tiny("sd1")[0], tmp_path / "m")
    fp32 = ensure_exported(src)
    assert ensure_exported(src) == fp32
    fp16 = ensure_exported(src, ExportOptions(dtype="fp16"))
    assert fp16 != fp32
    config = src / "unet" / "config.json"
    config.write_text(config.read_text().replace('"sample_size": 8', '"sample_size": 8 '))  # new bytes
    assert ensure_exported(src) != fp32


@pytest.mark.slow
def test_hub_id_is_downloaded_then_exported(tiny, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo: SimpleNamespace(sha="c0ffee" * 6))
    asked = {}

    def snapshot_download(repo_id, allow_patterns=None, **kw):
        asked.update(repo_id=repo_id, patterns=allow_patterns)
        return str(tiny("sd1")[0])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    m = export_model("someone/tiny-sd", tmp_path / "o")
    assert m["source"] == {"kind": "hub", "ref": "someone/tiny-sd", "sha256": "c0ffee" * 6}
    assert m["name"] == "tiny-sd"
    assert asked["repo_id"] == "someone/tiny-sd"
    assert "*/*.safetensors" in asked["patterns"] and not any(p.endswith(".bin") for p in asked["patterns"])


def test_hub_id_offline_is_one_clear_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    run = subprocess.run([sys.executable, "-m", "edgediff.cli", "export", "someone/not-here", "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("edgediff: error:")]
    assert len(errors) == 1 and "offline" in errors[0] and "someone/not-here" in errors[0], run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "o").exists()


def test_sources_that_are_not_there(tmp_path):
    with pytest.raises(EdgediffError, match="does not exist"):
        identify(tmp_path / "nothing")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(EdgediffError, match="not a checkpoint edgediff reads"):
        identify(tmp_path / "notes.txt")


def test_coreml_refuses_fp32_before_doing_anything(tiny, tmp_path, capsys):
    code = main(["export", str(tiny("sd1")[0]), "--out", str(tmp_path / "o"), "--format", "coreml",
                 "--dtype", "fp32"])
    err = capsys.readouterr().err
    assert code == 2 and "compute in fp16" in err and not (tmp_path / "o").exists()


def test_broken_checkpoint_through_the_command_line(tiny, tmp_path, capsys):
    single = folder_to_single_file(tiny("sd1")[0], tmp_path / "model.safetensors", open_clip=False)
    data = single.read_bytes()
    single.write_bytes(data[: len(data) // 2])  # an interrupted download
    code = main(["export", str(single), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("edgediff: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "model.safetensors" in lines[0] and "re-download" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no output, no scratch


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A stand-in for the Hugging Face Hub on localhost that answers every request with the status and
    X-Error-Code header given by `answer(status, code)`; an empty local Hugging Face cache."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import huggingface_hub.constants

    reply = {"status": 404, "code": "RepoNotFound"}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(reply["status"])
            if reply["code"]:
                self.send_header("X-Error-Code", reply["code"])
            self.send_header("Content-Type", "application/json")
            body = b'{"error": "simulated"}'
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")

    def answer(status, code=None):
        reply.update(status=status, code=code)
    yield answer
    server.shutdown()
    server.server_close()


def test_hub_failures_are_told_apart_by_the_hubs_exception_types(local_hub, monkeypatch):
    """What the hub answered decides the line: huggingface_hub's exception types, not their names."""
    import huggingface_hub.constants

    def line(src="someone/not-here") -> str:
        with pytest.raises(EdgediffError) as caught:
            identify(src)
        return str(caught.value)

    local_hub(401, "RepoNotFound")
    assert "has no repository someone/not-here you can read" in line()
    local_hub(403, "GatedRepo")
    assert "has no repository someone/not-here you can read" in line()
    local_hub(500)
    message = line()
    assert message.startswith("cannot download someone/not-here from the Hugging Face Hub (")
    assert "offline" not in message  # it answered
    # nothing listens there: the HTTP client's own connection error
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    assert "offline or cannot reach it" in line()


COUNT_WRITERS = 4
WRITER = r"""
import sys
from pathlib import Path
from edgediff.export import sources
print("ready", flush=True)
sys.stdin.readline()  # all writers start hashing at once
print(sources.identify(Path(sys.argv[1])).sha256)
"""


@pytest.mark.slow  # four interpreters importing edgediff
def test_processes_hashing_at_once_keep_every_entry_of_the_hash_index(tmp_path, monkeypatch):
    """The hash index (cache/hashes.json) is read, then written after the hash: without a lock, writers
    that overlap each write the index as they read it, and all but the last one's entry are lost."""
    import json

    cache = tmp_path / "cache"
    env = dict(os.environ, EDGEDIFF_CACHE=str(cache))
    files = []
    for k in range(COUNT_WRITERS):
        files.append(tmp_path / f"m{k}.safetensors")
        files[-1].write_bytes(os.urandom(1 << 20) * 32)  # 32 MB: hashing takes long enough to overlap
    runs = [subprocess.Popen([sys.executable, "-c", WRITER, str(f)], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True) for f in files]
    assert all(r.stdout.readline().strip() == "ready" for r in runs)
    for r in runs:
        r.stdin.write("go\n")
        r.stdin.flush()
    digests = [r.communicate(timeout=120)[0].strip() for r in runs]
    assert all(r.returncode == 0 for r in runs)
    assert digests == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    index = json.loads((cache / "hashes.json").read_text())
    assert sorted(index.values()) == sorted(digests)  # one entry per file, none lost
    monkeypatch.setenv("EDGEDIFF_CACHE", str(cache))
    monkeypatch.setattr(hashlib, "sha256", None)  # the index answers now: nothing is hashed again
    assert [identify(f).sha256 for f in files] == digests
