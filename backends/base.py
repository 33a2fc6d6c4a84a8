"""The backend protocol: every backend (cpu, cuda, rocm, coreml) fills the same small interface.

- `probe()` says what device the backend would use, or why it cannot run, in words a user can act on.
  It never raises and never imports torch.
- `open(path, spec, device)` returns a `Session` that runs one exported component.

Outside backends/ no code asks which backend it is on: it holds a `Session` and calls `run`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..engine.components import ComponentSpec
from ..engine.errors import EdgediffError


@dataclass(frozen=True)
class Device:
    backend: str
    name: str
    providers: tuple[str, ...]  # ONNX Runtime execution providers, in order of preference
    total_memory: int | None = None  # bytes; None where the backend cannot tell
    free_memory: int | None = None
    unified_memory: bool = False  # memory shared with the host (CPU, Apple Silicon)
    fp16: bool = False  # whether fp16 arithmetic is fast here


@dataclass(frozen=True)
class Unavailable:
    backend: str
    reason: str  # e.g. "onnxruntime-gpu is not installed"


class Session(Protocol):
    spec: ComponentSpec
    input_types: dict[str, np.dtype]

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    name: str

    def probe(self) -> Device | Unavailable: ...

    def open(self, path: Path, spec: ComponentSpec, device: Device) -> Session: ...


# ONNX Runtime's type strings for the tensor types our graphs use.
ORT_TYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
}


class OrtSession:
    """One ONNX Runtime inference session, shared by every backend that runs ONNX.

    It checks each input's name before running and casts it to the dtype the graph declares, so the same
    pipeline runs fp32 exports, fp16 exports and optimum's folders (int32 `input_ids`) alike.
    """

    def __init__(self, path: Path, spec: ComponentSpec, providers: list, options=None):
        import onnxruntime as ort

        if not path.is_file():
            raise EdgediffError(f"{path} is missing; export the model again with `edgediff export`")
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:  # ORT raises its own exception types, and plain RuntimeError
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EdgediffError(f"{path} is not a valid ONNX model ({first[:200]}); "
                                "export the model again with `edgediff export`") from None
        self.spec = spec
        self.path = path
        self.providers = tuple(self._session.get_providers())
        self.input_types = {i.name: ORT_TYPES.get(i.type, np.dtype(np.float32))
                            for i in self._session.get_inputs()}
        # optimum-onnx exports the UNet's timestep as a 0-d scalar; edgediff's take one per batch row
        self.scalar_inputs = {i.name for i in self._session.get_inputs() if i.shape == []}
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        missing = set(self.input_types) - set(inputs)
        if missing:
            raise EdgediffError(f"{self.path}: the graph needs input(s) {sorted(missing)} that edgediff does "
                                f"not provide for {self.spec.name}; is this a Stable Diffusion export?")
        feeds = {name: np.ascontiguousarray(inputs[name], dtype=dtype)
                 for name, dtype in self.input_types.items()}
        for name in self.scalar_inputs:
            value = feeds[name].reshape(-1)
            if value.size == 0 or (value != value[0]).any():
                raise EdgediffError(f"{self.path}: {name} is one scalar in this graph, but the batch needs "
                                    f"{value.size} different values")
            feeds[name] = np.asarray(value[0])
        values = self._session.run(None, feeds)
        return {name: np.asarray(v) for name, v in zip(self.output_names, values)}


class OrtProviderBackend:
    """A backend that is one ONNX Runtime execution provider (CUDA, MIGraphX/ROCm, CoreML).

    This is the first rung; the device memory probes (NVML, amdsmi, the Mac's unified memory), the
    provider options a plan sets and the Core ML artifacts come with the backend-dispatch issue.
    `available_providers` can be injected so that tests run the probe on a machine without the hardware.
    """

    def __init__(self, name: str, providers: tuple[str, ...], missing_hint: str, available_providers=None):
        self.name = name
        self._wanted = providers
        self._missing_hint = missing_hint
        self._available = available_providers

    def _available_providers(self) -> list[str]:
        if self._available is not None:
            return list(self._available())
        try:
            import onnxruntime as ort
        except ImportError:
            return []
        return ort.get_available_providers()

    def probe(self) -> Device | Unavailable:
        present = [p for p in self._wanted if p in self._available_providers()]
        if not present:
            return Unavailable(self.name, self._missing_hint)
        return Device(self.name, present[0], (present[0], "CPUExecutionProvider"))

    def open(self, path: Path, spec: ComponentSpec, device: Device) -> OrtSession:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        return OrtSession(path, spec, list(device.providers), options)
