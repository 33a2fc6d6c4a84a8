"""One description per exported component, read by the exporter, the sessions and the pipeline alike, so
that the names, dtypes and dynamic axes they use cannot disagree.

The folder layout and tensor names are those of Hugging Face optimum's ONNX export of a Stable
Diffusion pipeline, so edgediff runs optimum's folders and optimum's tools read ours.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name of the fp32 export; a session casts to what the graph really takes
    axes: tuple[str, ...]  # symbolic names; equal names must be equal sizes


# Axes that a graph fixes at export (channels, widths); every other axis name is dynamic in the graph.
FIXED_AXES = frozenset({"channels", "latent_channels", "moments", "rgb", "hidden", "clip_rgb", "clip_height",
                        "clip_width", "decoder_channels", "norms", "groups", "mean_var", "one", "pooled",
                        "time_ids", "feature_channels"})


@dataclass(frozen=True)
class ComponentSpec:
    name: str  # also the folder: `<model>/<name>/model.onnx`
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    required: bool = True  # txt2img cannot run without it
    # fp16 exports: ONNX node-name patterns (the exporter derives node names from PyTorch module paths,
    # "/m/time_embedding/linear_1/Gemm") that stay fp32 beyond export/onnx_export.py's op-type list and
    # what calibration finds hot: the parts known to overflow or to lose what matters in fp16.
    fp16_keep: tuple[str, ...] = ()
    # fp16 exports keep this component's fp32 graph beside it (FP32_FALLBACK), for the runtime to re-run
    # an output that overflowed: small components whose overflow would blacken the picture.
    fp32_fallback: bool = False
    # Small and run once per generation: a lean plan on a card may run it on the host CPU instead.
    host_ok: bool = False
    # Its activations grow with the picture's size (the memory profile measures it at several sizes);
    # a text encoder's depend only on the batch.
    image_sized: bool = True

    @property
    def onnx_path(self) -> str:
        return f"{self.name}/model.onnx"

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor: {axis index: name}} of the axes a graph takes at any size (torch.onnx.export's form)."""
        return {t.name: {i: axis for i, axis in enumerate(t.axes) if axis not in FIXED_AXES}
                for t in self.inputs + self.outputs}


_IDS = TensorSpec("input_ids", "int64", ("batch", "sequence"))
_HIDDEN = ("batch", "sequence", "hidden")
TEXT_ENCODER = ComponentSpec(
    "text_encoder",
    inputs=(_IDS,),
    outputs=(TensorSpec("last_hidden_state", "float32", _HIDDEN), TensorSpec("pooler_output", "float32", ("batch", "hidden"))),
    host_ok=True, image_sized=False,
)
# SDXL conditions on the penultimate layer of both its encoders (diffusers' hidden_states[-2]), and on
# the second one's pooled projection; the graphs return just those, not all 13 or 33 hidden states.
PENULTIMATE = TensorSpec("penultimate_hidden_state", "float32", _HIDDEN)
TEXT_ENCODER_XL = ComponentSpec("text_encoder", inputs=(_IDS,), outputs=(PENULTIMATE,), host_ok=True,
                                image_sized=False)
TEXT_ENCODER_2 = ComponentSpec(
    "text_encoder_2", inputs=(_IDS,), outputs=(PENULTIMATE, TensorSpec("text_embeds", "float32", ("batch", "pooled"))),
    host_ok=True, image_sized=False,
)
_UNET_INPUTS = (
    TensorSpec("sample", "float32", ("batch", "channels", "height", "width")),
    # float: the sigma-based schedulers give fractional timesteps (diffusers' UNet takes them)
    TensorSpec("timestep", "float32", ("batch",)),
    TensorSpec("encoder_hidden_states", "float32", _HIDDEN),
)
_UNET_OUTPUTS = (TensorSpec("out_sample", "float32", ("batch", "latent_channels", "height", "width")),)
UNET = ComponentSpec(
    "unet", inputs=_UNET_INPUTS, outputs=_UNET_OUTPUTS,
    fp16_keep=(r"/time_proj/", r"/time_embedding/"),  # sinusoids of timesteps up to 999
)
# SDXL's UNet also takes the "text_time" conditioning: the pooled text embedding, and six numbers of
# micro-conditioning (original size, crop corner, target size) that it embeds as sinusoids too.
UNET_XL = ComponentSpec(
    "unet",
    inputs=_UNET_INPUTS + (TensorSpec("text_embeds", "float32", ("batch", "pooled")),
                           TensorSpec("time_ids", "float32", ("batch", "time_ids"))),
    outputs=_UNET_OUTPUTS,
    fp16_keep=UNET.fp16_keep + (r"/add_time_proj/", r"/add_embedding/"),  # sizes up to 4096 in sinusoids
)

# Feature caching (DeepCache, arXiv 2312.00858): an export with --deep-cache gives its UNet a second
# output, the hidden state entering one of the last up block's layers (at the latent resolution), and
# writes beside it a shallow UNet: conv_in, the first down block's first layers (the skips that layer
# needs) and the last up block from that layer on, which takes the cached feature in place of
# everything deeper. Between full steps the pipeline runs the shallow one on the feature of the last.
CACHE_FEATURE = TensorSpec("cache_feature", "float32", ("batch", "feature_channels", "height", "width"))


def with_cache_feature(unet: ComponentSpec) -> ComponentSpec:
    """The full UNet that also returns the feature the shallow one takes."""
    return replace(unet, outputs=unet.outputs + (CACHE_FEATURE,))


def shallow_unet(unet: ComponentSpec) -> ComponentSpec:
    """The shallow UNet of a family's UNet: its inputs and the cached feature in, the same noise out."""
    return ComponentSpec("unet_shallow", inputs=unet.inputs + (CACHE_FEATURE,), outputs=unet.outputs,
                         required=False, fp16_keep=unet.fp16_keep)


VAE_ENCODER = ComponentSpec(
    "vae_encoder",
    inputs=(TensorSpec("sample", "float32", ("batch", "rgb", "image_height", "image_width")),),
    # mean and log-variance of the latent posterior, concatenated on channels; the sampling is done by
    # the pipeline in numpy so that it draws from edgediff's seeded noise, not from a graph's RNG.
    outputs=(TensorSpec("latent_parameters", "float32", ("batch", "moments", "height", "width")),),
    required=False,
    fp16_keep=(r"^/encoder/mid_block/attentions", r"^/encoder/conv_norm_out/", r"^/quant_conv/"),
)
VAE_DECODER = ComponentSpec(
    "vae_decoder",
    inputs=(TensorSpec("latent_sample", "float32", ("batch", "latent_channels", "height", "width")),),
    outputs=(TensorSpec("sample", "float32", ("batch", "rgb", "image_height", "image_width")),),
    fp16_keep=(r"^/post_quant_conv/", r"^/decoder/conv_in/", r"^/decoder/mid_block/attentions",
               r"^/decoder/conv_norm_out/", r"^/decoder/conv_act/", r"^/decoder/conv_out/"),
    fp32_fallback=True,
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
    fp16_keep=(r"^/post_quant_conv/", r"^/decoder/conv_in/", r"^/decoder/mid_block/attentions"),
    fp32_fallback=True,
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
    # the shared-statistics GroupNorms (sums over whole tiles) and the last layers, as in the decoder
    fp16_keep=(r"/norm[12]/", r"^/decoder/conv_norm_out/", r"^/decoder/conv_act/", r"^/decoder/conv_out/"),
    fp32_fallback=True,
)

# A tiny autoencoder's decoder (TAESD, diffusers' AutoencoderTiny: madebyollin/taesd, taesdxl), exported
# beside the VAE when asked (`export --tiny-vae SOURCE`): a decode at a fraction of the VAE's cost, for
# drafts and live previews. It takes the UNet's latents as they are (its scaling factor is 1).
VAE_DECODER_TINY = ComponentSpec(
    "vae_decoder_tiny",
    inputs=(TensorSpec("latent_sample", "float32", ("batch", "latent_channels", "height", "width")),),
    outputs=(TensorSpec("sample", "float32", ("batch", "rgb", "image_height", "image_width")),),
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
    fp16_keep=(r".",),  # a classifier with thresholds: its decision must not move with precision
    host_ok=True, image_sized=False,
)

# An fp16 export keeps its VAE decoder's fp32 graph beside it under this name: the runtime re-runs a
# decode that overflowed (inf/NaN, the black image) with it, as A1111's --no-half-vae would.
FP32_FALLBACK = "model_fp32.onnx"
# An int8 export keeps an int8 VAE decoder beside its fp32 one under this name (generate --vae-decoder
# int8): the decode is 10-14 s of a 512x512 run on two cores in fp32.
INT8_GRAPH = "model_int8.onnx"

VAE = (VAE_ENCODER, VAE_DECODER, VAE_DECODER_HEAD, VAE_DECODER_TAIL)
# Every component any family has, for code that asks "is this folder an export at all?"
COMPONENTS = (TEXT_ENCODER, TEXT_ENCODER_2, UNET, shallow_unet(UNET), *VAE, VAE_DECODER_TINY, SAFETY_CHECKER)
