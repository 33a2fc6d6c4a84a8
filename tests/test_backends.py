"""The backend registry, the probes and the sessions.

Each probe is fed what its real interface (onnxruntime's provider list, NVML, amdsmi, rocm-smi, sysctl,
psutil's memory) answers on the machines the planner must serve: an NVIDIA card with 12 GB and one
with 4 GB, an AMD card with 8 GB, an M1 with 8 GB of unified memory, a CPU-only PC with 8 GB. Provider
options are checked as built; IO binding and the fallback run for real on the CPU.
What is not run here: any session on a CUDA, ROCm or Core ML device (this machine has none)."""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from pathlib import Path
from types import SimpleNamespace

import hosts
import numpy as np
import pytest
from hosts import fake_nvml

from edgediff import EdgediffError, backends
from edgediff.backends.base import Device, OrtProviderBackend, OrtSession, Unavailable
from edgediff.backends.coreml import CoreMLBackend, coreml_provider_options
from edgediff.backends.cpu import CpuBackend
from edgediff.backends.cuda import CudaBackend, cuda_provider_options, providers_for, tensorrt_provider_options
from edgediff.backends.rocm import RocmBackend, migraphx_provider_options, rocm_provider_options
from edgediff.engine.components import TEXT_ENCODER, UNET


def test_cpu_ends_what_auto_chooses_and_is_always_there(monkeypatch):
    # the cpu ends the backends `auto` takes; openvino, after it, runs only when asked for
    assert list(backends.REGISTRY)[-2:] == ["cpu", "openvino"] and backends.automatic()[-1] == "cpu"
    hosts.simulate(monkeypatch)  # a PC with onnxruntime's CPU build, whatever runs this test
    found = backends.probe_all()
    assert [f.backend for f in found] == list(backends.REGISTRY)
    assert [type(f) for f in found] == [Unavailable, Unavailable, Unavailable, Device, Unavailable]
    cpu = found[-2]
    assert cpu.providers == ("CPUExecutionProvider",)
    assert cpu.total_memory and cpu.free_memory and cpu.free_memory <= cpu.total_memory
    assert backends.select("auto")[1].backend == "cpu"
    # the same PC with an NVIDIA card and onnxruntime-gpu: the card is chosen, the CPU is still there, last
    hosts.simulate(monkeypatch, providers=(CUDA, CPU), nvml=fake_nvml("NVIDIA GeForce RTX 3060", 12 * GiB,
                                                                      11 * GiB, (8, 6)))
    found = backends.probe_all()
    assert [type(f) for f in found] == [Device, Unavailable, Unavailable, Device, Unavailable]
    assert found[-2].backend == "cpu"
    backend, device = backends.select("auto")
    assert backend.name == "cuda" and device.name == "NVIDIA GeForce RTX 3060"


@pytest.mark.parametrize("name, present, provider", [
    ("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"], "CUDAExecutionProvider"),
    ("rocm", ["ROCMExecutionProvider", "CPUExecutionProvider"], "ROCMExecutionProvider"),
    ("rocm", ["MIGraphXExecutionProvider", "ROCMExecutionProvider"], "MIGraphXExecutionProvider"),
    ("coreml", ["CoreMLExecutionProvider", "CPUExecutionProvider"], "CoreMLExecutionProvider"),
])
def test_provider_backends_probe_what_onnxruntime_offers(name, present, provider):
    real = backends.get_backend(name)
    probe = OrtProviderBackend(name, real._wanted, real._missing_hint, available_providers=lambda: present)
    device = probe.probe()
    assert isinstance(device, Device)
    assert device.providers == (provider, "CPUExecutionProvider")  # CPU as ONNX Runtime's own fallback


def test_unavailable_backends_say_why_and_refuse_when_asked_for(monkeypatch):
    hosts.simulate(monkeypatch)
    cuda = backends.get_backend("cuda").probe()
    assert isinstance(cuda, Unavailable) and "onnxruntime-gpu" in cuda.reason
    with pytest.raises(EdgediffError, match="backend 'cuda' is not available here: onnxruntime-gpu"):
        backends.select("cuda")
    # onnxruntime-gpu on a machine without an NVIDIA driver: the provider is in the build, the GPU is not
    hosts.simulate(monkeypatch, providers=(CUDA, CPU),
                   nvml=fake_nvml("", 0, 0, (0, 0), init_error="Driver Not Loaded"))
    with pytest.raises(EdgediffError, match=r"backend 'cuda' is not available here: CUDA provider present "
                                            r"but no NVIDIA driver found \(NVML: Driver Not Loaded\)"):
        backends.select("cuda")
    assert backends.select("auto")[1].backend == "cpu"
    with pytest.raises(EdgediffError, match="unknown backend 'tpu'"):
        backends.select("tpu")


def test_session_casts_inputs_to_what_the_graph_declares(tmp_path):
    """optimum exports the text encoder with int32 input_ids; we feed int64 and the session casts."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["last_hidden_state"], to=TensorProto.FLOAT)], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["b", "s"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["b", "s"])])
    path = tmp_path / "m.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what ONNX Runtime 1.17 and later all load
    onnx.save(model, path)
    session = OrtSession(path, TEXT_ENCODER, ["CPUExecutionProvider"])
    assert session.input_types == {"input_ids": np.dtype(np.int32)}
    out = session.run(input_ids=np.array([[1, 2, 3]], dtype=np.int64))
    assert out["last_hidden_state"].tolist() == [[1.0, 2.0, 3.0]]
    with pytest.raises(EdgediffError, match="needs input"):
        session.run(other=np.zeros(1))


# --- Simulated inventories: each probe fed what the real interface would answer on that machine. ---

GiB = 2**30
CPU = "CPUExecutionProvider"
CUDA, TRT = "CUDAExecutionProvider", "TensorrtExecutionProvider"


def cuda(nvml, providers=(CUDA, CPU), **kwargs):
    kwargs.setdefault("environ", {})
    kwargs.setdefault("installed", lambda distribution: False)
    return CudaBackend(available_providers=lambda: list(providers), nvml=lambda: nvml, **kwargs)


def test_nvidia_12gb_card():
    device = cuda(fake_nvml("NVIDIA GeForce RTX 3060", 12 * GiB, 11 * GiB, (8, 6))).probe()
    assert device == Device("cuda", "NVIDIA GeForce RTX 3060", (CUDA, CPU), total_memory=12 * GiB,
                            free_memory=11 * GiB, unified_memory=False, fp16=True,
                            driver="NVIDIA driver 550.54.14", device_id=0, compute_capability=(8, 6))
    line = device.describe()
    assert "12.0 GiB total, 11.0 GiB free" in line and "fp16 fast" in line and "compute capability 8.6" in line


def test_nvidia_4gb_pascal_card_is_not_fp16_fast():
    # old nvidia-ml-py returns bytes for names and versions
    nvml = fake_nvml(b"NVIDIA GeForce GTX 1050 Ti", 4 * GiB, int(3.5 * GiB), (6, 1), driver=b"535.183.01")
    device = cuda(nvml).probe()
    assert (device.name, device.total_memory, device.free_memory) == ("NVIDIA GeForce GTX 1050 Ti", 4 * GiB,
                                                                      int(3.5 * GiB))
    assert device.fp16 is False and device.driver == "NVIDIA driver 535.183.01"


def test_nvidia_probe_follows_cuda_visible_devices_and_tensorrt_choice():
    nvml = fake_nvml("NVIDIA A10", 24 * GiB, 23 * GiB, (8, 6), count=4)
    device = cuda(nvml, providers=(TRT, CUDA, CPU), environ={"CUDA_VISIBLE_DEVICES": "2,3",
                                                              "EDGEDIFF_TENSORRT": "1"}).probe()
    assert nvml.handles == [2]  # CUDA's device 0 is the machine's GPU 2
    assert device.providers == (TRT, CUDA, CPU)
    quiet = cuda(nvml, providers=(TRT, CUDA, CPU)).probe()
    assert quiet.providers == (CUDA, CPU) and "set EDGEDIFF_TENSORRT=1" in quiet.notes[0]
    asked = cuda(nvml, tensorrt=True).probe()
    assert asked.providers == (CUDA, CPU) and "no TensorRT provider" in asked.notes[0]


def test_nvidia_unavailable_reasons():
    card = fake_nvml("NVIDIA GeForce RTX 3060", 12 * GiB, 11 * GiB, (8, 6))
    assert cuda(card, providers=(CPU,)).probe() == Unavailable(
        "cuda", "onnxruntime-gpu is not installed (pip install onnxruntime-gpu)")
    shadowed = cuda(card, providers=(CPU,), installed=lambda d: d == "onnxruntime-gpu").probe()
    assert "CPU-only onnxruntime package shadows it" in shadowed.reason
    no_driver = cuda(fake_nvml("", 0, 0, (0, 0), init_error="Driver Not Loaded")).probe()
    assert no_driver == Unavailable("cuda", "CUDA provider present but no NVIDIA driver found "
                                            "(NVML: Driver Not Loaded)")
    no_gpu = cuda(fake_nvml("", 0, 0, (0, 0), count=0)).probe()
    assert isinstance(no_gpu, Unavailable) and "NVML sees 0 NVIDIA GPU(s)" in no_gpu.reason


def _no_pynvml():
    raise ImportError("No module named 'pynvml'")


def test_nvidia_without_nvidia_ml_py_asks_nvidia_smi():
    asked = []

    def smi(args):
        asked.append(args)
        return "NVIDIA GeForce RTX 3060, 12288, 11264, 550.54.14, 8.6\nNVIDIA GeForce GT 1030, 2048, 1900, 550.54.14, 6.1\n"

    device = CudaBackend(available_providers=lambda: [CUDA, CPU], nvml=_no_pynvml, environ={}, run=smi).probe()
    assert asked[0][0] == "nvidia-smi"
    assert device == Device("cuda", "NVIDIA GeForce RTX 3060", (CUDA, CPU), total_memory=12 * GiB,
                            free_memory=11 * GiB, fp16=True, driver="NVIDIA driver 550.54.14",
                            compute_capability=(8, 6))
    second = CudaBackend(available_providers=lambda: [CUDA, CPU], nvml=_no_pynvml, run=smi,
                         environ={"CUDA_VISIBLE_DEVICES": "1"}).probe()
    assert second.name == "NVIDIA GeForce GT 1030" and not second.fp16
    # a driver too old to answer compute_cap: memory still known, fp16 not claimed
    old = CudaBackend(available_providers=lambda: [CUDA, CPU], nvml=_no_pynvml, environ={},
                      run=lambda args: "Tesla K80, 11441, 11000, 470.82.01, [Not Supported]\n").probe()
    assert old.total_memory == 11441 * 2**20 and old.compute_capability is None and not old.fp16


def test_onnxruntime_gpu_without_a_gpu_is_unavailable():
    """onnxruntime-gpu installs on any machine: with neither nvidia-ml-py nor a working nvidia-smi there
    is no NVIDIA driver, and `auto` must not pick cuda (it did: every session then fell back)."""
    for answer in (None, ""):  # nvidia-smi missing; or it answers nothing
        found = CudaBackend(available_providers=lambda: [CUDA, CPU], nvml=_no_pynvml, environ={},
                            run=lambda args: answer).probe()
        assert isinstance(found, Unavailable) and "no NVIDIA GPU found" in found.reason
        assert "pip install nvidia-ml-py" in found.reason
    beyond = CudaBackend(available_providers=lambda: [CUDA, CPU], nvml=_no_pynvml, environ={"CUDA_VISIBLE_DEVICES": "3"},
                         run=lambda args: "NVIDIA A10, 24576, 24000, 550.54.14, 8.6\n").probe()
    assert isinstance(beyond, Unavailable) and "lists 1 NVIDIA GPU(s), so there is no device 3" in beyond.reason


def fake_amdsmi(name, total, used, arch="gfx1032", init_error=None):
    """What AMD SMI's Python package answers: bytes from amdsmi_get_gpu_memory_total/usage."""
    def init(*flags):
        if init_error:
            raise RuntimeError(init_error)

    return SimpleNamespace(
        AmdSmiMemoryType=SimpleNamespace(VRAM="VRAM"), amdsmi_init=init, amdsmi_shut_down=lambda: None,
        amdsmi_get_processor_handles=lambda: ["h0"],
        amdsmi_get_gpu_asic_info=lambda h: {"market_name": name, "target_graphics_version": arch},
        amdsmi_get_gpu_memory_total=lambda h, kind: total if kind == "VRAM" else 0,
        amdsmi_get_gpu_memory_usage=lambda h, kind: used if kind == "VRAM" else 0,
        amdsmi_get_gpu_driver_info=lambda h: {"driver_name": "amdgpu", "driver_version": "6.7.0"})


def test_amd_8gb_card_through_amdsmi():
    backend = RocmBackend(available_providers=lambda: ["MIGraphXExecutionProvider", "ROCMExecutionProvider", CPU],
                          amdsmi=lambda: fake_amdsmi("AMD Radeon RX 6600", 8 * GiB, GiB // 2),
                          run=lambda args: pytest.fail("rocm-smi must not run when amdsmi works"))
    assert backend.probe() == Device("rocm", "AMD Radeon RX 6600", ("MIGraphXExecutionProvider", CPU),
                                     total_memory=8 * GiB, free_memory=8 * GiB - GiB // 2, fp16=True,
                                     driver="amdgpu 6.7.0", arch="gfx1032")


ROCM_SMI_JSON = ('{"card0": {"Card Series": "Navi 23 [Radeon RX 6600/6600 XT/6600M]", "GFX Version": "gfx1032", '
                 '"VRAM Total Memory (B)": "8573157376", "VRAM Total Used Memory (B)": "25165824"}, '
                 '"system": {"Driver version": "6.3.6"}}')


def test_amd_card_through_rocm_smi_when_amdsmi_is_not_importable():
    def no_amdsmi():
        raise ImportError("No module named 'amdsmi'")

    asked = []
    device = RocmBackend(available_providers=lambda: ["ROCMExecutionProvider", CPU], amdsmi=no_amdsmi,
                         run=lambda args: asked.append(args) or ROCM_SMI_JSON).probe()
    assert asked[0][:1] == ["rocm-smi"] and "--json" in asked[0]
    assert device.providers == ("ROCMExecutionProvider", CPU)
    assert (device.name, device.total_memory, device.free_memory, device.driver, device.arch) == (
        "Navi 23 [Radeon RX 6600/6600 XT/6600M]", 8573157376, 8573157376 - 25165824, "amdgpu 6.3.6", "gfx1032")
    unknown = RocmBackend(available_providers=lambda: ["ROCMExecutionProvider"], amdsmi=no_amdsmi,
                          run=lambda args: None).probe()
    assert unknown.total_memory is None and "neither amdsmi" in unknown.notes[0]


def test_amd_unavailable_reasons():
    assert "onnxruntime-migraphx" in RocmBackend(available_providers=lambda: [CPU]).probe().reason
    broken = RocmBackend(available_providers=lambda: ["MIGraphXExecutionProvider"],
                         amdsmi=lambda: fake_amdsmi("", 0, 0, init_error="AMDSMI_STATUS_DRIVER_NOT_LOADED")).probe()
    assert broken == Unavailable("rocm", "MIGraphX provider present but no AMD GPU driver found "
                                         "(amdsmi: AMDSMI_STATUS_DRIVER_NOT_LOADED)")


def mac(answers=None):
    answers = {"sysctl -n machdep.cpu.brand_string": "Apple M1\n", **(answers or {})}
    return lambda args: answers.get(" ".join(args))


def m1_memory():
    return 8 * GiB, 3 * GiB  # psutil's (total, available) on an 8 GB M1


def m1(providers=("CoreMLExecutionProvider", CPU), coremltools=True, version="15.1", **kwargs):
    return CoreMLBackend(available_providers=lambda: list(providers), system=lambda: "Darwin",
                         machine=lambda: "arm64", mac_version=lambda: version, run=kwargs.pop("run", mac()),
                         memory=kwargs.pop("memory", m1_memory),
                         has_coremltools=lambda: coremltools, **kwargs)


def test_apple_m1_with_8gb_unified_memory():
    device = m1().probe()
    assert (device.name, device.total_memory, device.unified_memory, device.fp16, device.driver) == (
        "Apple M1", 8 * GiB, True, True, "macOS 15.1")
    assert device.free_memory == 3 * GiB and not device.notes
    assert device.providers == ("CoreMLExecutionProvider", CPU)
    assert device.compute_units == ("ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY")
    # macOS 14: ONNX through ORT's provider still runs; the packages (macOS 15 target) do not
    old = m1(version="14.4.1").probe()
    assert old.compute_units == () and "macOS 15" in old.notes[0]
    unknown = m1(memory=lambda: (8 * GiB, None)).probe()
    assert unknown.free_memory is None and unknown.total_memory == 8 * GiB and "free memory unknown" in unknown.notes[0]


def test_coreml_unavailable_reasons():
    here = backends.get_backend("coreml").probe()
    import platform

    if platform.system() != "Darwin":
        assert here.reason == f"not on macOS with Apple Silicon (this is {platform.system()} {platform.machine()})"
    linux = CoreMLBackend(system=lambda: "Linux", machine=lambda: "x86_64").probe()
    assert linux == Unavailable("coreml", "not on macOS with Apple Silicon (this is Linux x86_64)")
    rosetta = CoreMLBackend(system=lambda: "Darwin", machine=lambda: "x86_64",
                            run=mac({"sysctl -n sysctl.proc_translated": "1\n"})).probe()
    assert "Rosetta" in rosetta.reason
    intel = CoreMLBackend(system=lambda: "Darwin", machine=lambda: "x86_64", run=mac()).probe()
    assert intel.reason == "not on macOS with Apple Silicon (this is macOS x86_64)"
    bare = m1(providers=(CPU,), coremltools=False).probe()
    assert bare.reason.startswith("macOS 15.1 on Apple Silicon, but this onnxruntime build has no CoreML")


def pc_memory():
    return 8053064 * 1024, 5120000 * 1024  # psutil's (total, available) on an 8 GB PC


def test_cpu_only_machine_with_8gb():
    device = CpuBackend(available_providers=lambda: [CPU], system=lambda: "Linux", memory=pc_memory,
                        cores=lambda: 4, cpu_name=lambda: "Intel(R) Core(TM) i5-8250U").probe()
    assert (device.name, device.total_memory, device.free_memory, device.cores) == (
        "Intel(R) Core(TM) i5-8250U (4 cores)", 8053064 * 1024, 5120000 * 1024, 4)
    assert device.unified_memory and not device.fp16 and device.providers == (CPU,)
    on_mac = CpuBackend(available_providers=lambda: [CPU], system=lambda: "Darwin", run=mac(), memory=m1_memory,
                        cores=lambda: 8).probe()
    assert (on_mac.name, on_mac.total_memory) == ("Apple M1 (8 cores)", 8 * GiB)
    assert CpuBackend(available_providers=lambda: ["AzureExecutionProvider"]).probe().reason == \
        "this onnxruntime build has no CPU execution provider"


def test_device_is_frozen_and_printable():
    device = CpuBackend(available_providers=lambda: [CPU], system=lambda: "Linux", memory=pc_memory,
                        cores=lambda: 4, cpu_name=lambda: "x").probe()
    with pytest.raises(FrozenInstanceError):
        device.free_memory = 0
    assert "free_memory=5242880000" in repr(device) and hash(device)


# --- Provider options: built by pure functions, checked as built. ---

def test_cuda_session_asks_for_the_probed_device_and_the_memory_limit(tmp_path, monkeypatch, caplog):
    """What ONNX Runtime is asked for when the CUDA backend opens a session (recorded; no GPU here, so the
    session then falls back to the CPU): the device the backend was made for, and the allocator cap it
    was given, or none."""
    asked = hosts.record_sessions(monkeypatch)
    path = _add_graph(tmp_path / "m.onnx")
    backend = cuda(fake_nvml("NVIDIA A10", 24 * GiB, 23 * GiB, (8, 6), count=2), device_id=1)
    device = backend.probe()
    for limit in (3 * GiB, None):
        asked.clear()
        session, took, _ = backends.open_with_fallback(path, UNET, backend, device, memory_limit=limit)
        options = hosts.provider_options(asked[0][1], CUDA)
        assert options["device_id"] == "1" and options.get("gpu_mem_limit") == (limit and str(limit))
        assert took.name == "cpu" and hosts.provider_options(asked[-1][1], CUDA) is None


def test_cuda_backend_preloads_the_cuda_libraries_once(tmp_path, monkeypatch):
    """onnxruntime-gpu's wheels find CUDA and cuDNN in the nvidia-* pip packages only after
    onnxruntime.preload_dlls(): the backend calls it before its first session, and only then."""
    import onnxruntime as ort

    from edgediff.backends import cuda as cuda_module

    calls = []
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: calls.append(a), raising=False)
    monkeypatch.setattr(cuda_module, "_PRELOADED", False)
    hosts.record_sessions(monkeypatch)
    path = _add_graph(tmp_path / "m.onnx")
    backend = cuda(fake_nvml("NVIDIA A10", 24 * GiB, 23 * GiB, (8, 6)))
    for _ in range(2):
        backends.open_with_fallback(path, UNET, backend, backend.probe())
    assert calls == [()]


def test_tensorrt_first_with_a_cache_per_export_and_the_graphs_dtype(tmp_path):
    unet = tmp_path / "model" / "unet"
    unet.mkdir(parents=True)
    (unet / "model.onnx").write_bytes(b"graph")
    # a manifest beside the graph that says otherwise: the backend takes the dtype it is given, and
    # never reads a model's manifest itself (engine/pipeline.Pipeline._open passes it)
    (tmp_path / "model" / "edgediff.json").write_text('{"dtype": "fp32"}')
    device = Device("cuda", "NVIDIA A10", (TRT, CUDA, CPU), device_id=0)
    providers = providers_for(device, unet / "model.onnx", memory_limit=8 * GiB, dtype="fp16")
    assert [p if isinstance(p, str) else p[0] for p in providers] == [TRT, CUDA, CPU]
    trt, cuda_options = providers[0][1], providers[1][1]
    assert trt["trt_fp16_enable"] == "1" and cuda_options["gpu_mem_limit"] == str(8 * GiB)
    assert providers_for(device, unet / "model.onnx", dtype="fp32")[0][1]["trt_fp16_enable"] == "0"
    cache = Path(trt["trt_engine_cache_path"])
    assert cache.is_dir() and cache.parent.name == "tensorrt" and cache.name.startswith("unet-")
    (unet / "model.onnx").write_bytes(b"re-exported graph")  # new weights, same path: a new engine cache
    assert providers_for(device, unet / "model.onnx")[0][1]["trt_engine_cache_path"] != str(cache)
    assert [p if isinstance(p, str) else p[0] for p in providers_for(
        Device("cuda", "x", (CUDA, CPU)), unet / "model.onnx")] == [CUDA, CPU]


def test_rocm_and_coreml_provider_options():
    assert migraphx_provider_options(0) == {"device_id": "0", "migraphx_fp16_enable": "0",
                                            "migraphx_exhaustive_tune": "0"}
    assert rocm_provider_options(0, GiB) == {"device_id": "0", "arena_extend_strategy": "kSameAsRequested",
                                             "miopen_conv_exhaustive_search": "1",
                                             "do_copy_in_default_stream": "1", "gpu_mem_limit": str(GiB)}
    assert coreml_provider_options() == {"ModelFormat": "MLProgram", "MLComputeUnits": "ALL",
                                         "RequireStaticInputShapes": "0"}
    assert coreml_provider_options("CPU_AND_NE")["MLComputeUnits"] == "CPUAndNeuralEngine"


# --- IO binding: a kept input is sent once, and the results are those of a plain run. ---

def _add_graph(path):
    """out_sample = sample + encoder_hidden_states: the smallest graph with a per-step and a kept input."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["sample", "encoder_hidden_states"], ["out_sample"])], "g",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["b", "n"]),
         helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, ["b", "n"])],
        [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, ["b", "n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_kept_input_is_bound_once_and_gives_the_plain_results(tmp_path, monkeypatch):
    import onnxruntime as ort

    path = _add_graph(tmp_path / "m.onnx")
    plain = OrtSession(path, UNET, [CPU])
    bound = OrtSession(path, UNET, [CPU])
    created = []
    real = ort.OrtValue.ortvalue_from_numpy
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy",
                        staticmethod(lambda *a, **k: created.append(a[1:]) or real(*a, **k)))
    rng = np.random.default_rng(0)
    context = rng.standard_normal((2, 5)).astype(np.float32)
    bound.keep("encoder_hidden_states", context)
    for step in range(3):
        sample = rng.standard_normal((2, 5)).astype(np.float32)
        want = plain.run(sample=sample, encoder_hidden_states=context)["out_sample"]
        got = bound.run(sample=sample, encoder_hidden_states=context)["out_sample"]
        assert np.array_equal(got, want)
    assert created == [("cpu", 0)] and bound.uploads == 1 and bound.bound_runs == 3  # sent once, not per step
    assert np.array_equal(bound.run(sample=sample)["out_sample"], want)  # a kept input may be omitted
    other = context * 2  # a new array for a kept input is kept in its place, once
    assert np.array_equal(bound.run(sample=sample, encoder_hidden_states=other)["out_sample"], sample + other)
    assert np.array_equal(bound.run(sample=sample)["out_sample"], sample + other) and bound.uploads == 2
    with pytest.raises(EdgediffError, match="no input 'timestep' to keep"):
        bound.keep("timestep", np.zeros(2))


# --- Core ML packages: the session's conversion, against a stand-in MLModel with a real description. ---

def _text_encoder_package_spec(units="CPU_AND_NE"):
    pytest.importorskip("coremltools")
    from coremltools.proto import FeatureTypes_pb2, Model_pb2

    spec = Model_pb2.Model()
    ids = spec.description.input.add()
    ids.name = "input_ids"
    ids.type.multiArrayType.dataType = FeatureTypes_pb2.ArrayFeatureType.INT32
    ids.type.multiArrayType.shape.extend([2, 77])
    for name, shape in (("last_hidden_state", [2, 77, 8]), ("pooler_output", [2, 8])):
        out = spec.description.output.add()
        out.name = name
        out.type.multiArrayType.dataType = FeatureTypes_pb2.ArrayFeatureType.FLOAT32
        out.type.multiArrayType.shape.extend(shape)
    spec.description.metadata.userDefined["com.edgediff.compute_units"] = units
    return spec


class StandInMLModel:
    """coremltools.models.MLModel's get_spec and predict; Core ML itself predicts on macOS only."""

    def __init__(self, spec):
        self.spec, self.feeds = spec, []

    def get_spec(self):
        return self.spec

    def predict(self, feeds):
        self.feeds.append(feeds)
        ids = feeds["input_ids"].astype(np.float16)
        return {"last_hidden_state": np.repeat(ids[..., None], 8, axis=-1), "pooler_output": ids[:, :8]}


def test_coreml_session_converts_inputs_and_outputs(tmp_path):
    spec = _text_encoder_package_spec()
    folder = tmp_path / "sd-coreml" / "text_encoder"
    (folder / "model.mlpackage").mkdir(parents=True)
    loaded = []

    def load(path, units):
        loaded.append((path.name, units))
        return StandInMLModel(spec)

    backend = m1(load_model=load, read_spec=lambda path: spec)
    session = backend.open(folder / "model.onnx", TEXT_ENCODER, backend.probe())
    assert loaded == [("model.mlpackage", "CPU_AND_NE")]  # the units the package was exported for
    assert session.input_types == {"input_ids": np.dtype(np.int32)} and session.providers == ("CoreML CPU_AND_NE",)
    ids = np.arange(2 * 77, dtype=np.int64).reshape(2, 77)
    out = session.run(input_ids=ids)
    assert session._model.feeds[0]["input_ids"].dtype == np.int32  # Core ML has no int64 arrays
    assert out["last_hidden_state"].dtype == np.float32 and out["last_hidden_state"].shape == (2, 77, 8)
    assert np.array_equal(out["pooler_output"], ids[:, :8].astype(np.float32))
    with pytest.raises(EdgediffError, match=r"input_ids has shape \(1, 77\), but this Core ML package takes "
                                            r"\(2, 77\) only"):
        session.run(input_ids=ids[:1])
    with pytest.raises(EdgediffError, match="needs input"):
        session.run(other=ids)


def test_coreml_backend_picks_the_artifact_it_can_run(tmp_path):
    folder = tmp_path / "text_encoder"
    (folder / "model.mlpackage").mkdir(parents=True)
    packages_only = Device("coreml", "Apple M1", (), compute_units=())
    with pytest.raises(EdgediffError, match="needs coremltools on macOS 15"):
        m1().open(folder / "model.onnx", TEXT_ENCODER, packages_only)
    # no coremltools but ORT's CoreML provider: the ONNX file is what it needs, and it is missing here
    with pytest.raises(EdgediffError, match="model.onnx is missing"):
        m1().open(folder / "model.onnx", TEXT_ENCODER, Device("coreml", "Apple M1", ("CoreMLExecutionProvider", CPU)))


# --- Fallback: a backend that fails to open hands the component to the next available one. ---

def test_cuda_session_that_cannot_start_falls_back_to_the_cpu(tmp_path, caplog):
    """The real CUDA backend, probed as a 12 GB card: this onnxruntime has no CUDA provider, so ONNX Runtime
    would quietly run on the CPU; the session refuses that and the component moves to the cpu backend."""
    path = _add_graph(tmp_path / "m.onnx")
    backend = cuda(fake_nvml("NVIDIA GeForce RTX 3060", 12 * GiB, 11 * GiB, (8, 6)))
    device = backend.probe()
    with caplog.at_level("WARNING", logger="edgediff"):
        session, took, on = backends.open_with_fallback(path, UNET, backend, device, memory_limit=6 * GiB)
    assert took.name == "cpu" and on.backend == "cpu" and session.providers == (CPU,)
    assert "cuda could not open the unet (ONNX Runtime could not start CUDAExecutionProvider" in caplog.text
    assert "running it on cpu instead" in caplog.text
    x = np.ones((1, 3), np.float32)
    assert session.run(sample=x, encoder_hidden_states=x)["out_sample"].tolist() == [[2, 2, 2]]


def test_fallback_with_an_injected_failing_backend(tmp_path, caplog):
    path = _add_graph(tmp_path / "m.onnx")

    def refuse(*args):
        raise RuntimeError("hipErrorNoBinaryForGpu: no kernel image for gfx1032")

    failing = SimpleNamespace(name="rocm", open=refuse)
    device = Device("rocm", "AMD Radeon RX 6600", ("MIGraphXExecutionProvider", CPU))
    with caplog.at_level("WARNING", logger="edgediff"):
        session, took, _ = backends.open_with_fallback(path, UNET, failing, device)
    assert took.name == "cpu" and "rocm could not open the unet (hipErrorNoBinaryForGpu" in caplog.text
    # nothing to fall back to: the chosen backend's error, as an EdgediffError
    with pytest.raises(EdgediffError, match="rocm could not open the unet: hipErrorNoBinaryForGpu"):
        backends.open_with_fallback(path, UNET, failing, device, fallbacks=[failing_probe()])
    # a missing file is not the backend's fault: no fallback, no warning
    caplog.clear()
    with pytest.raises(EdgediffError, match="is missing"):
        backends.open_with_fallback(tmp_path / "none.onnx", UNET, backends.get_backend("cpu"),
                                    backends.get_backend("cpu").probe())
    assert "instead" not in caplog.text


def failing_probe():
    return SimpleNamespace(name="coreml", probe=lambda: Unavailable("coreml", "not here"))


def test_devices_command_says_why_accelerators_are_unavailable(monkeypatch, capsys):
    from edgediff.cli import main

    hosts.simulate(monkeypatch, system="Linux", machine="x86_64")
    assert main(["devices"]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert list(lines) == ["cuda", "rocm", "coreml", "cpu", "openvino"]
    assert lines["cuda"] == "unavailable: onnxruntime-gpu is not installed (pip install onnxruntime-gpu)"
    assert lines["rocm"].startswith("unavailable: no ONNX Runtime build with the MIGraphX or ROCm")
    assert lines["coreml"] == "unavailable: not on macOS with Apple Silicon (this is Linux x86_64)"
    assert lines["cpu"].startswith("available: ") and "GiB total" in lines["cpu"] and CPU in lines["cpu"]
    # with a card, its line says what the probe found
    hosts.simulate(monkeypatch, providers=(CUDA, CPU), nvml=fake_nvml("NVIDIA GeForce RTX 3060", 12 * GiB,
                                                                      11 * GiB, (8, 6)))
    assert main(["devices"]) == 0
    cuda_line = capsys.readouterr().out.splitlines()[0]
    assert cuda_line.startswith("cuda     available: NVIDIA GeForce RTX 3060; 12.0 GiB total, 11.0 GiB free")
