"""The backend protocol: every backend (cpu, cuda, rocm, coreml, openvino) fills the same small interface.

- `probe()` says what device the backend would use, as measured facts (`Device`), or why it cannot run, in
  words a user can act on (`Unavailable`). It never raises and never imports torch. Every probe takes its
  inputs (provider lists, NVML, amdsmi, sysctl, the host's memory) as constructor arguments, so that tests
  describe a 4 GB NVIDIA card or an 8 GB M1 on a machine that has neither.
- `open(path, spec, device, memory_limit=None, overrides=None, dtype="fp32", precision="f32")` returns a
  `Session` that runs one exported component; `memory_limit` (bytes) caps what the backend's allocator
  may take where the runtime has such a cap; `dtype` is the graph's, as the model folder records it (a
  backend never reads a model's manifest itself); `precision` is the arithmetic the plan chose, "f32"
  or "bf16", for the runtimes that pick their own (OpenVINO); ONNX Runtime runs the graph's own dtype.
- `cost` says how the backend turns graph facts into resident bytes (the planner reads it), and `host`
  whether it runs on the host's CPU and memory (where a plan puts small components off a card).

Outside backends/ no code asks which backend it is on: it holds a `Session` and calls `run` (and `keep`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..engine.components import ComponentSpec
from ..engine.errors import EdgediffError, first_line  # noqa: F401 (backends import it from here)

log = logging.getLogger("edgediff")

GiB = 2**30
MiB = 2**20


@dataclass(frozen=True)
class Device:
    """What a backend found: measured facts only, the planner's input. None means "could not tell"."""

    backend: str
    name: str  # "NVIDIA GeForce RTX 3060", "Apple M1", "AMD Ryzen 7 5800X (8 cores)"
    # ONNX Runtime execution providers, in order of preference; for openvino "OpenVINO:<its device name>"
    providers: tuple[str, ...]
    total_memory: int | None = None  # bytes the device has; the host's RAM where memory is unified
    free_memory: int | None = None  # bytes free when probed
    unified_memory: bool = False  # memory shared with the host (CPU, Apple Silicon)
    fp16: bool = False  # whether fp16 arithmetic is fast here, not merely possible
    bf16: bool = False  # whether bf16 arithmetic is fast here (AVX512_BF16 or AMX CPUs, under OpenVINO)
    driver: str | None = None  # driver or OS version: "NVIDIA 550.54.14", "amdgpu 6.7.0", "macOS 14.4.1"
    device_id: int = 0  # the runtime's ordinal (CUDA/HIP device id)
    compute_capability: tuple[int, int] | None = None  # CUDA SM version, e.g. (8, 6)
    arch: str | None = None  # AMD graphics target, e.g. "gfx1100"
    compute_units: tuple[str, ...] = ()  # Core ML units coremltools can load packages for (empty: it cannot)
    cores: int | None = None  # CPU cores this process may run on
    notes: tuple[str, ...] = ()  # what the probe could not measure, and what to do about it

    def describe(self) -> str:
        """One line for `edgediff devices` and for bug reports."""
        gib = lambda b: "?" if b is None else f"{b / GiB:.1f}"  # noqa: E731
        if self.total_memory is None and self.free_memory is None:
            memory = "memory unknown"
        else:
            memory = f"{gib(self.total_memory)} GiB total, {gib(self.free_memory)} GiB free"
        if self.unified_memory:
            memory += " (unified memory)"
        parts = [self.name, memory, "fp16 fast" if self.fp16 else "fp16 slow"]
        if self.bf16:
            parts.append("bf16 fast")
        if self.compute_capability:
            parts.append(f"compute capability {self.compute_capability[0]}.{self.compute_capability[1]}")
        if self.arch:
            parts.append(self.arch)
        if self.providers:
            parts.append(f"providers {', '.join(self.providers)}")
        if self.compute_units:
            parts.append(f"Core ML compute units {', '.join(self.compute_units)}")
        if self.driver:
            parts.append(self.driver)
        return "; ".join(parts) + "".join(f" [{n}]" for n in self.notes)


@dataclass(frozen=True)
class BackendCost:
    """How one backend turns graph facts into resident bytes: each backend states its own (the planner,
    engine/plan.py, reads `backend.cost`)."""
    fixed: int  # process or context overhead before any model: runtime libraries, CUDA context, arenas
    weights: float  # resident bytes per byte of weights on disk
    activations: float  # peak bytes per byte of the graph's live-tensor peak (export/memory_profile.py)
    session: int  # per open session: kernels' workspaces, the allocator's slack


# The GPU backends' costs: the providers' documented overheads (context + cuDNN/MIOpen handles), to be
# measured where the hardware is. The CPU's are measured (backends/cpu).
GPU_COST = BackendCost(fixed=600 * MiB, weights=1.0, activations=1.0, session=64 * MiB)


@dataclass(frozen=True)
class Unavailable:
    backend: str
    reason: str  # e.g. "onnxruntime-gpu is not installed (pip install onnxruntime-gpu)"


@dataclass(frozen=True)
class Overrides:
    """Weights that replace exported ones when a session opens (LoRAs and embeddings merged by
    engine/adapters.py): {initializer name: value in the graph's dtype and layout}. ONNX Runtime takes
    them in place of the file's (SessionOptions.add_external_initializers) before it optimises the graph,
    so nothing is exported again. `key` names the values: a backend that caches compiled graphs
    (TensorRT's engines) must not serve one built with other weights."""

    key: str
    values: dict

    def __bool__(self) -> bool:
        return bool(self.values)


class Session(Protocol):
    spec: ComponentSpec
    input_types: dict[str, np.dtype]
    providers: tuple[str, ...]

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]: ...

    def keep(self, name: str, array: np.ndarray) -> None:
        """Hold an input that stays the same across calls on the device; `run` may then omit it."""


class Backend(Protocol):
    name: str
    cost: BackendCost
    host: bool  # runs on the host's CPU and memory

    def probe(self) -> Device | Unavailable: ...

    def open(self, path: Path, spec: ComponentSpec, device: Device, memory_limit: int | None = None,
             overrides: Overrides | None = None, dtype: str = "fp32", precision: str = "f32") -> Session:
        """`overrides`: weights that replace the exported ones (optional: a backend that cannot take them,
        Core ML's packages, refuses in one line). `dtype`: the graph's ("fp32", "fp16", "int8").
        `precision`: the inference precision the plan chose, "f32" or "bf16"; a backend whose runtime
        computes in the graph's own dtype (ONNX Runtime, Core ML's packages) accepts it and ignores it."""


class MissingComponent(EdgediffError):
    """The exported file is not there: no other backend would do better, so there is no fallback."""


# ONNX Runtime's type strings for the tensor types our graphs use.
ORT_TYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(bool)": np.dtype(np.bool_),
}


class OrtSession:
    """One ONNX Runtime inference session, shared by every backend that runs ONNX.

    It checks each input's name before running and casts it to the dtype the graph declares, so the same
    pipeline runs fp32 exports, fp16 exports and optimum's folders (int32 `input_ids`) alike.

    `providers` is what InferenceSession takes (names, or (name, options) pairs). `require` is the provider
    that must really be running: ONNX Runtime drops a provider it cannot start (no CUDA libraries, say)
    with a log line and carries on with the CPU, which would make a "CUDA" session silently 20x slower.
    `bind_device` is where `keep` puts inputs: ("cuda", 0) on an NVIDIA GPU, ("cpu", 0) elsewhere.
    """

    def __init__(self, path: Path, spec: ComponentSpec, providers: list, options=None,
                 require: str | None = None, bind_device: tuple[str, int] = ("cpu", 0),
                 overrides: Overrides | None = None):
        import onnxruntime as ort

        if not path.is_file():
            raise MissingComponent(f"{path} is missing; export the model again with `edgediff export`")
        # ONNX Runtime reads overriding initializers from our buffers for the session's life: keep them
        self._overrides = overrides
        self._override_values = []
        if overrides:
            options = options or ort.SessionOptions()
            self._override_values = [ort.OrtValue.ortvalue_from_numpy(v) for v in overrides.values.values()]
            options.add_external_initializers(list(overrides.values), self._override_values)
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:  # ORT raises its own exception types, and plain RuntimeError
            raise EdgediffError(f"{path} is not a valid ONNX model, or {provider_names(providers)[0]} "
                                f"cannot load it ({first_line(e)}); export the model again with "
                                "`edgediff export`") from None
        self.spec = spec
        self.path = path
        self.providers = tuple(self._session.get_providers())
        dropped = [p for p in provider_names(providers) if p not in self.providers]
        if require is not None and require in dropped:
            raise EdgediffError(f"ONNX Runtime could not start {require} for {spec.name} (its libraries, "
                                "e.g. CUDA or cuDNN, are missing or do not match this onnxruntime build)")
        if dropped:
            log.warning("ONNX Runtime could not start %s for %s; running on %s", ", ".join(dropped),
                        spec.name, ", ".join(self.providers))
        self.input_types = {i.name: ORT_TYPES.get(i.type, np.dtype(np.float32))
                            for i in self._session.get_inputs()}
        # optimum-onnx exports the UNet's timestep as a 0-d scalar; edgediff's take one per batch row
        self.scalar_inputs = {i.name for i in self._session.get_inputs() if i.shape == []}
        self.output_names = [o.name for o in self._session.get_outputs()]
        self._bind_device = bind_device
        self._binding = None  # an ort.IOBinding, made by the first `keep`
        self._kept: dict[str, np.ndarray] = {}  # name -> the array given to `keep` (identity is the check)
        self._bound: dict[str, object] = {}  # name -> the OrtValue bound for it, kept alive with the binding
        self.uploads = 0  # inputs copied into device OrtValues by `keep`; tests check kept ones are not re-sent
        self.bound_runs = 0  # runs that went through the IO binding

    def keep(self, name: str, array: np.ndarray) -> None:
        """Copy an input that does not change between calls (the text embeddings, the same for every
        denoising step) to the session's device once. Later `run`s that omit it, or pass this very array,
        use the bound copy; passing another array for it keeps that one instead. The array must not be
        changed in place afterwards (the copy would not follow)."""
        import onnxruntime as ort

        if name not in self.input_types:
            raise EdgediffError(f"{self.path}: the graph has no input {name!r} to keep "
                                f"(its inputs: {', '.join(self.input_types)})")
        if self._binding is None:
            self._binding = self._session.io_binding()
        value = ort.OrtValue.ortvalue_from_numpy(self._feed(name, array), *self._bind_device)
        self._binding.bind_ortvalue_input(name, value)
        # The binding refers to the OrtValue's memory without owning it: on the CPU that is the fed array
        # (a copy when _feed casts or makes it contiguous), which lives only as long as this OrtValue.
        self._bound[name] = value
        self._kept[name] = array
        self.uploads += 1

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        for name, array in inputs.items():
            if name in self._kept and self._kept[name] is not array:
                self.keep(name, array)  # a new value for a kept input: send it once, and keep it
        missing = set(self.input_types) - set(inputs) - set(self._kept)
        if missing:
            raise EdgediffError(f"{self.path}: the graph needs input(s) {sorted(missing)} that edgediff does "
                                f"not provide for {self.spec.name}; is this a Stable Diffusion export?")
        feeds = {name: self._feed(name, inputs[name]) for name in self.input_types if name not in self._kept}
        if not self._kept:
            values = self._session.run(None, feeds)
        else:
            for name, value in feeds.items():
                self._binding.bind_cpu_input(name, value)
            # outputs come back to the host: the scheduler and the guidance are numpy
            self._binding.clear_binding_outputs()
            for name in self.output_names:
                self._binding.bind_output(name, "cpu")
            self._session.run_with_iobinding(self._binding)
            values = self._binding.copy_outputs_to_cpu()
            self.bound_runs += 1
        return {name: np.asarray(v) for name, v in zip(self.output_names, values)}

    def _feed(self, name: str, array: np.ndarray) -> np.ndarray:
        return feed(self.path, name, array, self.input_types[name], name in self.scalar_inputs)


def feed(path: Path, name: str, array: np.ndarray, dtype: np.dtype, scalar: bool) -> np.ndarray:
    """An input as a graph takes it: contiguous, in the graph's dtype, and a 0-d scalar where the graph
    has one (optimum's UNet timestep), provided every batch row gives the same value."""
    value = np.ascontiguousarray(array, dtype=dtype)
    if scalar:
        flat = value.reshape(-1)
        if flat.size == 0 or (flat != flat[0]).any():
            raise EdgediffError(f"{path}: {name} is one scalar in this graph, but the batch needs "
                                f"{flat.size} different values")
        value = np.asarray(flat[0])
    return value


class OrtProviderBackend:
    """The part every accelerator backend shares: is its ONNX Runtime execution provider in this build?

    The cuda, rocm and coreml backends extend `probe` with the device's measured memory and version, and
    `open` with their provider options. `available_providers` can be injected so that tests run the probe
    on a machine without the hardware.
    """

    cost = GPU_COST
    host = False

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

    def _present(self) -> list[str]:
        """The wanted providers this onnxruntime build has, in our order of preference."""
        available = self._available_providers()
        return [p for p in self._wanted if p in available]

    def probe(self) -> Device | Unavailable:
        present = self._present()
        if not present:
            return Unavailable(self.name, self._missing_hint)
        return Device(self.name, present[0], (present[0], "CPUExecutionProvider"))

    def open(self, path: Path, spec: ComponentSpec, device: Device, memory_limit: int | None = None,
             overrides: Overrides | None = None, dtype: str = "fp32", precision: str = "f32") -> OrtSession:
        """`precision` is accepted and ignored: ONNX Runtime runs the graph's own dtype."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        return OrtSession(path, spec, list(device.providers), options, require=device.providers[0],
                          overrides=overrides)


def session_options():
    """The session options every backend starts from."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT's warnings are about its internals
    return options


def provider_names(providers: list) -> list[str]:
    return [p[0] if isinstance(p, tuple) else p for p in providers]


def artifact_key(path: Path) -> str:
    """A short key that changes when the exported files of a component change (name, size, mtime of each
    file in its folder, weights included). Engine caches (TensorRT) keyed only on the graph's structure
    would serve a stale engine, with the old weights baked in, after a re-export to the same path."""
    import hashlib

    h = hashlib.sha256(str(path.resolve()).encode())
    for f in sorted(path.parent.iterdir()) if path.parent.is_dir() else ():
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]
