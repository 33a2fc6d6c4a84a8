"""`edgediff batch` (resumable, in-process and on Ray) and `edgediff bench --ray`, on the built-in model.

The Ray tests run a real local cluster of 2 CPUs in a process of the test's own (`ray_cluster`), which
the commands reach by its address, as they would a remote cluster's; the cluster stops when that process
does, so none outlives this module or is seen by another test (this process never connects to Ray).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgediff.cli import main

N_PROMPTS = 20
SIZE, STEPS = 64, 4  # the built-in model's native size; a 20-image batch takes seconds


def _prompts(path: Path) -> Path:
    shapes = ("circle", "square", "triangle", "star", "diamond")
    colours = ("red", "blue", "yellow", "green")
    lines = []
    for k in range(N_PROMPTS):
        body = {"prompt": f"a {colours[k % 4]} {shapes[k % 5]} on a white background", "steps": STEPS,
                "width": SIZE, "height": SIZE}
        if k == 2:
            body["seed"] = 1234  # a line's own seed is kept; the others get --seed + line - 1
        if k == 5:
            body.update(sampler_name="Euler a", seed=-1)  # stochastic, and -1: still the same image everywhere
        lines.append(json.dumps(body))
    lines.insert(10, "")  # a blank line is skipped; line numbers count it
    path.write_text("\n".join(lines) + "\n")
    return path


def _index(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]


def _pixels(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgediff.cli", *args]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return _prompts(tmp_path_factory.mktemp("prompts") / "prompts.jsonl")


@pytest.fixture(scope="module")
def in_process(builtin_model, prompts, tmp_path_factory):
    """One in-process batch of the 20 prompts: (its folder, what it printed, seconds)."""
    out = tmp_path_factory.mktemp("batch") / "out"
    start = time.perf_counter()
    code = main(["batch", str(prompts), "--model", str(builtin_model), "--out", str(out), "--seed", "100"])
    assert code == 0
    return out, time.perf_counter() - start


def test_batch_writes_each_image_and_its_index_line(in_process, prompts, capsys):
    out, seconds = in_process
    index = _index(out)
    assert len(index) == N_PROMPTS and len(list(out.glob("*.png"))) == N_PROMPTS
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries
    lines = sorted({e["line"] for e in index})
    assert lines == [n for n in range(1, N_PROMPTS + 2) if n != 11]  # the blank line 11 is no image
    by_line = {e["line"]: e for e in index}
    assert by_line[3]["seed"] == 1234
    assert by_line[1]["seed"] == 100 and by_line[12]["seed"] == 111 and by_line[6]["seed"] == 105
    for entry in index:
        png = Image.open(out / entry["file"])
        assert png.size == (SIZE, SIZE)
        assert png.text["parameters"] == entry["parameters"]  # the PNG carries what the index says
        assert f"Seed: {entry['seed']}," in entry["parameters"] and f"Steps: {STEPS}," in entry["parameters"]
        assert set(entry["timings"]) >= {"text_encoder", "unet", "vae_decoder"}
    assert "Sampler: Euler a" in by_line[6]["parameters"]
    print(f"in-process batch of {N_PROMPTS}: {seconds:.1f} s")

    # a second run finds everything done and touches nothing
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert main(["batch", str(prompts), "--model", "unused", "--out", str(out), "--seed", "100"]) == 0
    assert f"all {N_PROMPTS} images" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before
    assert len(_index(out)) == N_PROMPTS


def _run_until(cmd: list[str], index: Path, lines: int, sig: int) -> subprocess.CompletedProcess:
    """Start `cmd`, send it `sig` once `index` holds `lines` lines, and wait for it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if index.is_file() and index.read_text().count("\n") >= lines:
                proc.send_signal(sig)
                break
            time.sleep(0.02)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode is not None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_killed_batch_resumes_without_repeating_work(builtin_model, prompts, in_process, tmp_path):
    out = tmp_path / "out"
    cmd = _cli("batch", str(prompts), "--model", str(builtin_model), "--out", str(out), "--seed", "100")
    start = time.perf_counter()

    # SIGTERM: the command stops cleanly (143), deleting the PNG it was writing
    done = _run_until(cmd, out / "index.jsonl", 3, signal.SIGTERM)
    assert done.returncode == 143, done.stderr
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    # SIGKILL, halfway: whatever it was writing stays as it was
    done = _run_until(cmd, out / "index.jsonl", N_PROMPTS // 2, signal.SIGKILL)
    assert done.returncode == -signal.SIGKILL, "the batch finished before it could be killed"
    finished = {e["file"]: e for e in _index(out)}
    assert N_PROMPTS // 2 <= len(finished) < N_PROMPTS
    stats = {name: (os.stat(out / name).st_ino, os.stat(out / name).st_mtime_ns) for name in finished}
    # what a killed writer leaves: a temporary beside a PNG (its process gone), and a PNG not yet indexed
    leftover = out / f".00020-1.png.partial-{_host()}-{_dead_pid()}-abc123"
    leftover.write_bytes(b"\x89PNG half")
    unindexed = next(name for name in _pixels(in_process[0]) if name not in finished)
    Image.new("RGB", (SIZE, SIZE)).save(out / unindexed)  # black: a run that indexes it must make it again

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {len(finished)} of {N_PROMPTS} images are done" in resumed.stdout
    index = _index(out)
    assert len(index) == N_PROMPTS and len({(e["line"], e["image"]) for e in index}) == N_PROMPTS
    assert {name: (os.stat(out / name).st_ino, os.stat(out / name).st_mtime_ns) for name in finished} == stats
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    # interrupted twice, the pictures are those of the run that never was
    reference = _pixels(in_process[0])
    got = _pixels(out)
    assert got.keys() == reference.keys()
    assert all(np.array_equal(got[name], reference[name]) for name in reference)
    print(f"killed twice and resumed: {time.perf_counter() - start:.1f} s")


def _host() -> str:
    from edgediff.engine.files import _host

    return _host()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("line, problem", [
    ('{"prompt": "a cat", "steps": 10000}', "steps"),
    ('{"prompt": "a cat", "width": -64}', "width"),
    ('{"prompt": "a cat",, "steps": 4}', "not JSON"),
    ('["a cat"]', "a JSON object"),
    ('{"prompt": "a cat", "override_settings": {"sd_model_checkpoint": "other"}}', "one --model"),
])
def test_a_bad_line_is_refused_before_any_image(tmp_path, capsys, line, problem):
    good = json.dumps({"prompt": "a red circle", "steps": STEPS, "width": SIZE, "height": SIZE})
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join([good] * 18 + [line, good]) + "\n")
    out = tmp_path / "out"
    # --model names nothing: the file is refused before any model is looked for
    assert main(["batch", str(path), "--model", "no-such-model", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"edgediff: error: {path} line 19: "), err
    assert problem in err and "nothing was generated" in err
    assert not out.exists()


def test_batch_refuses_an_index_of_other_prompts(in_process, tmp_path, capsys):
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "something else", "steps": STEPS}) + "\n")
    assert main(["batch", str(other), "--model", "unused", "--out", str(in_process[0])]) == 2
    assert "resume with the same prompts and --seed, or choose another --out" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["batch", "PROMPTS", "--model", "unused", "--out", "OUT"],
                                     ["bench", "--protocol", "tiny"]])
def test_ray_missing_is_one_line(monkeypatch, prompts, tmp_path, capsys, command):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as where the extra is not installed
    argv = [str(prompts) if a == "PROMPTS" else str(tmp_path / "out") if a == "OUT" else a for a in command]
    assert main([*argv, "--ray", "auto"]) == 2
    assert capsys.readouterr().err == "edgediff: error: --ray needs Ray: pip install 'edgediff[ray]'\n"
    assert not (tmp_path / "out").exists()


# -- Ray ----------------------------------------------------------------------------------------------

# Holds a local Ray cluster until its stdin closes. Ray's processes are its children: they stop with it.
# Its session folder is short (Ray's sockets live in it, and a socket's path is at most 107 bytes) and its
# own, so that another Ray user of the machine never finds this cluster as "the current one".
HOLDER = """
import shutil, sys, tempfile, ray
folder = tempfile.mkdtemp(prefix="ray", dir="/tmp")
ray.init(num_cpus=2, include_dashboard=False, _temp_dir=folder)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
ray.shutdown()
shutil.rmtree(folder, ignore_errors=True)
"""


@pytest.fixture(scope="module")
def ray_cluster():
    """(address, environment) of a local Ray cluster of 2 CPUs, for this module's commands. Its own
    authentication token (Ray 2.5x enables token auth), given to the commands by environment only."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        address = proc.stdout.readline().strip()
        assert address, "the Ray cluster did not start"
        yield address, env
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_ray_batch_makes_the_same_images(ray_cluster, builtin_model, prompts, in_process, tmp_path):
    address, env = ray_cluster
    out = tmp_path / "out"
    start = time.perf_counter()
    done = subprocess.run(_cli("batch", str(prompts), "--model", str(builtin_model), "--out", str(out),
                               "--seed", "100", "--ray", address), capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"Ray batch of {N_PROMPTS}: {time.perf_counter() - start:.1f} s (in-process: {in_process[1]:.1f} s)")
    reference, got = _pixels(in_process[0]), _pixels(out)
    assert got.keys() == reference.keys()
    assert all(np.array_equal(got[name], reference[name]) for name in reference)
    assert _made(_index(out)) == _made(_index(in_process[0]))


def _made(index: list[dict]) -> set[tuple]:
    return {(e["line"], e["image"], e["seed"], e["parameters"]) for e in index}


@pytest.mark.slow
def test_bench_ray_prints_a_table_of_the_nodes(ray_cluster, builtin_model, tmp_path):
    address, env = ray_cluster
    start = time.perf_counter()
    done = subprocess.run(_cli("bench", "--protocol", "tiny", "--steps", "2", "--ray", address, "--out-dir",
                               str(tmp_path / "run"), "--json", str(tmp_path / "fleet.json")),
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"bench --ray: {time.perf_counter() - start:.1f} s")
    lines = done.stdout.splitlines()
    top = next(k for k, line in enumerate(lines) if line.split()[:2] == ["node", "device"])
    head, row = lines[top:top + 2]
    assert head.split()[:4] == ["node", "device", "runner", "plan"] and "PSNR" in head
    ip = address.split(":")[0]
    assert f"({ip})" in row and "cpu (" in row and "edgediff fp32" in row and row.rstrip().endswith("reference")
    report = json.loads((tmp_path / "fleet.json").read_text())
    (node,) = report["nodes"]
    assert node["status"] == "ok" and node["report"]["rows"][0]["steps_per_s"] > 0
