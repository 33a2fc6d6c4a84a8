"""Apple Silicon through ONNX Runtime's CoreML execution provider, for ONNX-only exports. Running the
Core ML artifacts themselves through coremltools comes with the export issue's Core ML stage."""

from ..base import OrtProviderBackend

BACKEND = OrtProviderBackend(
    "coreml", ("CoreMLExecutionProvider",),
    "not on macOS, or this onnxruntime build has no CoreML execution provider")
