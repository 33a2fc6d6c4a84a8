"""AMD GPUs through ONNX Runtime's MIGraphX execution provider, or the older ROCm one, whichever the
installed onnxruntime build carries (AMD ships them as onnxruntime-migraphx / onnxruntime-rocm)."""

from ..base import OrtProviderBackend

BACKEND = OrtProviderBackend(
    "rocm", ("MIGraphXExecutionProvider", "ROCMExecutionProvider"),
    "no ONNX Runtime build with the MIGraphX or ROCm execution provider is installed "
    "(install AMD's onnxruntime-migraphx wheel for your ROCm version)")
