"""Apple Silicon: the Core ML packages of `edgediff export --format coreml` through coremltools, and
ONNX-only exports through ONNX Runtime's CoreML execution provider.

The probe reads the Mac: its unified memory and what is available (psutil), the chip's name (sysctl) and
the macOS version. Core ML packages need coremltools and macOS 15 (the packages' deployment target);
the probe checks that coremltools is installed without importing it, since its import pulls in torch.

What is not run here (no Mac on the development machines): any prediction. The probe runs against
simulated sysctl answers and memory, the provider options are checked as built, and the Core ML
session runs the pipeline's every plan rung up to MLModel.predict, where a stand-in checks each call
against the package's own spec (tests/test_coreml_export.py).
"""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

from ...engine.components import ComponentSpec
from ...engine.errors import EdgediffError
from .. import host
from ..base import BackendCost, Device, MiB, OrtProviderBackend, OrtSession, Overrides, Session, Unavailable, session_options
from .session import COMPUTE_UNITS, CoreMLSession, load_mlmodel, package_compute_units, read_package_spec

COREML = "CoreMLExecutionProvider"
MIN_MACOS = (15,)  # the packages' minimum deployment target (coreml_export.DEPLOYMENT_TARGET)
MISSING = ("this onnxruntime build has no CoreML execution provider, and coremltools is not installed "
           "(pip install coremltools)")


def coreml_provider_options(compute_units: str = "ALL") -> dict[str, str]:
    """The CoreML execution provider's options (ONNX Runtime 1.20 and later take them by name)."""
    return {
        # ML Program: Core ML's current format, with fp16 and the GPU/Neural Engine ops SD needs; the older
        # NeuralNetwork format is what the provider builds otherwise.
        "ModelFormat": "MLProgram",
        "MLComputeUnits": COMPUTE_UNITS[compute_units],
        # Our graphs have dynamic batch and size axes; "1" would leave every node with such an input on the
        # CPU. No ModelCacheDirectory either: its cache is keyed on the model's path, and a re-export to
        # the same folder would be served the old compiled model.
        "RequireStaticInputShapes": "0",
    }


def find_package(path: Path) -> Path | None:
    """The Core ML package for the component at `path`: `path` itself when it is one, else the
    `model.mlpackage` beside `<component>/model.onnx`."""
    if path.suffix == ".mlpackage":
        return path if path.exists() else None
    beside = path.parent / "model.mlpackage"
    return beside if beside.exists() else None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


class CoreMLBackend(OrtProviderBackend):
    """Probe inputs, each injectable: `available_providers()`, `system()`, `machine()`, `mac_version()`
    ("14.4.1"), `run(args) -> stdout | None` (sysctl), `memory() -> (total, available)` in bytes,
    `has_coremltools() -> bool`. Session inputs:
    `load_model(path, compute_units)` and `read_spec(path)`, coremltools' by default."""

    def __init__(self, available_providers=None, system=None, machine=None, mac_version=None, run=None,
                 memory=None, has_coremltools=None, load_model=None, read_spec=None):
        super().__init__("coreml", (COREML,), MISSING, available_providers)
        self._system = system or platform.system
        self._machine = machine or platform.machine
        self._mac_version = mac_version or (lambda: platform.mac_ver()[0])
        self._run = run or host.run_command
        self._memory = memory or host.memory
        self._has_coremltools = has_coremltools or (lambda: importlib.util.find_spec("coremltools") is not None)
        self._load_model = load_model or load_mlmodel
        self._read_spec = read_spec or read_package_spec

    def probe(self) -> Device | Unavailable:
        system, machine = self._system(), self._machine()
        if system != "Darwin" or machine != "arm64":
            if system == "Darwin" and (self._run(["sysctl", "-n", "sysctl.proc_translated"]) or "").strip() == "1":
                return Unavailable(self.name, "this Python is an x86_64 build running under Rosetta on Apple "
                                              "Silicon; install an arm64 Python to use Core ML")
            where = "macOS" if system == "Darwin" else system or "an unknown OS"
            return Unavailable(self.name, f"not on macOS with Apple Silicon (this is {where} {machine})")
        version = self._mac_version()
        packages = self._has_coremltools() and _version(version) >= MIN_MACOS
        onnx = bool(self._present())
        if not packages and not onnx:
            return Unavailable(self.name, f"macOS {version} on Apple Silicon, but {MISSING}")
        notes = []
        if not packages:
            notes.append("Core ML packages need coremltools (pip install coremltools) on macOS 15 or later")
        if not onnx:
            notes.append("ONNX exports need an onnxruntime with the CoreML provider (pip install onnxruntime)")
        total, free = self._memory()
        if free is None:
            notes.append("free memory unknown (psutil could not read it)")
        brand = (self._run(["sysctl", "-n", "machdep.cpu.brand_string"]) or "").strip()
        return Device(self.name, brand or "Apple Silicon", (COREML, "CPUExecutionProvider") if onnx else (),
                      total_memory=total, free_memory=free, unified_memory=True,
                      fp16=True,  # the GPU and the Neural Engine compute in fp16 natively (the ANE only so)
                      driver=f"macOS {version}", compute_units=tuple(COMPUTE_UNITS) if packages else (),
                      cores=host.cores(), notes=tuple(notes))

    def open(self, path: Path, spec: ComponentSpec, device: Device, memory_limit: int | None = None,
             overrides: Overrides | None = None, dtype: str = "fp32", precision: str = "f32") -> Session:
        """`precision` is accepted and ignored: a package's precision was fixed when it was converted, and
        ONNX Runtime's CoreML provider runs the graph's own dtype."""
        # memory_limit: Core ML has no allocator cap; on unified memory the plan's prediction is the guard.
        package = find_package(path)
        if package is not None and overrides:
            raise EdgediffError(f"{package.name}: a Core ML package cannot change its weights when it is loaded; "
                                "bake LoRAs in with `edgediff export SRC --format coreml --lora FILE:WEIGHT`")
        if package is not None and device.compute_units:
            units = package_compute_units(self._read_spec(package))
            return CoreMLSession(package, spec, units, load=self._load_model)
        if COREML in device.providers and path.suffix == ".onnx":
            return OrtSession(path, spec, [(COREML, coreml_provider_options()), "CPUExecutionProvider"],
                              session_options(), require=COREML, overrides=overrides)
        if package is not None:
            raise EdgediffError(f"{package} is a Core ML package, which needs coremltools on macOS 15 or later "
                                "(pip install coremltools)")
        raise EdgediffError(f"{path}: ONNX exports need an onnxruntime with the CoreML provider on the Mac; "
                            "or export Core ML packages with `edgediff export --format coreml`")


BACKEND = CoreMLBackend()
