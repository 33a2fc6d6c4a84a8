"""A session on one Core ML package (`<model>/<component>/model.mlpackage`, written by
export/coreml_export.py) through coremltools' MLModel.predict.

The packages take the shapes they were exported for (an enumerated list: the sizes and batches of
`edgediff export --format coreml --sizes ... --batch ...`) and fp32 inputs (int32 token ids), so the
session casts each input to the declared dtype, checks its shape against that list, and says which input
is wrong and why, as Apple's coreml_model.py does, rather than letting Core ML fail deep inside. Outputs come back
as float32 numpy arrays, as from the ONNX sessions.

What is not run here (Core ML predicts on macOS only): a real prediction. The conversion is tested with a
stand-in for MLModel that has a real package description.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...engine.components import ComponentSpec
from ...engine.errors import EdgediffError

# Core ML's ArrayFeatureType.ArrayDataType values (FeatureTypes.proto), so reading a description needs no
# import of coremltools.
CORE_ML_TYPES = {
    65568: np.dtype(np.float32),
    65552: np.dtype(np.float16),
    65600: np.dtype(np.float64),
    131104: np.dtype(np.int32),
    131080: np.dtype(np.int8),
}
META_COMPUTE_UNITS = "com.edgediff.compute_units"  # export/coreml_export.py's META + "compute_units"
# Core ML's compute units by coremltools.ComputeUnit's names (what a package records, what `export
# --compute-units` takes), each with ONNX Runtime's name for it (the CoreML provider's MLComputeUnits, its
# coreml_options.cc). The probe lists them in this order.
COMPUTE_UNITS = {"ALL": "ALL", "CPU_AND_NE": "CPUAndNeuralEngine", "CPU_AND_GPU": "CPUAndGPU",
                 "CPU_ONLY": "CPUOnly"}


def load_mlmodel(path: Path, compute_units: str):
    """coremltools' MLModel on `path`, placed on `compute_units` (Core ML picks units at load time).
    Importing coremltools imports torch when torch is installed (its dependency checks do)."""
    import coremltools as ct

    return ct.models.MLModel(str(path), compute_units=ct.ComputeUnit[compute_units])


def read_package_spec(path: Path):
    """The package's description and metadata, without compiling the model."""
    import coremltools as ct

    return ct.utils.load_spec(str(path))


def package_compute_units(spec) -> str:
    """The compute units the package was exported for (split-einsum attention is made for the Neural
    Engine, standard attention for the GPU), from its metadata; ALL when it says nothing we know."""
    units = dict(spec.description.metadata.userDefined).get(META_COMPUTE_UNITS, "ALL")
    return units if units in COMPUTE_UNITS else "ALL"


class CoreMLSession:
    """`load(path, compute_units)` returns an object with MLModel's `get_spec()` and `predict(dict)`."""

    def __init__(self, path: Path, spec: ComponentSpec, compute_units: str = "ALL", load=None):
        if not path.exists():
            raise EdgediffError(f"{path} is missing; export the model again with `edgediff export --format coreml`")
        try:
            self._model = (load or load_mlmodel)(path, compute_units)
            description = self._model.get_spec().description
        except Exception as e:
            raise EdgediffError(f"Core ML could not load {path} on {compute_units} ({e}); export the "
                                "model again with `edgediff export --format coreml`") from None
        self.spec = spec
        self.path = path
        self.providers = (f"CoreML {compute_units}",)
        self.declared = {}  # name -> (dtype, the shapes it takes, or None where any)
        for feature in description.input:
            array = feature.type.multiArrayType
            self.declared[feature.name] = (CORE_ML_TYPES.get(array.dataType, np.dtype(np.float32)),
                                           package_shapes(array))
        self.input_types = {name: dtype for name, (dtype, _) in self.declared.items()}
        self.output_names = [feature.name for feature in description.output]
        self._kept: dict[str, np.ndarray] = {}

    def keep(self, name: str, array: np.ndarray) -> None:
        """Core ML copies every input per prediction anyway; keeping only spares the caller passing it."""
        self._kept[name] = self._feed(name, array)

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        missing = set(self.declared) - set(inputs) - set(self._kept)
        if missing:
            raise EdgediffError(f"{self.path}: the package needs input(s) {sorted(missing)} that edgediff does "
                                f"not provide for {self.spec.name}; is this a Stable Diffusion export?")
        feeds = {name: self._feed(name, inputs[name]) if name in inputs else self._kept[name]
                 for name in self.declared}
        out = self._model.predict(feeds)
        return {name: np.asarray(out[name], dtype=np.float32)
                if np.asarray(out[name]).dtype.kind == "f" else np.asarray(out[name])
                for name in self.output_names}

    def _feed(self, name: str, array: np.ndarray) -> np.ndarray:
        if name not in self.declared:
            raise EdgediffError(f"{self.path}: the package has no input {name!r} "
                                f"(its inputs: {', '.join(self.declared)})")
        dtype, shapes = self.declared[name]
        value = np.ascontiguousarray(array, dtype=dtype)
        if shapes is not None and value.shape not in shapes:
            raise EdgediffError(f"{self.path}: input {name} has shape {value.shape}, but this Core ML package "
                                f"takes {', '.join(map(str, sorted(shapes)))} only; export again with the "
                                "--sizes and --batch you generate at")
        return value


def package_shapes(array) -> frozenset[tuple[int, ...]] | None:
    """The shapes a package's input (its ArrayFeatureType) takes: the enumerated ones, its one fixed
    shape, or None where it takes a range (edgediff's exports enumerate)."""
    flexibility = array.WhichOneof("ShapeFlexibility")
    if flexibility == "enumeratedShapes":
        return frozenset(tuple(int(d) for d in s.shape) for s in array.enumeratedShapes.shapes)
    if flexibility == "shapeRange" or not array.shape:
        return None
    return frozenset({tuple(int(d) for d in array.shape)})
