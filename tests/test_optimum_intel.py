"""The benchmark's optimum-intel peer (OpenVINO's Stable Diffusion pipeline, in the venv
bench/optimum_env.py builds): the tiny protocol runs it and its picture is edgediff's within OpenVINO's
bf16; the venv shares the dev venv's CPU torch and leaves torchvision out; and, with no venv at all, the
one-line reasons a peer is skipped or a build refused.

The slow tests build the venv once (115 s on the 2-core CI machine, busy) and export the built-in model
with optimum-cli (about 40 s): 70 s with the venv built. They skip only when the package index is
unreachable.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from edgediff.bench import optimum_env, peers
from edgediff.bench import run as bench_run
from edgediff.cli import main
from edgediff.engine.metrics import psnr
from test_cli import one_line_error, run

# Measured on the 2-core Xeon (AVX512_BF16), tiny protocol at 2 steps: 35.0 dB against edgediff fp32 with
# OpenVINO's default bf16, 83.0 dB with f32 forced (as edgediff against diffusers). bf16 is what a user
# of this CPU gets; a CPU without bf16 runs f32 and lands far above the floor.
MIN_PSNR = 30.0


@pytest.fixture(scope="module")
def intel_python() -> Path:
    try:
        return optimum_env.optimum_intel_python()  # any failure but an unreachable index fails the tests
    except optimum_env.OptimumEnvUnavailable as e:
        pytest.skip(f"optimum-intel: {e}")


@pytest.fixture(scope="module")
def tiny_report(intel_python, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench-intel")
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["bench", "--protocol", "tiny", "--steps", "2", "--against", "optimum-intel",
                     "--json", str(tmp / "tiny.json"), "--out-dir", str(tmp / "run")])
    assert code == 0, out.getvalue()
    return json.loads((tmp / "tiny.json").read_text()), out.getvalue()


@pytest.mark.slow
def test_tiny_protocol_runs_optimum_intel(tiny_report):
    report, printed = tiny_report
    assert report["skipped"] == []
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["edgediff fp32", "optimum-intel"]
    row = rows["optimum-intel"]
    assert row["status"] == "ok", row["note"]
    assert row["runner"] == "optimum-intel" and row["backend"] == "cpu"
    assert row["device"].startswith("OpenVINO ") and row["versions"]["optimum-intel"] == "2.2.0"
    assert row["versions"]["torch"] == report["machine"]["versions"]["torch"]  # the dev venv's, shared
    for key in ("load_s", "first_run_s", "total_s", "steps_per_s"):
        assert isinstance(row[key], float) and row[key] > 0, key
    for stage in ("text_encoder", "unet", "vae_decoder"):
        assert row["stages"][stage] > 0, stage  # timed by wrapping the pipeline's parts
    assert row["peak_rss_bytes"] > 100 * 2**20 and row["generation_peak_bytes"] > 0
    # The precision OpenVINO chose for every part is in the note (bf16 on this CPU, f32 without bf16).
    assert row["note"].startswith("inference precision (INFERENCE_PRECISION_HINT")
    for part in ("text_encoder", "unet", "vae_decoder"):
        assert f"{part} bf16" in row["note"] or f"{part} f32" in row["note"], row["note"]
    assert "note: optimum-intel: inference precision" in printed

    # A real picture, compared with edgediff's (the reference when diffusers does not run).
    assert report["reference"]["row"] == "edgediff fp32"
    ours, theirs = np.load(rows["edgediff fp32"]["images"]), np.load(row["images"])
    assert theirs.shape == ours.shape == (1, 64, 64, 3) and theirs.std() > 1.0
    assert isinstance(row["psnr_db"], float) and math.isfinite(row["psnr_db"]), row
    assert row["psnr_db"] == pytest.approx(psnr(theirs, ours)) and row["psnr_db"] > MIN_PSNR
    assert {(r["row"], r["peer"]) for r in report["ratios"]} == {("edgediff fp32", "optimum-intel")}


@pytest.mark.slow
def test_venv_shares_the_cpu_torch_and_leaves_torchvision_out(intel_python):
    import importlib.util

    import torch

    probe = ("import importlib.util as u, json, torch, transformers; tv = u.find_spec('torchvision'); "
             "print(json.dumps([torch.__file__, torch.version.cuda, tv and tv.origin, transformers.__file__]))")
    done = subprocess.run([str(intel_python), "-c", probe], capture_output=True, text=True,
                          env=optimum_env.subprocess_env(), check=True)
    torch_file, cuda, torchvision, transformers_file = json.loads(done.stdout.strip().splitlines()[-1])
    assert (torch_file, cuda) == (torch.__file__, torch.version.cuda)  # the dev venv's own build, shared
    venv = str(optimum_env.OPTIMUM_INTEL.venv.resolve())
    # PyPI's torchvision needs a CUDA torch (bench/optimum_env.py): none in the venv, the dev venv's if any
    assert torchvision is None or not torchvision.startswith(venv)
    ours = importlib.util.find_spec("torchvision")
    assert torchvision == (ours and ours.origin)
    assert transformers_file.startswith(venv)


# No venv from here on: the refusals and skip reasons, each one line.

def test_optimum_intel_is_a_peer(tmp_path, capsys):
    from edgediff.bench.protocols import peers as parse_peers

    assert parse_peers("diffusers,optimum,optimum-intel") == ["diffusers", "optimum", "optimum-intel"]
    code, _, err = run(capsys, "bench", "--protocol", "tiny", "--against", "optimum-openvino")
    one_line_error(code, err, "unknown peer 'optimum-openvino'", "optimum-intel")


def test_unreachable_index_skips_the_peer_in_one_line(monkeypatch):
    def unreachable(self, locked=True):
        raise optimum_env.OptimumEnvUnavailable(
            "cannot build /x/.venv-optimum-intel: the package index is unreachable (pip: Network is unreachable)")

    monkeypatch.setattr(optimum_env.PeerVenv, "python", unreachable)
    with pytest.raises(bench_run._Skip) as e:
        bench_run._peer("optimum-intel", {}, {"diffusers": "/d", "source_sha256": "0" * 64}, Path("/out"), None)
    assert str(e.value) == ("its venv could not be built: cannot build /x/.venv-optimum-intel: the package index "
                            "is unreachable (pip: Network is unreachable)")


@pytest.mark.parametrize("diffusers, given, words", [
    ("/d", "NOWHERE", ["--optimum-intel-model", "NOWHERE", "is not a model folder (no model_index.json)"]),
    (None, None, ["no diffusers folder for optimum-cli to export", "give --optimum-intel-model"]),
])
def test_model_folder_refusals(tmp_path, diffusers, given, words):
    given = str(tmp_path / given) if given else None
    with pytest.raises(peers.PeerUnavailable) as e:
        peers.peer_model("optimum-intel", diffusers, "0" * 64, given, tmp_path / "python")
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_pip_without_an_index_is_unavailable_not_a_failure(monkeypatch, tmp_path):
    output = ("WARNING: Retrying ... NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection>: "
              "Failed to establish a new connection: [Errno 101] Network is unreachable')\n"
              "ERROR: Could not find a version that satisfies the requirement optimum==2.3.0\n"
              "ERROR: No matching distribution found for optimum==2.3.0\n")
    monkeypatch.setattr(optimum_env.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 1, "", output))
    with pytest.raises(optimum_env.OptimumEnvUnavailable) as e:
        optimum_env.OPTIMUM_INTEL._pip(tmp_path / "python", ["optimum==2.3.0"])
    assert "\n" not in str(e.value) and "the package index is unreachable" in str(e.value)


def test_pip_check_may_name_only_what_was_left_out(monkeypatch, tmp_path):
    lines = ("optimum-intel 2.2.0 requires torchvision, which is not installed.\n"
             "optimum-intel 2.2.0 has requirement transformers<5.6,>=4.51, but you have transformers 5.24.0.\n")
    monkeypatch.setattr(optimum_env, "_run", lambda *a, **k: subprocess.CompletedProcess(a, 1, lines, ""))
    assert optimum_env.OPTIMUM_INTEL._unmet(tmp_path / "python") == [lines.splitlines()[1]]
    # the optimum venv leaves nothing out: the same torchvision line is a problem there
    assert len(optimum_env.OPTIMUM._unmet(tmp_path / "python")) == 2


def test_a_cuda_torch_after_pip_install_fails_the_build_in_one_line(monkeypatch, tmp_path):
    """pip must never replace the shared CPU torch; if it did, the build says so in one line."""
    shared = optimum_env._shared_site_packages()
    version = optimum_env.importlib.metadata.version("torch")
    probes = iter([{"torch": [version, str(shared)], "torch_cuda": None},  # before: the dev venv's own
                   {"torch": [version.split("+")[0], str(tmp_path / "venv")], "torch_cuda": "13.0"}])
    monkeypatch.setattr(optimum_env, "_run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "", ""))
    monkeypatch.setattr(optimum_env, "_purelib", lambda python: str(tmp_path))
    monkeypatch.setattr(optimum_env, "_probe", lambda python, checks: next(probes))
    monkeypatch.setattr(optimum_env.PeerVenv, "_pip", lambda self, python, args: None)
    with pytest.raises(RuntimeError) as e:
        optimum_env.OPTIMUM_INTEL._build(tmp_path / "venv", tmp_path / "venv/bin/python", shared, locked=True)
    message = str(e.value)
    assert "\n" not in message
    assert f"pip install replaced the dev venv's torch {version} (CPU) from {shared} with torch" in message
    assert f"(CUDA 13.0) from {tmp_path / 'venv'}" in message
