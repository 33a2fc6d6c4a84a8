"""`edgediff bench`: the tiny protocol end to end in one invocation against diffusers (and optimum when its
venv can be built, as in tests/test_optimum_interop.py), the report's schema, `bench compare`'s table and
chart, the FLOPs count, the CPU peak estimate, and the one-line refusals of bad input. About 55 s on the
2-core CI machine, most of it exporting the built-in model and running diffusers."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from edgediff.bench.machine import cpu_peak
from edgediff.cli import main
from test_cli import one_line_error, run

STAGES = {"text_encoder", "unet", "unet_per_step", "vae_decoder", "safety_checker"}
TOP = {"schema", "created", "against", "repeat", "protocol", "machine", "model", "unet_flops_per_step",
       "rows", "skipped", "reference", "ratios"}
ROW = {"name", "runner", "status", "note", "options", "backend", "device", "plan", "load_s", "first_run_s",
       "total_s", "steps_per_s", "stages", "peak_rss_bytes", "generation_peak_bytes", "peak_device_bytes",
       "unet_flops_per_s", "unet_peak_fraction", "psnr_db", "psnr_note", "image", "runs"}


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """One invocation: the tiny protocol, 2 steps, two edgediff rows (the planner's pick, and the streamed
    plan forced) against diffusers, and optimum when its venv can be built here: (report, output, folder)."""
    import io
    from contextlib import redirect_stdout

    from edgediff.bench import optimum_env

    against = "diffusers,optimum"
    try:
        optimum_env.optimum_python()  # any failure but an unreachable package index fails the test
    except optimum_env.OptimumEnvUnavailable:
        against = "diffusers"
    tmp = tmp_path_factory.mktemp("bench")
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["bench", "--protocol", "tiny", "--steps", "2", "--against", against,
                     "--edgediff", "dtype=fp32", "--edgediff", "plan=streamed",
                     "--json", str(tmp / "tiny.json"), "--out-dir", str(tmp / "run")])
    assert code == 0, out.getvalue()
    return json.loads((tmp / "tiny.json").read_text()), out.getvalue(), tmp


@pytest.mark.slow
def test_tiny_protocol_against_diffusers(tiny_report):
    report, printed, _ = tiny_report
    assert TOP <= set(report), TOP - set(report)
    assert report["schema"] == "edgediff-bench/1"
    p = report["protocol"]
    assert (p["name"], p["model"], p["width"], p["height"], p["steps"], p["scheduler"]) == \
        ("tiny", "builtin", 64, 64, 2, "euler")
    assert p["overrides"] == ["steps"]  # a custom run says so
    machine = report["machine"]
    # the CPU build or onnxruntime-gpu, whichever is installed
    assert machine["cores"] >= 1 and machine["ram_bytes"] > 0 and \
        (machine["versions"]["onnxruntime"] or machine["versions"]["onnxruntime-gpu"])
    assert isinstance(report["unet_flops_per_step"], int) and report["unet_flops_per_step"] > 0

    rows = {r["name"]: r for r in report["rows"]}
    peers = ["diffusers", "optimum"] if "optimum" in report["against"] else ["diffusers"]
    assert list(rows) == ["edgediff fp32", "edgediff fp32 streamed", *peers]
    for row in rows.values():
        assert ROW <= set(row), ROW - set(row)
        assert row["status"] == "ok", row["note"]
        assert STAGES == set(row["stages"])
        for key in ("load_s", "first_run_s", "total_s", "steps_per_s"):
            assert isinstance(row[key], float) and row[key] > 0, key
        assert row["stages"]["unet"] > 0 and row["stages"]["unet_per_step"] == pytest.approx(row["stages"]["unet"] / 2)
        assert isinstance(row["peak_rss_bytes"], int) and row["peak_rss_bytes"] > 10 * 2**20
        assert row["peak_device_bytes"] is None  # the CPU cannot tell one apart from the host's
        assert 0 < row["unet_peak_fraction"] < 1
        assert Image.open(row["image"]).size == (64, 64)
    ours = rows["edgediff fp32"]
    assert ours["backend"] == "cpu" and ours["plan"].startswith("resident plan on cpu")
    assert rows["edgediff fp32 streamed"]["rung"] == "streamed"
    assert ours["torch_imported"] is False  # the run time never imports torch

    # Every row carries its PSNR against diffusers' fp32 image (JSON has no infinity: identical says so).
    assert report["reference"]["row"] == "diffusers"
    assert rows["diffusers"]["psnr_note"] == "reference"
    for name in rows.keys() - {"diffusers"}:
        row = rows[name]
        if row["psnr_note"] != "identical":
            assert isinstance(row["psnr_db"], float) and math.isfinite(row["psnr_db"]), row
            assert row["psnr_db"] > 40, name  # fp32 against fp32, same latents: tests/test_parity.py's kind

    ratios = {(r["row"], r["peer"]) for r in report["ratios"]}
    assert ratios == {(row, peer) for row in ("edgediff fp32", "edgediff fp32 streamed") for peer in peers}
    for r in report["ratios"]:
        assert r["speedup"] > 0 and r["memory"] > 0

    # The terminal table: a line per row, the ratios, and what the PSNR is measured against.
    assert "edgediff fp32 streamed" in printed and "x the speed of diffusers" in printed
    assert "PSNR against diffusers fp32" in printed
    if "optimum" in peers:
        assert rows["optimum"]["versions"]["optimum-onnx"]


@pytest.mark.slow
def test_same_latents_give_the_same_picture(tiny_report):
    report, _, _ = tiny_report
    images = {r["name"]: np.load(r["images"]) for r in report["rows"]}
    assert images["edgediff fp32"].shape == images["diffusers"].shape == (1, 64, 64, 3)
    assert images["diffusers"].std() > 1.0  # not a flat picture: the PSNR means something


@pytest.mark.slow
def test_compare_renders_table_and_png(tiny_report, tmp_path, capsys):
    report, _, folder = tiny_report
    a, b = tmp_path / "monday.json", tmp_path / "tuesday.json"
    shutil.copy(folder / "tiny.json", a)
    shutil.copy(folder / "tiny.json", b)
    png = tmp_path / "chart.png"
    code, out, err = run(capsys, "bench", "compare", str(a), str(b), "--png", str(png))
    assert code == 0, err
    table = [line for line in out.splitlines() if line.startswith(("monday", "tuesday"))]
    assert len(table) == 2 + 2 * len(report["rows"])  # a header line per file, then a line per row
    assert any("tuesday" in line and "edgediff fp32 streamed" in line for line in table)
    chart = Image.open(png)
    assert chart.width > 400 and chart.height > 100
    assert np.asarray(chart.convert("L")).std() > 5  # bars drawn, not a blank page


@pytest.mark.parametrize("argv, words", [
    (["bench", "--protocol", "sd14"], ["unknown protocol 'sd14'", "sd15-512", "tiny"]),
    (["bench", "--protocol", "tiny", "--against", "diffusers,automatic1111"], ["unknown peer 'automatic1111'"]),
    (["bench", "--protocol", "tiny", "--edgediff", "dtype=int4"], ["unknown dtype 'int4'"]),
    (["bench", "--protocol", "tiny", "--variant", "int8"], ["unknown export variant 'int8'"]),
    (["bench", "--protocol", "tiny", "--plan", "fastest"], ["unknown plan 'fastest'", "resident"]),
    (["bench", "--protocol", "tiny", "--edgediff", "cache=3"], ["cache=3 needs the deepcache export"]),
    (["bench", "--protocol", "tiny", "--edgediff", "variant=deepcache,cache=x"], ["cache takes a whole number"]),
    (["bench", "--protocol", "tiny", "--edgediff", "vae=tiny"], ["vae=tiny", "variant=tinyvae"]),
    (["bench", "--protocol", "tiny", "--edgediff", "vae=int8"], ["vae=int8", "int8 with dtype=int8"]),
    (["bench", "--protocol", "tiny", "--edgediff", "precision=fp8"], ["precision=fp8: f32 or bf16"]),
    (["bench", "--protocol", "tiny", "--edgediff", "variant=deepcache+int4"], ["unknown export variant 'int4'"]),
    (["bench", "--protocol", "tiny", "--edgediff", "fp16"], ["key=value"]),
    (["bench", "--protocol", "tiny", "--width", "100"], ["--width 100", "multiple of 8"]),
    (["bench", "compare", "NOWHERE.json"], ["no bench report at", "NOWHERE.json"]),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, words):
    argv = [str(tmp_path / a) if a.endswith(".json") else a for a in argv]
    code, _, err = run(capsys, *argv)
    one_line_error(code, err, *words)


def test_compare_refuses_a_file_that_is_not_a_report(tmp_path, capsys):
    (tmp_path / "other.json").write_text('{"hello": 1}')
    code, _, err = run(capsys, "bench", "compare", str(tmp_path / "other.json"))
    one_line_error(code, err, "not a bench report")


def test_flops_counted_from_the_graph(tmp_path):
    """A Conv and a MatMul whose multiply-accumulates are known by hand, at the shapes given at count time."""
    import onnx
    from onnx import TensorProto, helper

    from edgediff.bench.flops import graph_flops

    w = helper.make_tensor("w", TensorProto.FLOAT, [16, 4, 3, 3], np.zeros(16 * 4 * 9, np.float32))
    m = helper.make_tensor("m", TensorProto.FLOAT, [64, 32], np.zeros(64 * 32, np.float32))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
         helper.make_node("Reshape", ["y", "shape"], ["z"]),
         helper.make_node("MatMul", ["z", "m"], ["out"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, "h", "w"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [w, m, helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 64])])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    n, h, wd = 2, 8, 8
    conv = n * 16 * h * wd * 4 * 3 * 3  # every output value: C_in x k x k MACs
    matmul = (n * 16 * h * wd // 64) * 64 * 32
    assert graph_flops(path, {"x": {0: n, 2: h, 3: wd}}) == 2 * (conv + matmul)


CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Gold 6138 CPU @ 2.00GHz
flags\t\t: fpu sse2 avx fma avx2 avx512f
siblings\t: 8
cpu cores\t: 4
"""


def test_cpu_peak_is_an_estimate_from_flags_and_clock(tmp_path):
    peak = cpu_peak(CPUINFO, 8, sysfs=tmp_path)  # no cpufreq: the model name's nominal clock
    assert peak["isa"] == "avx512f" and peak["flops_per_cycle_per_core"] == 64
    assert peak["cores"] == 4  # two hyperthreads share one core's FMA units
    assert peak["clock_hz"] == 2.0e9 and peak["clock_source"] == "model name"
    assert peak["flops_per_s"] == 4 * 2.0e9 * 64
    assert "estimate" in peak["note"]
    avx2 = cpu_peak(CPUINFO.replace(" avx512f", "").replace(" @ 2.00GHz", "") + "cpu MHz\t\t: 3000.000\n", 8,
                    sysfs=tmp_path)
    assert (avx2["isa"], avx2["flops_per_s"], avx2["clock_source"]) == ("fma", 4 * 3.0e9 * 32, "/proc/cpuinfo cpu MHz")
    assert cpu_peak("", 2, sysfs=tmp_path)["flops_per_s"] is None  # unknown, not guessed


def test_fused_attention_flops_are_counted(tmp_path):
    """ONNX Runtime's MultiHeadAttention (the default export's attention): Q K^T and the weighted sum of
    V, B x S x L x D multiply-accumulates each."""
    import onnx
    from onnx import TensorProto, helper

    from edgediff.bench.flops import graph_flops

    graph = helper.make_graph(
        [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["out"], domain="com.microsoft", num_heads=4)],
        "g", [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["b", "s", 64]),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, ["b", 77, 64]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, ["b", 77, 64])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    path = tmp_path / "a.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)]), str(path))
    b, s = 2, 256
    assert graph_flops(path, {"q": {0: b, 1: s}, "k": {0: b}, "v": {0: b}}) == 2 * (2 * b * s * 77 * 64)


@pytest.mark.slow
def test_speed_levers_are_rows_of_one_run(tmp_path):
    """Feature caching and the guidance interval as bench rows beside the exact plan: each row runs its
    lever (the plan says the cache interval) and is scored against the exact picture."""
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["bench", "--protocol", "tiny", "--steps", "6", "--edgediff", "dtype=fp32",
                     "--edgediff", "variant=deepcache,cache=3", "--edgediff", "guidance_interval=0.5-20",
                     "--edgediff", "backend=openvino,precision=bf16",
                     "--json", str(tmp_path / "levers.json"), "--out-dir", str(tmp_path / "run")])
    assert code == 0, out.getvalue()
    rows = {r["name"]: r for r in json.loads((tmp_path / "levers.json").read_text())["rows"]}
    assert set(rows) == {"edgediff fp32", "edgediff fp32 deepcache cache 3", "edgediff fp32 cfg in 0.5-20",
                         "edgediff fp32 bf16 openvino"}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    cached = rows["edgediff fp32 deepcache cache 3"]
    assert "full UNet every 3 steps" in cached["plan"]
    assert rows["edgediff fp32"]["psnr_note"] == "reference"
    assert cached["psnr_db"] is not None and cached["psnr_db"] > 0  # a figure: not the exact picture
    assert rows["edgediff fp32 cfg in 0.5-20"]["psnr_db"] is not None
    # bf16 where this CPU is fast at it, else f32 saying so: the plan names it either way
    openvino = rows["edgediff fp32 bf16 openvino"]
    assert openvino["backend"] == "openvino" and "bf16" in openvino["plan"]


def test_machine_lists_gpus_not_backends_on_the_host_cpu(monkeypatch):
    """The report's GPUs are the accelerators the probes found: OpenVINO running on the host's CPU is
    not one (the first sd15-256 run of issue 15 listed the Xeon as a GPU)."""
    import edgediff.backends as backends
    from edgediff.backends.base import Device
    from edgediff.bench.machine import machine_facts

    found = [Device("cuda", "NVIDIA GeForce RTX 3060", ("CUDAExecutionProvider",), 12 * 2**30),
             Device("cpu", "Intel Xeon (2 cores)", ("CPUExecutionProvider",), cores=2),
             Device("openvino", "Intel Xeon", ("OpenVINO:CPU",), cores=2, bf16=True)]
    monkeypatch.setattr(backends, "probe_all", lambda: found)
    assert [g["name"] for g in machine_facts()["gpus"]] == ["NVIDIA GeForce RTX 3060"]
