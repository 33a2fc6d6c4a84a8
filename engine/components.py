"""One description per exported component, read by the exporter, the sessions and the pipeline alike, so
that the names, dtypes and dynamic axes they use cannot disagree.

The folder layout and tensor names are those of Hugging Face optimum's ONNX export of a Stable
Diffusion pipeline, so edgediff runs optimum's folders and optimum's tools read ours.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name of the fp32 export; a session casts to what the graph really takes
    axes: tuple[str, ...]  # symbolic names; equal names must be equal sizes


@dataclass(frozen=True)
class ComponentSpec:
    name: str  # also the folder: `<model>/<name>/model.onnx`
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    required: bool = True  # txt2img cannot run without it

    @property
    def onnx_path(self) -> str:
        return f"{self.name}/model.onnx"


TEXT_ENCODER = ComponentSpec(
    "text_encoder",
    inputs=(TensorSpec("input_ids", "int64", ("batch", "sequence")),),
    outputs=(TensorSpec("last_hidden_state", "float32", ("batch", "sequence", "hidden")),
             TensorSpec("pooler_output", "float32", ("batch", "hidden"))),
)
UNET = ComponentSpec(
    "unet",
    inputs=(TensorSpec("sample", "float32", ("batch", "channels", "height", "width")),
            # float: the sigma-based schedulers give fractional timesteps (diffusers' UNet takes them)
            TensorSpec("timestep", "float32", ("batch",)),
            TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", "hidden"))),
    outputs=(TensorSpec("out_sample", "float32", ("batch", "latent_channels", "height", "width")),),
)
VAE_ENCODER = ComponentSpec(
    "vae_encoder",
    inputs=(TensorSpec("sample", "float32", ("batch", "rgb", "image_height", "image_width")),),
    # mean and log-variance of the latent posterior, concatenated on channels; the sampling is done by
    # the pipeline in numpy so that it draws from edgediff's seeded noise, not from a graph's RNG.
    outputs=(TensorSpec("latent_parameters", "float32", ("batch", "moments", "height", "width")),),
    required=False,
)
VAE_DECODER = ComponentSpec(
    "vae_decoder",
    inputs=(TensorSpec("latent_sample", "float32", ("batch", "latent_channels", "height", "width")),),
    outputs=(TensorSpec("sample", "float32", ("batch", "rgb", "image_height", "image_width")),),
)

# The decoder split for tiled decodes with image-wide GroupNorm statistics (export/wrappers.py): the
# head runs whole at latent resolution; the tail runs per tile, normalising with `norm_stats` mixed in
# by `stats_mix` (0: its own, as diffusers' decoder; 1: the given ones) and returning the statistics
# of the region `stats_mask` marks as the tile's own. Optional: older and optimum folders lack them,
# and the runtime then blends tiles of the whole decoder.
HIDDEN_SCALE = 2  # the head ends with the first up block's upsampler: hidden is twice the latent size
VAE_DECODER_HEAD = ComponentSpec(
    "vae_decoder_head",
    inputs=(TensorSpec("latent_sample", "float32", ("batch", "latent_channels", "height", "width")),),
    outputs=(TensorSpec("hidden", "float32", ("batch", "decoder_channels", "hidden_height", "hidden_width")),),
    required=False,
)
VAE_DECODER_TAIL = ComponentSpec(
    "vae_decoder_tail",
    inputs=(TensorSpec("hidden", "float32", ("batch", "decoder_channels", "hidden_height", "hidden_width")),
            TensorSpec("norm_stats", "float32", ("norms", "batch", "groups", "mean_var")),
            TensorSpec("stats_mask", "float32", ("one", "one", "hidden_height", "hidden_width")),
            TensorSpec("stats_mix", "float32", ("one",))),
    outputs=(TensorSpec("sample", "float32", ("batch", "rgb", "image_height", "image_width")),
             TensorSpec("tile_stats", "float32", ("norms", "batch", "groups", "mean_var"))),
    required=False,
)

# The CLIP-based classifier SD ships to flag unsafe pictures (diffusers' StableDiffusionSafetyChecker,
# its forward_onnx): CLIP-preprocessed pixels in, the same images out with flagged ones blacked.
SAFETY_CHECKER = ComponentSpec(
    "safety_checker",
    inputs=(TensorSpec("clip_input", "float32", ("batch", "clip_rgb", "clip_height", "clip_width")),
            TensorSpec("images", "float32", ("batch", "image_height", "image_width", "rgb"))),  # NHWC, 0..1
    outputs=(TensorSpec("out_images", "float32", ("batch", "image_height", "image_width", "rgb")),
             TensorSpec("has_nsfw_concepts", "bool", ("batch",))),
    required=False,
)

# An fp16 export keeps its VAE decoder's fp32 graph beside it under this name: the runtime re-runs a
# decode that overflowed (inf/NaN, the black image) with it, as A1111's --no-half-vae would.
FP32_FALLBACK = "model_fp32.onnx"
FP32_FALLBACK_COMPONENTS = ("vae_decoder", "vae_decoder_head", "vae_decoder_tail")

COMPONENTS = (TEXT_ENCODER, UNET, VAE_ENCODER, VAE_DECODER, VAE_DECODER_HEAD, VAE_DECODER_TAIL, SAFETY_CHECKER)
