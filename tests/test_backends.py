"""The backend registry and probes, with injected provider lists where the hardware is absent.
What is not run here: any session on a CUDA, ROCm or Core ML device (this machine has none)."""

from __future__ import annotations

import numpy as np
import pytest

from edgediff import EdgediffError, backends
from edgediff.backends.base import Device, OrtProviderBackend, OrtSession, Unavailable
from edgediff.engine.components import TEXT_ENCODER


def test_cpu_is_last_and_always_there():
    assert list(backends.REGISTRY)[-1] == "cpu"
    found = backends.probe_all()
    assert [f.backend for f in found] == list(backends.REGISTRY)
    cpu = found[-1]
    assert isinstance(cpu, Device) and cpu.providers == ("CPUExecutionProvider",)
    assert cpu.total_memory and cpu.free_memory and cpu.free_memory <= cpu.total_memory
    backend, device = backends.select("auto")
    assert device.backend == "cpu"  # nothing else on this machine


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


def test_unavailable_backends_say_why_and_refuse_when_asked_for():
    cuda = backends.get_backend("cuda").probe()
    assert isinstance(cuda, Unavailable) and "onnxruntime-gpu" in cuda.reason
    with pytest.raises(EdgediffError, match="backend 'cuda' is not available here: onnxruntime-gpu"):
        backends.select("cuda")
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
