"""NVIDIA GPUs through ONNX Runtime's CUDA execution provider (package onnxruntime-gpu)."""

from ..base import OrtProviderBackend

BACKEND = OrtProviderBackend(
    "cuda", ("CUDAExecutionProvider",),
    "onnxruntime-gpu is not installed, or this build has no CUDA execution provider "
    "(pip install onnxruntime-gpu)")
