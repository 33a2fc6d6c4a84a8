"""Model families as records: what differs between SD 1.x, SD 2.x and SDXL is written here once, and the
exporter, the planner and the pipeline read it instead of asking which family they hold.

A family's record says which components it has (engine/components.py describes each), how prompts become
the UNet's conditioning, its default size and latent scale, and how its folders are recognised; how its
single-file checkpoints are recognised and converted is the CheckpointFormat of the same name in
export/single_file.py, which needs torch. Variants are records that change a field or two (inpainting is
the family with a 9-channel UNet), as ComfyUI's supported_models.py does. `FAMILIES` is the registry, tried
in order.

Conditioning, for every family alike (engine/pipeline.py reads only these records):

    for each text encoder, in order:  tokens (B, 77) -> its `context` output (B, 77, D_i)
    encoder_hidden_states = concat of the contexts on the last axis    # SD: (B, 77, 768); SDXL: 768 + 1280
    text_embeds = the `pooled` output of the encoder that has one      # SDXL: (B, 1280)
    time_ids = original size, crop corner, target size                 # SDXL's micro-conditioning: (B, 6)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .components import (SAFETY_CHECKER, TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_XL, UNET, UNET_XL, VAE,
                         ComponentSpec, shallow_unet)
from .errors import EdgediffError


@dataclass(frozen=True)
class TextEncoderUse:
    spec: ComponentSpec  # its graph's description; spec.name is its folder
    tokenizer: str  # the folder of the tokenizer that feeds it
    context: str  # the output that becomes (part of) the UNet's encoder_hidden_states
    pooled: str | None = None  # the output that becomes the UNet's text_embeds, where the family has them


@dataclass(frozen=True)
class Family:
    name: str  # "sd1", "sd2", "sdxl", and "-inpainting" variants: written in edgediff.json
    title: str  # for messages
    text_encoders: tuple[TextEncoderUse, ...]
    unet: ComponentSpec
    native_size: int  # pixels, when the UNet's config has no sample_size
    scaling_factor: float  # latents are multiplied by it, when the VAE's config does not say
    # UNet config.json entries that recognise the family; a record matches when all of them do (the
    # registry is tried in order, the most specific first)
    unet_marks: dict = field(default_factory=dict)
    micro_conditioning: bool = False  # the UNet takes time_ids (SDXL)
    # An empty (unset) negative prompt gives zero conditioning rather than the encoded "" (diffusers'
    # force_zeros_for_empty_prompt, which the folder's model_index.json may override)
    zeros_for_empty_negative: bool = False
    inpainting: bool = False  # the UNet takes latents + mask + masked-image latents (9 channels)
    # diffusers' pipeline classes for txt2img, img2img and inpainting: what model_index.json names, and
    # what the parity tests and the benchmark compare with
    diffusers_pipelines: tuple[str, str, str] = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                                                 "StableDiffusionInpaintPipeline")
    # The cheap preview: RGB in [-1, 1] as a linear map of the UNet's latents, one row per latent
    # channel (ComfyUI's latent_rgb_factors, fitted to each family's VAE); no VAE runs
    latent_rgb: tuple[tuple[float, float, float], ...] = ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350),
                                                          (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177))

    @property
    def components(self) -> tuple[ComponentSpec, ...]:
        """Every component an export of this family may have, in the order they run."""
        return (*(t.spec for t in self.text_encoders), self.unet, *VAE, SAFETY_CHECKER)

    @property
    def unet_shallow(self) -> ComponentSpec:
        """The shallow UNet of an export with feature caching (engine/components.shallow_unet)."""
        return shallow_unet(self.unet)

    @property
    def tokenizers(self) -> tuple[str, ...]:
        return tuple(t.tokenizer for t in self.text_encoders)

    @property
    def required(self) -> tuple[ComponentSpec, ...]:
        return tuple(c for c in self.components if c.required)

    def conditioning_names(self) -> tuple[str, ...]:
        """The UNet's inputs that the text stage makes (all but sample and timestep)."""
        return tuple(t.name for t in self.unet.inputs if t.name not in ("sample", "timestep"))

    def matches(self, unet_config: dict) -> bool:
        return all(unet_config.get(k, _DEFAULTS.get(k)) == v for k, v in self.unet_marks.items())


_DEFAULTS = {"in_channels": 4, "addition_embed_type": None, "use_linear_projection": False}

SD1 = Family(
    name="sd1", title="Stable Diffusion 1.x",
    text_encoders=(TextEncoderUse(TEXT_ENCODER, "tokenizer", "last_hidden_state"),),
    # LDM's scale_factor (v1-inference.yaml, v2-inference-v.yaml): 1 / the std of SD's VAE latents
    unet=UNET, native_size=512, scaling_factor=0.18215,
    unet_marks={"addition_embed_type": None, "in_channels": 4},
)
SD2 = replace(
    SD1, name="sd2", title="Stable Diffusion 2.x",
    unet_marks={**SD1.unet_marks, "use_linear_projection": True},  # SD 2.x's transformers project linearly
)
SDXL = Family(
    name="sdxl", title="Stable Diffusion XL",
    text_encoders=(TextEncoderUse(TEXT_ENCODER_XL, "tokenizer", "penultimate_hidden_state"),
                   TextEncoderUse(TEXT_ENCODER_2, "tokenizer_2", "penultimate_hidden_state", "text_embeds")),
    # sd_xl_base.yaml's scale_factor: SDXL's VAE was trained anew
    unet=UNET_XL, native_size=1024, scaling_factor=0.13025,
    unet_marks={"addition_embed_type": "text_time", "in_channels": 4},
    micro_conditioning=True, zeros_for_empty_negative=True,
    diffusers_pipelines=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                         "StableDiffusionXLInpaintPipeline"),
    latent_rgb=((0.3920, 0.4054, 0.4549), (-0.2634, -0.0196, 0.0653), (0.0568, 0.1687, -0.0755),
                (-0.3112, -0.2359, -0.2076)),
)


def inpainting(family: Family) -> Family:
    return replace(family, name=f"{family.name}-inpainting", title=f"{family.title} inpainting", inpainting=True,
                   unet_marks={**family.unet_marks, "in_channels": 9})


# The registry, most specific first: SD 2.x is SD 1.x with linear projections, so it is tried before.
FAMILIES = (inpainting(SDXL), SDXL, inpainting(SD2), SD2, inpainting(SD1), SD1)
BY_NAME = {f.name: f for f in FAMILIES}


def recognise(unet_config: dict, where: str = "the model") -> Family:
    """The family whose marks a UNet's config.json has."""
    for family in FAMILIES:
        if family.matches(unet_config):
            return family
    kind = unet_config.get("addition_embed_type") or f"{unet_config.get('in_channels')} input channels"
    raise EdgediffError(f"{where}: a UNet with {kind} is none of the families edgediff runs "
                        f"({', '.join(f.title for f in FAMILIES if not f.inpainting)} and their inpainting models)")


def by_name(name: str, where: str = "the model") -> Family:
    if name not in BY_NAME:
        raise EdgediffError(f"{where}: unknown model family {name!r} (edgediff knows {', '.join(BY_NAME)}); "
                            "export the model again with this edgediff")
    return BY_NAME[name]
