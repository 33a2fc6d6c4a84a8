"""The OpenVINO backend: real sessions on this machine's CPU (openvino is in the test extra), against ONNX
Runtime's pictures; the probe against what OpenVINO answers on machines this is not (an Intel laptop with
an iGPU and an NPU, a desktop with an Arc card, a CPU with or without bf16).

What is not run here: any session on an Intel GPU or NPU (this machine has neither)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import hosts
import numpy as np
import pytest
from hosts import FakeOpenVinoCore

from edgediff import EdgediffError, backends
from edgediff.backends.base import Device, GiB, MissingComponent, Overrides, Unavailable
from edgediff.backends.openvino import MISSING, OpenVinoBackend, compile_config
from edgediff.backends.openvino.session import read_model
from edgediff.engine.components import TEXT_ENCODER, UNET
from edgediff.engine.metrics import psnr
from edgediff.engine.pipeline import Pipeline

MIN_PSNR = 40.0  # dB: the same graph in f32 on two runtimes; they differ by summation order only
INTEGRATED, DISCRETE = "Type.INTEGRATED", "Type.DISCRETE"  # str() of openvino.properties.device.Type


def cpu_answers(name="Intel(R) Core(TM) Ultra 7 155H",
                capabilities=("FP32", "FP16", "INT8", "BIN", "EXPORT_IMPORT")):
    return {"FULL_DEVICE_NAME": name, "DEVICE_TYPE": INTEGRATED, "OPTIMIZATION_CAPABILITIES": list(capabilities)}


def gpu_answers(name, kind, memory):
    return {"FULL_DEVICE_NAME": name, "DEVICE_TYPE": kind, "GPU_DEVICE_TOTAL_MEM_SIZE": memory,
            "OPTIMIZATION_CAPABILITIES": ["FP32", "BIN", "FP16", "INT8", "GPU_HW_MATMUL", "EXPORT_IMPORT"]}


LAPTOP = {  # an Intel Core Ultra laptop with 16 GB: CPU, Arc iGPU, AI Boost NPU
    "CPU": cpu_answers(),
    "GPU": gpu_answers("Intel(R) Arc(TM) Graphics (iGPU)", INTEGRATED, int(14.5 * GiB)),
    "NPU": {"FULL_DEVICE_NAME": "Intel(R) AI Boost", "DEVICE_TYPE": INTEGRATED,
            "OPTIMIZATION_CAPABILITIES": ["FP16", "INT8", "EXPORT_IMPORT"]},
}


def probe(devices, environ=None, memory=(16 * GiB, 9 * GiB)):
    return OpenVinoBackend(core=lambda: FakeOpenVinoCore(devices), version=lambda: "2026.4.1",
                           memory=lambda: memory, cores=lambda: 8, environ=environ or {}).probe()


# --- The probe, on machines described by what OpenVINO answers. ---

def test_laptop_runs_on_its_igpu_and_lists_the_npu_and_cpu():
    device = probe(LAPTOP)
    assert isinstance(device, Device) and device.backend == "openvino"
    assert (device.name, device.providers) == ("Intel(R) Arc(TM) Graphics (iGPU)", ("OpenVINO:GPU",))
    # the iGPU takes the host's memory: what is free there, up to what its driver lets it address
    assert device.unified_memory and (device.total_memory, device.free_memory) == (int(14.5 * GiB), 9 * GiB)
    assert device.fp16 and not device.bf16 and device.driver == "OpenVINO 2026.4.1"
    assert device.notes == (
        "also: CPU (Intel(R) Core(TM) Ultra 7 155H): EDGEDIFF_OPENVINO_DEVICE=CPU to use it",
        "also: NPU (Intel(R) AI Boost), not used: OpenVINO's NPU runs static fp16 graphs and SD is untested on it")
    line = device.describe()
    assert "14.5 GiB total, 9.0 GiB free (unified memory); fp16 fast" in line
    assert "[also: NPU (Intel(R) AI Boost)" in line
    # asked for the CPU by name
    on_cpu = probe(LAPTOP, environ={"EDGEDIFF_OPENVINO_DEVICE": "CPU"})
    assert on_cpu.providers == ("OpenVINO:CPU",) and on_cpu.name == "Intel(R) Core(TM) Ultra 7 155H (8 cores)"
    assert on_cpu.cores == 8 and on_cpu.total_memory == 16 * GiB
    assert "EDGEDIFF_OPENVINO_DEVICE=GPU.3, but OpenVINO's devices here are CPU, GPU, NPU" in \
        probe(LAPTOP, environ={"EDGEDIFF_OPENVINO_DEVICE": "GPU.3"}).reason


def test_a_discrete_card_comes_before_the_igpu():
    desktop = {"CPU": cpu_answers("Intel(R) Core(TM) i7-12700K"),
               "GPU.0": gpu_answers("Intel(R) UHD Graphics 770 (iGPU)", INTEGRATED, 13 * GiB),
               "GPU.1": gpu_answers("Intel(R) Arc(TM) A770 Graphics (dGPU)", DISCRETE, 16 * GiB)}
    device = probe(desktop)
    assert device.providers == ("OpenVINO:GPU.1",) and device.total_memory == 16 * GiB
    assert not device.unified_memory and device.free_memory is None  # OpenVINO does not report it
    assert "free memory unknown: OpenVINO does not report it" in device.notes


def test_cpu_with_bf16_says_so():
    xeon = probe({"CPU": cpu_answers("Intel(R) Xeon(R) Platinum 8480+", ("BF16", "FP32", "FP16", "INT8", "BIN"))})
    assert xeon.bf16 and xeon.providers == ("OpenVINO:CPU",) and xeon.unified_memory and xeon.cores == 8
    assert "; bf16 fast" in xeon.describe()
    older = probe({"CPU": cpu_answers("Intel(R) Core(TM) i5-8250U", ("FP32", "INT8", "BIN"))})
    assert not older.bf16 and not older.fp16 and "bf16" not in older.describe()


def test_unavailable_says_why():
    def not_installed():
        raise ImportError("No module named 'openvino'")

    found = OpenVinoBackend(core=not_installed).probe()
    assert found == Unavailable("openvino", MISSING) and "pip install 'edgediff[openvino]'" in MISSING
    assert "sees no CPU or GPU" in probe({"NPU": LAPTOP["NPU"]}).reason
    # a device whose properties cannot be read is left out, with a note; the others still run
    broken = {"CPU": cpu_answers(), "GPU": {"FULL_DEVICE_NAME": "Intel(R) Iris(R) Xe Graphics"}}
    device = probe(broken)
    assert device.providers == ("OpenVINO:CPU",)
    assert device.notes[0].startswith("GPU: OpenVINO could not read its properties (Unsupported property "
                                      "DEVICE_TYPE")


def test_select_and_devices_name_openvino(monkeypatch, capsys):
    from edgediff.cli import main

    hosts.simulate(monkeypatch)
    with pytest.raises(EdgediffError, match=r"backend 'openvino' is not available here: openvino is not installed "
                                            r"\(pip install 'edgediff\[openvino\]'\)"):
        backends.select("openvino")
    assert main(["devices"]) == 0
    assert "openvino unavailable: openvino is not installed (pip install 'edgediff[openvino]')" in \
        capsys.readouterr().out.splitlines()
    hosts.simulate(monkeypatch, openvino_core=FakeOpenVinoCore(LAPTOP))
    assert backends.select("auto")[1].backend == "cpu"  # opt-in: auto never takes it
    assert backends.select("openvino")[1].name == "Intel(R) Arc(TM) Graphics (iGPU)"
    assert main(["devices"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("openvino available: Intel(R) Arc(TM) Graphics (iGPU); 14.5 GiB total")
    assert "[also: NPU (Intel(R) AI Boost), not used" in line


def test_devices_shows_the_real_openvino(capsys):
    """openvino is installed here (the test extra): its line says what it found on this machine."""
    from edgediff.cli import main

    assert main(["devices"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("openvino "))
    assert line.startswith("openvino available: ") and "providers OpenVINO:CPU" in line and "OpenVINO 20" in line


def test_import_edgediff_never_imports_openvino():
    code = ("import sys, edgediff, edgediff.backends, edgediff.backends.openvino; "
            "from edgediff.engine.pipeline import Pipeline; assert 'openvino' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- Sessions on this machine's CPU. ---

def cpu_device(bf16=False) -> Device:
    return Device("openvino", "CPU", ("OpenVINO:CPU",), cores=2, unified_memory=True, bf16=bf16)


class SpyCore:
    """openvino.Core, recording what each compile_model is given and the compiled model it returns."""

    def __init__(self):
        import openvino as ov

        self.core = ov.Core()
        self.compiled: list[tuple[str, dict, object]] = []

    def compile_model(self, model, device, config):
        compiled = self.core.compile_model(model, device, config)
        self.compiled.append((device, dict(config), compiled))
        return compiled

    def __getattr__(self, name):
        return getattr(self.core, name)


def ids(batch=2):
    return np.arange(batch * 77, dtype=np.int64).reshape(batch, 77) % 100


def test_precision_reaches_the_compiler(builtin_model, monkeypatch, caplog):
    """The plan's precision is OpenVINO's INFERENCE_PRECISION_HINT: bf16 where the device has it, f32 for
    the exact plan, which must be set: OpenVINO's CPU defaults to bf16 on CPUs that have it (this one)."""
    spy = SpyCore()
    backend = OpenVinoBackend(core=lambda: spy)
    path = builtin_model / "text_encoder" / "model.onnx"
    exact = backend.open(path, TEXT_ENCODER, cpu_device(bf16=True))
    exact.run(input_ids=ids())
    bf16 = backend.open(path, TEXT_ENCODER, cpu_device(bf16=True), precision="bf16")
    bf16.run(input_ids=ids())
    (_, f32_config, f32_model), (device, bf16_config, _) = spy.compiled
    assert device == "CPU" and f32_config["INFERENCE_PRECISION_HINT"] == "f32"
    assert bf16_config["INFERENCE_PRECISION_HINT"] == "bf16"
    assert str(f32_model.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"  # what it compiled
    assert f32_config["PERFORMANCE_HINT"] == "LATENCY" and f32_config["INFERENCE_NUM_THREADS"] == 2
    # bf16 asked of a device without it: f32, with a warning
    with caplog.at_level("WARNING", logger="edgediff"):
        slow = backend.open(path, TEXT_ENCODER, cpu_device(bf16=False), precision="bf16")
    assert slow.config["INFERENCE_PRECISION_HINT"] == "f32"
    assert "not fast at bf16; running the text_encoder in f32" in caplog.text
    with pytest.raises(EdgediffError, match="unknown precision 'fp8'"):
        backend.open(path, TEXT_ENCODER, cpu_device(), precision="fp8")
    # a GPU gets no CPU thread count
    assert "INFERENCE_NUM_THREADS" not in compile_config(Device("openvino", "x", ("OpenVINO:GPU.1",)), "f32", None)


def test_shapes_compile_once_and_are_cached_on_disk(builtin_model, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDIFF_CACHE", str(tmp_path))
    spy = SpyCore()
    session = OpenVinoBackend(core=lambda: spy).open(builtin_model / "text_encoder" / "model.onnx", TEXT_ENCODER,
                                                     cpu_device())
    assert session.providers == ("OpenVINO:CPU",) and session.input_types == {"input_ids": np.dtype(np.int64)}
    first = session.run(input_ids=ids())
    again = session.run(input_ids=ids())
    assert session.compiles == 1 and np.array_equal(first["last_hidden_state"], again["last_hidden_state"])
    assert set(first) == {"last_hidden_state", "pooler_output"}  # the ONNX names, not OpenVINO's node names
    session.run(input_ids=ids(1))  # a new shape set compiles once more; the first is still kept
    session.run(input_ids=ids())
    assert session.compiles == 2
    cache = tmp_path / "openvino"
    assert spy.compiled[0][1]["CACHE_DIR"] == str(cache) and any(cache.iterdir())
    # a bounded number of shape sets are kept: the least recently used is compiled (or loaded) again
    session._max_compiled = 1
    for batch in (3, 2, 3):  # each evicts the one before it
        session.run(input_ids=ids(batch))
    assert session.compiles == 5 and len(session._compiled) == 1


def test_inputs_are_cast_and_checked_like_onnx_runtime(tmp_path):
    """optimum's graphs: a 0-d timestep and int32 ids. The session casts to what the graph declares."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["f", "timestep"], ["out_sample"])], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["b", 3]),
         helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, ["b", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    session = OpenVinoBackend().open(tmp_path / "m.onnx", UNET, cpu_device())
    assert session.input_types == {"input_ids": np.dtype(np.int32), "timestep": np.dtype(np.float32)}
    assert session.scalar_inputs == {"timestep"}
    out = session.run(input_ids=np.ones((2, 3), np.int64), timestep=np.array([10.0, 10.0]))["out_sample"]
    assert out.dtype == np.float32 and out.tolist() == [[11, 11, 11]] * 2
    session.keep("timestep", np.array([5.0, 5.0]))
    assert session.run(input_ids=np.zeros((1, 3), np.int64))["out_sample"].tolist() == [[5, 5, 5]]
    with pytest.raises(EdgediffError, match="timestep is one scalar in this graph, but the batch needs 2"):
        session.run(input_ids=np.ones((2, 3)), timestep=np.array([1.0, 2.0]))
    with pytest.raises(EdgediffError, match=r"needs input\(s\) \['input_ids'\]"):
        session.run(timestep=np.array([1.0]))
    with pytest.raises(EdgediffError, match="no input 'sample' to keep"):
        session.keep("sample", np.zeros(1))


def test_unreadable_graphs_are_one_line(tmp_path):
    with pytest.raises(MissingComponent, match="is missing; export the model again"):
        OpenVinoBackend().open(tmp_path / "none.onnx", UNET, cpu_device())
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    with pytest.raises(EdgediffError, match=r"OpenVINO \S+ cannot read .*bad.onnx \(.*\); export the model again"):
        OpenVinoBackend().open(tmp_path / "bad.onnx", UNET, cpu_device())

    class Before2026_3:  # what OpenVINO 2025.1 to 2026.2 answer to edgediff's default (fused) export
        def read_model(self, path):
            raise RuntimeError("Check 'false' failed at src/frontends/onnx/frontend/src/frontend.cpp:164:\n"
                               "FrontEnd API failed with GeneralFailure:\nOpenVINO does not support the following "
                               "ONNX operations: com.microsoft.MultiHeadAttention\n")

    (tmp_path / "fused.onnx").write_bytes(b"graph")
    with pytest.raises(EdgediffError, match=r"^OpenVINO 2025.1.0 cannot read the fused attention \(com.microsoft."
                                            r"MultiHeadAttention\) in .*: pip install 'openvino>=2026.3', or "
                                            r"export "
                                            r"the model with `--attention standard`$"):
        read_model(Before2026_3(), tmp_path / "fused.onnx", "2025.1.0")


# --- The fallback: openvino hands a component it cannot open to the cpu backend. ---

def test_a_failing_openvino_open_falls_back_to_the_cpu(builtin_model, caplog):
    path = builtin_model / "text_encoder" / "model.onnx"
    gone = Device("openvino", "Intel(R) Arc(TM) A770 Graphics (dGPU)", ("OpenVINO:GPU.7",))
    with caplog.at_level("WARNING", logger="edgediff"):
        session, took, on = backends.open_with_fallback(path, TEXT_ENCODER, OpenVinoBackend(), gone,
                                                        precision="bf16")
    assert took.name == "cpu" and on.backend == "cpu" and session.providers == ("CPUExecutionProvider",)
    assert "openvino could not open the text_encoder (OpenVINO cannot use GPU.7 here" in caplog.text
    # an injected failure, as any other backend's: the cpu takes it
    failing = SimpleNamespace(name="openvino", open=lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no")))
    assert backends.open_with_fallback(path, TEXT_ENCODER, failing, gone)[1].name == "cpu"


# --- Whole generations, against ONNX Runtime's. ---

def generate(folder, backend, **kwargs):
    pipe = Pipeline.from_pretrained(folder, backend=backend, safety_checker=False, **kwargs)
    result = pipe("a red circle on a blue square", num_inference_steps=4, seed=7, width=64, height=64)
    return pipe, result.images[0]


def test_builtin_model_matches_onnx_runtime(builtin_model):
    """The built-in model's default export (fused attention: com.microsoft.MultiHeadAttention, which
    OpenVINO reads from 2026.3 on) on both backends, same seed."""
    _, want = generate(builtin_model, "cpu")
    pipe, got = generate(builtin_model, "openvino")
    assert pipe.device.backend == "openvino" and not pipe.moved
    assert json.loads((builtin_model / "edgediff.json").read_text())["attention"] == "fused"
    figure = psnr(got, want)
    print(f"[built-in model] OpenVINO f32 against ONNX Runtime: {figure:.1f} dB")
    assert figure >= MIN_PSNR, f"built-in model: OpenVINO f32 against ONNX Runtime {figure:.1f} dB"


def test_tiny_sd1_matches_onnx_runtime(tiny):
    folder = tiny("sd1")[1]
    _, want = generate(folder, "cpu")
    pipe, got = generate(folder, "openvino")
    assert not pipe.moved
    figure = psnr(got, want)
    print(f"[tiny SD 1.x] OpenVINO f32 against ONNX Runtime: {figure:.1f} dB")
    assert figure >= MIN_PSNR, f"tiny SD 1.x: OpenVINO f32 against ONNX Runtime {figure:.1f} dB"


def test_loras_replace_the_graphs_weights(tiny, tmp_path):
    """A LoRA's merged weights replace the graph's Constants by name: the picture is ONNX Runtime's with
    the same LoRA, and not the picture without it."""
    from loras import kohya

    folder = tiny("sd1")[1]
    weights = json.loads((folder / "unet" / "weight_map.json").read_text())["weights"]
    # the attention projections, by their PyTorch names and shapes (weight_map.json's)
    layers = {("lora_unet", name.removesuffix(".weight")): tuple(shape)
              for name, (_, _, _, shape, *_rest) in weights.items()
              if ".attn" in name and ".to_" in name and name.endswith(".weight")}
    lora = kohya(tmp_path / "style.safetensors", layers, scale=0.5)
    _, want = generate(folder, "cpu", loras=[(str(lora), 1.0)])
    pipe, got = generate(folder, "openvino", loras=[(str(lora), 1.0)])
    _, plain = generate(folder, "openvino")
    print(f"[LoRA] OpenVINO {psnr(got, want):.1f} dB against ONNX Runtime; {psnr(got, plain):.1f} dB from no LoRA")
    assert not pipe.moved and psnr(got, want) >= MIN_PSNR, f"{psnr(got, want):.1f} dB against ONNX Runtime"
    assert psnr(got, plain) < 30, f"the LoRA changed the picture by only {psnr(got, plain):.1f} dB"
    # no compiled-model cache for LoRA'd weights (each would leave a copy of the weights on disk)
    assert "CACHE_DIR" not in pipe._sessions["unet"].config


def test_overrides_that_do_not_fit_are_one_line(builtin_model):
    path = builtin_model / "text_encoder" / "model.onnx"
    with pytest.raises(EdgediffError, match="has no weight 'nope' for a LoRA to replace; use --backend cpu"):
        OpenVinoBackend().open(path, TEXT_ENCODER, cpu_device(), overrides=Overrides("k", {"nope": np.zeros(1)}))
    init = next(iter(json.loads((path.parent / "weight_map.json").read_text())["weights"].values()))[0]
    with pytest.raises(EdgediffError, match=rf"the LoRA's weight for '{init}' is float32\[3\], the graph's is"):
        OpenVinoBackend().open(path, TEXT_ENCODER, cpu_device(),
                               overrides=Overrides("k", {init: np.zeros(3, np.float32)}))
