"""Simulated hosts for the backend registry, and a recorder of what ONNX Runtime is asked for.

The registry finds each backend as its module's BACKEND (edgediff.backends.get_backend). A test of what
`select`, `edgediff devices`, `edgediff plan` or the demo do on some machine replaces the accelerators'
BACKEND objects with the same classes built with fake probe inputs, so that its answer does not depend
on the machine running it: onnxruntime-gpu installed, an NVIDIA card, a Mac. The CPU backend stays the
real one: it is the host, and the tests that generate run on it.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from edgediff.backends import coreml, cuda, openvino, rocm

CPU = "CPUExecutionProvider"


def fake_nvml(name, total, free, capability, driver="550.54.14", count=1, init_error=None):
    """What nvidia-ml-py's pynvml answers on a machine with one such card."""
    class NVMLError(Exception):
        pass

    def init():
        if init_error:
            raise NVMLError(init_error)

    handles = []
    return SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=init, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: count,
        nvmlDeviceGetHandleByIndex=lambda i: handles.append(i) or f"handle{i}",
        nvmlDeviceGetName=lambda h: name,
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=total, free=free, used=total - free),
        nvmlSystemGetDriverVersion=lambda: driver,
        nvmlDeviceGetCudaComputeCapability=lambda h: capability, handles=handles)


def _not_installed():
    raise ImportError("simulated host: not installed")


def simulate(monkeypatch, providers=(CPU,), nvml=None, system="Linux", machine="x86_64", openvino_core=None):
    """Make the registry's accelerator backends see this host. `providers`: what onnxruntime's
    get_available_providers() answers (the default is the CPU build's); `nvml`: the pynvml module
    (None: nvidia-ml-py is not installed); `system` and `machine`: what the platform module says. Neither
    nvidia-smi nor amdsmi nor rocm-smi nor coremltools is there, and no onnxruntime-gpu distribution is installed
    beside the build (the probe's hint for a shadowed one). `openvino_core`: what openvino.Core() gives
    (FakeOpenVinoCore; None: openvino is not installed)."""
    def available():
        return list(providers)

    monkeypatch.setattr(cuda, "BACKEND", cuda.CudaBackend(
        available_providers=available, nvml=(lambda: nvml) if nvml is not None else _not_installed,
        environ={}, installed=lambda distribution: False, run=lambda args: None))
    monkeypatch.setattr(rocm, "BACKEND", rocm.RocmBackend(
        available_providers=available, amdsmi=_not_installed, run=lambda args: None))
    monkeypatch.setattr(coreml, "BACKEND", coreml.CoreMLBackend(
        available_providers=available, system=lambda: system, machine=lambda: machine,
        run=lambda args: None, has_coremltools=lambda: False))
    monkeypatch.setattr(openvino, "BACKEND", openvino.OpenVinoBackend(
        core=(lambda: openvino_core) if openvino_core is not None else _not_installed,
        version=lambda: "2026.4.1", environ={}))


class FakeOpenVinoCore:
    """What openvino.Core answers about a machine's devices: {device: {property: value}}, e.g.
    {"CPU": {"FULL_DEVICE_NAME": ..., "DEVICE_TYPE": "Type.INTEGRATED", "OPTIMIZATION_CAPABILITIES": [...]}}."""

    def __init__(self, devices: dict[str, dict]):
        self.devices = devices
        self.available_devices = list(devices)

    def get_property(self, device, name):
        try:
            return self.devices[device][name]
        except KeyError:
            raise RuntimeError(f"Exception from src/inference/src/cpp/core.cpp:\nUnsupported property {name} "
                               f"by {device} plugin") from None


def record_sessions(monkeypatch) -> list[tuple[str, list]]:
    """Record what every InferenceSession is asked for, as (component folder, providers), and open it on
    the CPU alone: what ONNX Runtime does when it cannot start a GPU provider (no GPU here). The session
    that asked for a GPU then refuses to run on the CPU unannounced, and the component falls back to the
    cpu backend, as on a machine whose CUDA libraries are broken."""
    import onnxruntime as ort

    real = ort.InferenceSession
    asked: list[tuple[str, list]] = []

    def session(path, sess_options=None, providers=None, **kwargs):
        asked.append((Path(path).parent.name, list(providers or [])))
        return real(path, sess_options=sess_options, providers=[CPU], **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    return asked


def provider_options(providers: list, name: str) -> dict | None:
    """The options `providers` (InferenceSession's list of names and (name, options) pairs) gives `name`;
    None when it does not ask for it."""
    for p in providers:
        if isinstance(p, tuple) and p[0] == name:
            return p[1]
        if p == name:
            return {}
    return None
