"""edgediff: Stable Diffusion on the hardware people already own.

    import edgediff
    pipe = edgediff.Pipeline.from_pretrained("path/to/exported-model")
    image = pipe("a red circle on a blue background", seed=42).images[0]

The run time needs numpy, ONNX Runtime, tokenizers and Pillow, never torch.
"""

from .engine.errors import EdgediffError
from .engine.pipeline import GenerationResult, Pipeline

__version__ = "0.1.0"
__all__ = ["EdgediffError", "GenerationResult", "Pipeline", "__version__"]
