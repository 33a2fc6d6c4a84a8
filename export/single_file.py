"""Single-file Stable Diffusion checkpoints (the original CompVis/LDM and Stability SGM layouts) to a
diffusers folder.

A `.safetensors` or `.ckpt` as people download it holds the networks under the names of the original
training code: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and the text encoders:

    SD 1.x  cond_stage_model.transformer.*          OpenAI CLIP ViT-L, in Hugging Face's layout
    SD 2.x  cond_stage_model.model.*                OpenCLIP ViT-H (open_clip's layout, fused q/k/v)
    SDXL    conditioner.embedders.0.transformer.*   CLIP ViT-L, as SD 1.x
            conditioner.embedders.1.model.*         OpenCLIP ViT-bigG with its pooled-output projection

(SDXL's UNet also has `label_emb.*`, the added embedding of the pooled text and the size/crop numbers;
the SDXL refiner, whose only text encoder is `conditioner.embedders.0.model.*`, is refused.)
Conversion goes in three steps:

    read_checkpoint(path)  -> {name: tensor}           validated; never unpickles arbitrary objects
    detect(shapes)         -> Detected                 family and architecture, from names and shapes
    to_diffusers(path, out)                            diffusers' own key mapping, our configs

The key mapping is diffusers' (`diffusers.loaders.single_file_utils`); what diffusers fetches from the
Hub (the configs, the tokenizers) we write from `detect()`, so a full-size SD 1.5, 2.x, SDXL or
inpainting file converts offline. Weights are written as float32 safetensors whatever the file's dtype:
the export starts from fp32, and transformers 5 would load an fp16 text encoder as fp16 (diffusers
upcasts).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from ..engine.clip_vocab import PAD_SD1, PAD_SD2, VOCAB_SIZE, write_clip_tokenizer
from ..engine.errors import EdgediffError
from ..engine.families import SD1, SDXL, by_name
from ..engine.files import atomic_folder
from ..engine.model_folder import scale_factor
from ..engine.tokenizer import CLIP_CONTEXT

log = logging.getLogger("edgediff")

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_HF = "cond_stage_model.transformer."  # SD 1.x: transformers' CLIPTextModel, as LDM wrapped it
OPEN_CLIP = "cond_stage_model.model."  # SD 2.x: open_clip's text tower
CONDITIONER = "conditioner.embedders."  # SGM's GeneralConditioner: one embedder per conditioning input
SDXL_CLIP = CONDITIONER + "0.transformer."  # SDXL: CLIP ViT-L in transformers' layout, as SD 1.x
SDXL_OPEN_CLIP = CONDITIONER + "1.model."  # SDXL: OpenCLIP ViT-bigG; its projected pooled output is used too
REFINER_OPEN_CLIP = CONDITIONER + "0.model."  # the SDXL refiner's only text encoder (bigG)
FIRST_CONV = UNET + "input_blocks.0.0.weight"  # (model_channels, in_channels, 3, 3)
# SGM's label_emb.0 = Sequential(Linear(adm_in_channels, time_embed_dim), SiLU, Linear): SDXL's added
# conditioning, diffusers' add_embedding. Its input is MICRO_CONDITIONS sinusoidal embeddings of the
# original size, crop corner and target size, (h, w) each, then the pooled text embedding.
LABEL_EMB = UNET + "label_emb.0.0.weight"
MICRO_CONDITIONS = 6
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth")
COMPONENTS = ("unet", "vae", "text_encoder")  # what every family's config folder has
PREDICTION_TYPES = ("epsilon", "v_prediction")
INPAINT_CHANNELS = 9  # 4 noisy latents + 1 mask + 4 masked-image latents

# The standard configs, as the reference repositories ship them (stable-diffusion-v1-5/
# stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 and stabilityai/stable-diffusion-xl-base-1.0,
# */config.json). detect() replaces every number that shapes can tell; the rest (heads, norm groups,
# activations) comes from here.
SD1_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 64,  # latent side: 512 px / 8 (v1-inference.yaml image_size 64)
    "in_channels": 4,  # latent channels; 9 for inpainting (derived from input_blocks.0.0.weight)
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],  # model_channels 320 x channel_mult [1, 2, 4, 4]
    "layers_per_block": 2,  # num_res_blocks 2
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],  # attention_resolutions [4, 2, 1]
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 768,  # context_dim: CLIP ViT-L's width
    "attention_head_dim": 8,  # num_heads 8 in every block (diffusers' name is historical: it is heads)
    "use_linear_projection": False,  # 1x1 conv proj_in/proj_out
    "upcast_attention": False,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
SD2_UNET = {
    **SD1_UNET,
    "sample_size": 96,  # 768-v: 768 px / 8 (v2-inference-v.yaml); the 512 px checkpoints are 64
    "cross_attention_dim": 1024,  # OpenCLIP ViT-H's width
    "attention_head_dim": [5, 10, 20, 20],  # num_head_channels 64: block_out_channels / 64 heads
    "use_linear_projection": True,  # use_linear_in_transformer: True
    "upcast_attention": True,  # SD 2.1 overflows in fp16 attention without it (2.0 ships False)
}
SDXL_UNET = {
    **SD2_UNET,
    "sample_size": 128,  # 1024 px / 8
    "block_out_channels": [320, 640, 1280],  # model_channels 320 x channel_mult [1, 2, 4]
    "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,  # no attention at full resolution
    "up_block_types": ["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"],
    # transformer_depth [0, 2, 10]: diffusers writes its default 1 for the level without attention
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,  # CLIP ViT-L's 768 + OpenCLIP bigG's 1280: their states concatenated
    "attention_head_dim": [5, 10, 20],  # num_head_channels 64
    "upcast_attention": False,  # the repository says null (diffusers' default, False)
    "addition_embed_type": "text_time",  # label_emb: pooled text + micro-conditioning
    "addition_time_embed_dim": 256,  # each of the 6 numbers as a 256-wide sinusoidal embedding
    "projection_class_embeddings_input_dim": 2816,  # adm_in_channels: 6 x 256 + bigG's 1280
}
SD_VAE = {
    "_class_name": "AutoencoderKL",
    "sample_size": 512,  # pixels; 768 for the 768-v models (= UNet sample_size x 8)
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 512, 512],  # ddconfig ch 128 x ch_mult [1, 2, 4, 4]
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,  # z_channels
    "layers_per_block": 2,  # num_res_blocks
    "norm_num_groups": 32,
    "act_fn": "silu",
    "scaling_factor": SD1.scaling_factor,
}
SDXL_VAE = {
    **SD_VAE,
    "sample_size": 1024,
    "scaling_factor": SDXL.scaling_factor,
    "force_upcast": True,  # the SDXL VAE overflows in fp16: diffusers decodes it in fp32
}
SD1_TEXT = {  # openai/clip-vit-large-patch14's text tower
    "architectures": ["CLIPTextModel"],
    "vocab_size": VOCAB_SIZE,  # 49408 BPE tokens
    "hidden_size": 768,
    "intermediate_size": 3072,  # 4 x width
    "num_hidden_layers": 12,
    "num_attention_heads": 12,  # head dim 64
    "max_position_embeddings": CLIP_CONTEXT,
    "projection_dim": 768,  # unused by CLIPTextModel
    "hidden_act": "quick_gelu",  # OpenAI's CLIP
    "layer_norm_eps": 1e-5,
    # The ids of the tokenizer we write (the 2019-era configs say 0/2/1, which transformers reads as
    # "legacy"; only the pooled output, which SD does not use, depends on them).
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,  # SD 1.x pads with <|endoftext|>
}
SD2_TEXT = {  # OpenCLIP ViT-H-14's text tower, as stabilityai/stable-diffusion-2-1/text_encoder
    **SD1_TEXT,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,  # of 24: SD 2.x conditions on the penultimate layer (layer = "penultimate")
    "num_attention_heads": 16,  # head dim 64
    "projection_dim": 512,
    "hidden_act": "gelu",  # open_clip uses exact GELU
    "pad_token_id": 0,  # "!": stabilityai's tokenizer pads with it
}
SDXL_TEXT = SD1_TEXT  # stable-diffusion-xl-base-1.0/text_encoder is openai/clip-vit-large-patch14's
SDXL_TEXT_2 = {  # OpenCLIP ViT-bigG-14's text tower, as stable-diffusion-xl-base-1.0/text_encoder_2
    **SD2_TEXT,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_size": 1280,
    "intermediate_size": 5120,
    # All 32: SDXL takes the penultimate state from hidden_states, and the pooled output after the last
    # layer, which SD 2.x's truncated tower would not give.
    "num_hidden_layers": 32,
    "num_attention_heads": 20,  # head dim 64
    "projection_dim": 1280,  # text_projection: the pooled embedding the UNet's label_emb takes
}
# The scheduler configs exactly as the repositories ship them (SD 1.5's and 2.1's written by old
# diffusers, without `timestep_spacing`); to_diffusers sets `prediction_type`.
SD1_SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
SD2_SCHEDULER = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
HEAD_DIM = 64  # SD 2.x's and SDXL's num_head_channels, and every CLIP text tower's head size


class TextSlot(NamedTuple):
    """Where one text encoder lives in the checkpoint and in the diffusers folder."""
    title: str  # for messages
    prefix: str  # its tensors' names in the checkpoint
    config: dict  # its standard config; its transformers class is the config's architecture
    tokenizer: str  # the diffusers folder's tokenizer for it
    pad: str  # that tokenizer's padding token, as the family's repository has it
    open_clip: bool = False  # open_clip's layout (fused q/k/v) rather than transformers'
    unused_layers: int = 0  # SD 2.x conditions on the penultimate layer: the file's last one is not kept
    projected: bool = False  # SDXL's bigG: its projected pooled output conditions the UNet too

    def present(self, shapes: dict) -> bool:
        return (self.prefix + "token_embedding.weight" in shapes if self.open_clip
                else _text_key(shapes, self.prefix, "embeddings.token_embedding.weight") is not None)

    def tower(self, shapes: dict) -> TextTower:
        if self.open_clip:
            return _open_clip_tower(shapes, self.prefix, self.unused_layers, self.projected)
        return _clip_tower(shapes, self.prefix)


@dataclass(frozen=True)
class CheckpointFormat:
    """How a family's single-file checkpoint is recognised and converted. `name` is its Family's in
    engine/families.py, which stays free of torch and of this module, so these facts live here."""
    name: str
    title: str  # for messages
    texts: dict  # {diffusers folder: TextSlot}, in the order the UNet's context concatenates them
    unet: dict  # the standard configs; detect() replaces what shapes tell
    vae: dict
    scheduler: dict  # to_diffusers sets its prediction_type
    index: dict  # model_index.json's settings, as the family's repositories write them
    inpainting_index: dict = field(default_factory=dict)  # and the inpainting model's extra ones
    marker: str | None = None  # a key prefix naming it even where a text encoder is missing (then refused)
    head_dim: int | None = None  # UNet heads = block width / head_dim; None: the config's fixed heads
    text_time: bool = False  # SGM's label_emb (pooled text + micro-conditioning): diffusers' text_time
    v_prediction_default: bool = False  # SD 2.x: a file is the 768-v model unless inpainting (as diffusers)
    epsilon_sample_size: int | None = None  # SD 2.x: its epsilon files (the base, inpainting) are 512 px


SD1_FORMAT = CheckpointFormat(
    name="sd1", title="SD 1.x",
    texts={"text_encoder": TextSlot("CLIP ViT-L", CLIP_HF, SD1_TEXT, "tokenizer", PAD_SD1)},
    unet=SD1_UNET, vae=SD_VAE, scheduler=SD1_SCHEDULER,
    index={"requires_safety_checker": False, "safety_checker": [None, None]})  # we export none
SD2_FORMAT = replace(
    SD1_FORMAT, name="sd2", title="SD 2.x",
    texts={"text_encoder": TextSlot("OpenCLIP ViT-H", OPEN_CLIP, SD2_TEXT, "tokenizer", PAD_SD2,
                                    open_clip=True, unused_layers=1)},
    unet=SD2_UNET, scheduler=SD2_SCHEDULER, head_dim=HEAD_DIM,
    v_prediction_default=True, epsilon_sample_size=SD1_UNET["sample_size"])
SDXL_FORMAT = CheckpointFormat(
    name="sdxl", title="SDXL",
    texts={"text_encoder": TextSlot("CLIP ViT-L", SDXL_CLIP, SDXL_TEXT, "tokenizer", PAD_SD1),
           "text_encoder_2": TextSlot("OpenCLIP ViT-bigG", SDXL_OPEN_CLIP, SDXL_TEXT_2, "tokenizer_2",
                                      PAD_SD2, open_clip=True, projected=True)},
    unet=SDXL_UNET, vae=SDXL_VAE, scheduler=SDXL_SCHEDULER, marker=CONDITIONER, head_dim=HEAD_DIM,
    text_time=True,
    # An empty negative prompt is zeros, not the encoding of "", as SDXL was trained (the pipeline's
    # default too, written out as the repository does). The base and its inpainting model take no
    # aesthetic score: that conditioning is the refiner's.
    index={"force_zeros_for_empty_prompt": True}, inpainting_index={"requires_aesthetics_score": False})
# The registry, tried in order: a file with SGM's conditioner is SDXL or refused, whatever else it holds.
FORMATS = (SDXL_FORMAT, SD2_FORMAT, SD1_FORMAT)


@dataclass(frozen=True)
class TextTower:
    """One text encoder's architecture, as its shapes show it."""
    width: int
    layers: int  # those the diffusers model keeps (SD 2.x drops the last)
    heads: int  # width / 64: CLIP's convention, which shapes cannot check
    intermediate: int
    vocab_size: int
    max_positions: int
    projection_dim: int | None = None  # SDXL's second encoder: the pooled output's projected width

    def config(self, base: dict) -> dict:
        projection = {"projection_dim": self.projection_dim} if self.projection_dim else {}
        return {**base, "vocab_size": self.vocab_size, "hidden_size": self.width,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "max_position_embeddings": self.max_positions,
                **projection}


@dataclass(frozen=True)
class Detected:
    family: str  # the name of its CheckpointFormat and engine Family
    inpainting: bool
    prediction_type: str  # "epsilon" or "v_prediction"
    sample_size: int  # UNet latent side: 64; 96 for SD 2.x v-prediction (768 px); 128 for SDXL
    unet_in_channels: int
    unet_out_channels: int
    unet_block_out_channels: tuple[int, ...]
    unet_layers_per_block: int
    unet_down_block_types: tuple[str, ...]
    unet_up_block_types: tuple[str, ...]
    cross_attention_dim: int
    use_linear_projection: bool
    attention_head_dim: int | tuple[int, ...]  # family convention: shapes cannot tell heads apart
    transformer_layers_per_block: tuple[int, ...]  # 1 where a level has no attention, as diffusers says
    vae_block_out_channels: tuple[int, ...]
    vae_layers_per_block: int
    vae_latent_channels: int
    # The (first) text encoder, flat: SD 1.x/2.x's only one, SDXL's CLIP ViT-L.
    text_width: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    text_vocab_size: int
    text_max_positions: int
    text_2: TextTower | None = None  # SDXL's OpenCLIP bigG
    addition_time_embed_dim: int | None = None  # SDXL: the width of each micro-conditioning embedding

    def unet_config(self) -> dict:
        heads = self.attention_head_dim
        config = {**self.format.unet, "sample_size": self.sample_size,
                  "in_channels": self.unet_in_channels, "out_channels": self.unet_out_channels,
                  "block_out_channels": list(self.unet_block_out_channels),
                  "layers_per_block": self.unet_layers_per_block,
                  "down_block_types": list(self.unet_down_block_types),
                  "up_block_types": list(self.unet_up_block_types),
                  "cross_attention_dim": self.cross_attention_dim,
                  "use_linear_projection": self.use_linear_projection,
                  "attention_head_dim": list(heads) if isinstance(heads, tuple) else heads,
                  "transformer_layers_per_block": list(self.transformer_layers_per_block)}
        if self.addition_time_embed_dim is not None:  # SDXL: label_emb's input, as _addition_time_embed_dim
            t = self.addition_time_embed_dim
            pooled = self.text_2.projection_dim
            config.update(addition_time_embed_dim=t,
                          projection_class_embeddings_input_dim=MICRO_CONDITIONS * t + pooled)
        return config

    @property
    def format(self) -> CheckpointFormat:
        return next(f for f in FORMATS if f.name == self.family)

    def vae_config(self) -> dict:
        n = len(self.vae_block_out_channels)
        return {**self.format.vae, "sample_size": self.sample_size * scale_factor(self.vae_block_out_channels),
                "block_out_channels": list(self.vae_block_out_channels),
                "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
                "latent_channels": self.vae_latent_channels, "layers_per_block": self.vae_layers_per_block}

    def text_config(self) -> dict:
        first = TextTower(self.text_width, self.text_layers, self.text_heads, self.text_intermediate,
                          self.text_vocab_size, self.text_max_positions)
        return first.config(self.format.texts["text_encoder"].config)

    def text_2_config(self) -> dict | None:
        return self.text_2.config(self.format.texts["text_encoder_2"].config) if self.text_2 else None

    def configs(self) -> dict:
        """{diffusers component: config} of the networks."""
        texts = {"text_encoder": self.text_config(), "text_encoder_2": self.text_2_config()}
        return {"unet": self.unet_config(), "vae": self.vae_config(),
                **{name: texts[name] for name in self.format.texts}}

    def scheduler_config(self) -> dict:
        return {**self.format.scheduler, "prediction_type": self.prediction_type}


# ---------------------------------------------------------------------------------------------------
# 1. Reading


def read_checkpoint(path: str | Path) -> dict:
    """{name: tensor} of a `.safetensors` or `.ckpt`/`.pt`/`.pth` file, with a top-level "state_dict"
    unwrapped and non-tensor entries (training step counters) dropped."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise EdgediffError(f"{path} does not exist; give a .safetensors or .ckpt checkpoint file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        _check_safetensors_header(path)
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:  # the header was sound, so the data itself is bad
            raise EdgediffError(f"{path} cannot be read as safetensors ({_one_line(e)}); "
                                "re-download it") from None
    elif suffix in TORCH_SUFFIXES:
        import pickle

        try:
            # weights_only: tensors, dicts, lists and numbers only. A full unpickler runs whatever code
            # the file names, and checkpoints are downloaded from strangers.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's restricted unpickler refuses two different things: a pickle that names a Python
            # object it will not build ("Unsupported global: GLOBAL posix.system"), and bytes that are no
            # pickle at all ("Unsupported operand 103"). Only the first needs unrestricted unpickling.
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            if not found:
                raise EdgediffError(f"{path} is not a valid PyTorch checkpoint (damaged, cut off, or not a "
                                    "checkpoint at all); re-download it") from None
            raise EdgediffError(
                f"{path} needs unrestricted unpickling ({found.group(1)}), which edgediff refuses because it "
                "can run code; convert it to .safetensors with a tool you trust, or download the "
                ".safetensors version") from None
        except Exception as e:
            raise EdgediffError(f"{path} cannot be read as a PyTorch checkpoint ({_one_line(e)}); "
                                "re-download it") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise EdgediffError(f"{path} holds a {type(state).__name__}, not a dictionary of weights")
    else:
        raise EdgediffError(f"{path}: unknown checkpoint type {suffix or '(no suffix)'!r}; edgediff reads "
                            ".safetensors, .ckpt, .pt and .pth files")
    return {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _check_safetensors_header(path: Path) -> None:
    """The file format is 8 bytes of little-endian header length, a JSON header naming each tensor's
    byte range, then the data. Checking that the ranges end exactly at the end of the file catches a
    cut-off download in one read of the header, with a message safetensors itself does not give."""
    size = path.stat().st_size

    def bad(problem: str) -> EdgediffError:
        return EdgediffError(f"{path} is damaged or incomplete: {problem}; re-download it")

    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, too short for a safetensors file")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise bad(f"the header says it is {n} bytes long but the file has only {size - 8} after it")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise bad("its header is not valid safetensors JSON") from None
    have, want = size - 8 - n, max(ends, default=0)
    if have != want:
        raise bad(f"the header describes {want} bytes of tensor data but the file holds {have}")


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else text[:197] + "..."


# ---------------------------------------------------------------------------------------------------
# 2. Detection


def detect(shapes: dict[str, tuple[int, ...]], prediction_type: str | None = None) -> Detected:
    """Family, inpainting, prediction type and architecture from tensor names and shapes alone."""
    _reject_other_formats(shapes)
    try:
        return _detect(shapes, prediction_type)
    except KeyError as e:
        raise EdgediffError(f"the checkpoint lacks {e.args[0]}: it is not a complete SD 1.x, 2.x or SDXL "
                            "checkpoint") from None


def _detect(shapes: dict[str, tuple[int, ...]], prediction_type: str | None) -> Detected:
    fmt = _format(shapes)
    if not any(k.startswith(VAE) for k in shapes):
        raise EdgediffError(f"the checkpoint has a UNet but no VAE ({VAE}*); edgediff needs a complete "
                            "SD 1.x, 2.x or SDXL file")
    unet = _detect_unet(shapes)
    texts = [slot.tower(shapes) for slot in fmt.texts.values()]
    context = unet["cross_attention_dim"]
    if sum(t.width for t in texts) != context:
        widths = " + ".join(str(t.width) for t in texts)
        raise EdgediffError(f"the text encoder width {widths} differs from the UNet's cross-attention "
                            f"dimension {context}; the checkpoint mixes parts of different models")
    time_dim = _addition_time_embed_dim(shapes, texts[-1].projection_dim) if fmt.text_time else None

    inpainting = unet["unet_in_channels"] == INPAINT_CHANNELS
    if prediction_type is None:
        v = "v_pred" in shapes or (fmt.v_prediction_default and not inpainting)
        prediction_type = "v_prediction" if v else "epsilon"
    elif prediction_type not in PREDICTION_TYPES:
        raise EdgediffError(f"unknown prediction type {prediction_type!r}; use epsilon or v_prediction")
    sample_size = (prediction_type == "epsilon" and fmt.epsilon_sample_size) or fmt.unet["sample_size"]
    blocks = unet["unet_block_out_channels"]
    heads = tuple(c // fmt.head_dim for c in blocks) if fmt.head_dim else fmt.unet["attention_head_dim"]
    first = texts[0]
    return Detected(
        family=fmt.name, inpainting=inpainting, prediction_type=prediction_type, sample_size=sample_size,
        attention_head_dim=heads, **unet, **_detect_vae(shapes),
        text_width=first.width, text_layers=first.layers, text_heads=first.heads,
        text_intermediate=first.intermediate, text_vocab_size=first.vocab_size,
        text_max_positions=first.max_positions, text_2=texts[1] if len(texts) > 1 else None,
        addition_time_embed_dim=time_dim,
    )


def _format(shapes: dict) -> CheckpointFormat:
    """The first format whose text encoders are all in the file."""
    for fmt in FORMATS:
        missing = [slot for slot in fmt.texts.values() if not slot.present(shapes)]
        if not missing:
            return fmt
        if fmt.marker and any(k.startswith(fmt.marker) for k in shapes):
            raise EdgediffError(f"this looks like an {fmt.title} checkpoint ({fmt.marker}* keys) but lacks "
                                f"its {missing[0].title} text encoder ({missing[0].prefix}*); convert a "
                                f"complete {fmt.title} base checkpoint")
    raise EdgediffError(f"the checkpoint has a UNet but no text encoder (none of {CLIP_HF}*, {OPEN_CLIP}* or "
                        f"{CONDITIONER}*); edgediff needs a complete SD 1.x, 2.x or SDXL file")


def _detect_unet(shapes: dict) -> dict:
    """The UNet's fields of Detected. input_blocks: [conv_in] then per level `layers` (resnet[,
    attention]) and a downsampler except on the last; output_blocks: per level `layers + 1`
    (resnet[, attention][, upsampler])."""
    in_channels = shapes[FIRST_CONV][1]
    if in_channels not in (4, INPAINT_CHANNELS):
        raise EdgediffError(f"the UNet takes {in_channels} input channels; edgediff converts text-to-image "
                            "(4) and inpainting (9) checkpoints (8 is instruct-pix2pix, 7 the upscaler)")
    levels = 1 + len(_indices(shapes, re.escape(UNET) + r"input_blocks\.(\d+)\.0\.op\.weight"))
    num_out = len(_indices(shapes, re.escape(UNET) + r"output_blocks\.(\d+)\."))
    layers = num_out // levels - 1
    blocks, down, up, depths = [], [], [], []
    for level in range(levels):
        first = f"{UNET}input_blocks.{1 + level * (layers + 1)}."  # the level's first resnet's block
        blocks.append(shapes[first + "0.out_layers.3.weight"][0])
        attn = first + "1.proj_in.weight" in shapes
        down.append("CrossAttnDownBlock2D" if attn else "DownBlock2D")
        depths.append(len(_indices(shapes, re.escape(first) + r"1\.transformer_blocks\.(\d+)\.")) or 1)
        attn = f"{UNET}output_blocks.{level * (layers + 1)}.1.proj_in.weight" in shapes
        up.append("CrossAttnUpBlock2D" if attn else "UpBlock2D")
    return dict(
        unet_in_channels=in_channels, unet_out_channels=shapes[UNET + "out.2.weight"][0],
        unet_block_out_channels=tuple(blocks), unet_layers_per_block=layers,
        unet_down_block_types=tuple(down), unet_up_block_types=tuple(up),
        cross_attention_dim=shapes[UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1],
        use_linear_projection=len(shapes[UNET + "middle_block.1.proj_in.weight"]) == 2,
        transformer_layers_per_block=tuple(depths))


def _detect_vae(shapes: dict) -> dict:
    """The VAE's fields of Detected: encoder.down.{level}.block.{i}; the latent is post_quant_conv's input."""
    levels = len(_indices(shapes, re.escape(VAE) + r"encoder\.down\.(\d+)\."))
    layers = len(_indices(shapes, re.escape(VAE) + r"encoder\.down\.0\.block\.(\d+)\."))
    blocks = [shapes[f"{VAE}encoder.down.{i}.block.{layers - 1}.conv2.weight"][0] for i in range(levels)]
    return dict(vae_block_out_channels=tuple(blocks), vae_layers_per_block=layers,
                vae_latent_channels=shapes[VAE + "post_quant_conv.weight"][1])


def _clip_tower(shapes: dict, prefix: str) -> TextTower:
    """transformers' CLIPTextModel layout (SD 1.x, and SDXL's first encoder)."""
    token = _text_key(shapes, prefix, "embeddings.token_embedding.weight")
    if token is None:
        raise KeyError(prefix + "text_model.embeddings.token_embedding.weight")
    model = token.removesuffix("embeddings.token_embedding.weight")
    vocab, width = shapes[token]
    layers = len(_indices(shapes, re.escape(model) + r"encoder\.layers\.(\d+)\."))
    return TextTower(width=width, layers=layers, heads=width // HEAD_DIM,
                     intermediate=shapes[f"{model}encoder.layers.0.mlp.fc1.weight"][0], vocab_size=vocab,
                     max_positions=shapes[model + "embeddings.position_embedding.weight"][0])


def _open_clip_tower(shapes: dict, prefix: str, unused_layers: int = 0, projected: bool = False) -> TextTower:
    """open_clip's TextTransformer layout (SD 2.x, and SDXL's second encoder). `text_projection` is
    stored (width, projection), the transpose of nn.Linear's weight."""
    vocab, width = shapes[prefix + "token_embedding.weight"]
    layers = len(_indices(shapes, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")) - unused_layers
    return TextTower(width=width, layers=layers, heads=width // HEAD_DIM,
                     intermediate=shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0],
                     vocab_size=vocab, max_positions=shapes[prefix + "positional_embedding"][0],
                     projection_dim=shapes[prefix + "text_projection"][1] if projected else None)


def _addition_time_embed_dim(shapes: dict, pooled: int) -> int:
    """The width of each micro-conditioning embedding: label_emb takes 6 of them and the pooled text."""
    inputs = shapes[LABEL_EMB][1]
    if inputs <= pooled or (inputs - pooled) % MICRO_CONDITIONS:
        raise EdgediffError(f"the UNet's added conditioning ({LABEL_EMB}) takes {inputs} inputs, which is "
                            f"not {MICRO_CONDITIONS} size/crop embeddings and the {pooled}-wide pooled text "
                            "embedding; the checkpoint mixes parts of different models")
    return (inputs - pooled) // MICRO_CONDITIONS


def _reject_other_formats(shapes: dict) -> None:
    """Say what a file that is not an SD 1.x, 2.x or SDXL checkpoint looks like, rather than fail on a key."""
    keys = list(shapes)
    if not keys:
        raise EdgediffError("the checkpoint holds no tensors")
    if any(k.startswith(REFINER_OPEN_CLIP) for k in keys):
        raise EdgediffError("this is an SDXL refiner checkpoint (its only text encoder is "
                            f"{REFINER_OPEN_CLIP}*); edgediff runs the SDXL base model, the refiner is not "
                            "supported: convert the base checkpoint")
    if any(re.search(r"lora_(up|down|A|B)\b|^lora_", k) for k in keys):
        raise EdgediffError("this looks like a LoRA (lora_up/lora_down keys), which modifies a model rather "
                            "than being one; convert the base checkpoint it was trained for")
    if FIRST_CONV in shapes:
        return
    if any(k.startswith(UNET) for k in keys):
        raise EdgediffError(f"the checkpoint has {UNET}* tensors but no {FIRST_CONV}: not an SD 1.x, 2.x or "
                            "SDXL UNet (SD3, Flux and others are not supported)")
    vae = [k for k in keys if k.startswith((VAE, "encoder.", "decoder.", "quant_conv.", "post_quant_conv."))]
    if len(vae) == len(keys):
        raise EdgediffError(f"the file holds only a VAE ({len(keys)} tensors of encoder/decoder); "
                            "convert a complete SD checkpoint")
    if any(k.startswith(("down_blocks.", "unet.down_blocks.")) for k in keys):
        raise EdgediffError("this is a diffusers-format weights file (down_blocks.* keys); use the "
                            "diffusers model folder it belongs to")
    sample = ", ".join(keys[:3])
    raise EdgediffError(f"found {len(keys)} tensors, none of {UNET}* (first: {sample}); "
                        "this is not a Stable Diffusion checkpoint")


def _indices(shapes: dict, pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in shapes if (m := rx.match(k))}


def _text_key(shapes: dict, prefix: str, name: str) -> str | None:
    """Files name CLIP's tensors `<prefix>text_model.X` (or, from old transformers, without the
    `text_model.`)."""
    for key in (prefix + "text_model." + name, prefix + name):
        if key in shapes:
            return key
    return None


# ---------------------------------------------------------------------------------------------------
# 3. Writing the diffusers folder


def to_diffusers(path: str | Path, out_dir: str | Path, config: Path | None = None,
                 prediction_type: str | None = None, *, force: bool = False) -> Path:
    """Convert the checkpoint at `path` into a diffusers folder at `out_dir`; returns `out_dir`.

    `config`: a diffusers model folder whose unet/, vae/ and text_encoder[_2]/config.json (and, where it
    has them, tokenizer[_2]/ and scheduler/) describe the checkpoint, for models that the standard
    SD 1.x/2.x/SDXL configs do not fit. `prediction_type` ("epsilon" or "v_prediction") overrides the
    detected one."""
    path, out = Path(path), Path(out_dir)
    config = Path(config) if config is not None else None
    if out.exists() and not out.is_dir():
        raise EdgediffError(f"{out} is a file; give a folder to write the diffusers model to")
    if out.exists() and any(out.iterdir()) and not force:
        raise EdgediffError(f"{out} already exists and is not empty; choose another output or pass --force "
                            "to replace it")
    if config is not None and not all((config / c / "config.json").is_file() for c in COMPONENTS):
        raise EdgediffError(f"{config} is not a diffusers model folder: it needs unet/, vae/ and "
                            "text_encoder/config.json")
    state = read_checkpoint(path)
    try:
        found = detect({k: tuple(v.shape) for k, v in state.items()}, prediction_type)
    except EdgediffError as e:
        raise EdgediffError(f"{path}: {e}") from None
    configs = _configs(path, found, config)
    scheduler = _scheduler_config(found, config, prediction_type is None and "v_pred" not in state)
    log.info("%s: %s%s, %s", path.name, found.family, " inpainting" if found.inpainting else "",
             scheduler["prediction_type"])

    texts = found.format.texts
    with atomic_folder(out) as tmp:
        try:
            _write_unet(tmp / "unet", state, configs["unet"])
            _write_vae(tmp / "vae", state, configs["vae"])
            for name, slot in texts.items():
                _write_text_encoder(tmp / name, state, configs[name], slot)
        except EdgediffError as e:
            raise EdgediffError(f"{path}: {e}") from None
        del state
        for name, slot in texts.items():
            _write_tokenizer(tmp / slot.tokenizer, slot.pad, configs[name]["vocab_size"], config, path)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
        (tmp / "model_index.json").write_text(json.dumps(_model_index(found, scheduler), indent=2))
    return out


def _configs(path: Path, found: Detected, config: Path | None) -> dict:
    """{diffusers component: config} of the networks: the config folder's, or the detected ones."""
    if config is None:
        _check_conventions(path, found)
        return found.configs()
    names = ["unet", "vae", *found.format.texts]
    missing = [n for n in names if not (config / n / "config.json").is_file()]
    if missing:
        name = found.format.title
        raise EdgediffError(f"{path}: {config} has no {missing[0]}/config.json, which an {name} checkpoint "
                            f"needs; give the config folder of an {name} model")
    return {n: _read_json(config / n / "config.json") for n in names}


def _scheduler_config(found: Detected, config: Path | None, keep_folders_prediction: bool) -> dict:
    """The family's standard scheduler, or the config folder's, which is the model's own: its prediction
    type yields only to the caller's and to the checkpoint's `v_pred` marker."""
    if config is None or not (config / "scheduler" / "scheduler_config.json").is_file():
        return found.scheduler_config()
    scheduler = _read_json(config / "scheduler" / "scheduler_config.json")
    if keep_folders_prediction:
        scheduler.setdefault("prediction_type", "epsilon")
    else:
        scheduler["prediction_type"] = found.prediction_type
    return scheduler


def _check_conventions(path: Path, found: Detected) -> None:
    """Heads are the one thing shapes do not show; the standard configs assume SD's head size."""
    texts = [found.text_width] + ([found.text_2.width] if found.text_2 else [])
    widths = texts + (list(found.unet_block_out_channels) if found.format.head_dim else [])
    if any(w % HEAD_DIM for w in widths):
        raise EdgediffError(f"{path}: its widths {widths} are not multiples of SD's head size {HEAD_DIM}, so "
                            "the attention heads cannot be inferred; give the model's config folder")


def _write_unet(folder: Path, state: dict, config: dict) -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    # SDXL's label_emb becomes add_embedding because the config says addition_embed_type "text_time".
    weights = convert_ldm_unet_checkpoint(state, config)
    model = _on_meta(lambda: UNet2DConditionModel.from_config(config))
    _save(folder, "diffusion_pytorch_model.safetensors", "UNet", weights, model.state_dict())
    model.save_config(folder)


def _write_vae(folder: Path, state: dict, config: dict) -> None:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    weights = convert_ldm_vae_checkpoint(state, config)
    model = _on_meta(lambda: AutoencoderKL.from_config(config))
    _save(folder, "diffusion_pytorch_model.safetensors", "VAE", weights, model.state_dict())
    model.save_config(folder)


def _write_text_encoder(folder: Path, state: dict, config: dict, slot: TextSlot) -> None:
    import transformers
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    text_config = transformers.CLIPTextConfig.from_dict(config)
    text_config.architectures = list(slot.config["architectures"])
    model = _on_meta(lambda: getattr(transformers, text_config.architectures[0])(text_config))
    if slot.open_clip:
        # Splits the fused in_proj by text_projection's first dimension (the width) and transposes
        # text_projection into CLIPTextModelWithProjection's nn.Linear.
        weights = convert_open_clip_checkpoint(model, state, prefix=slot.prefix)
    else:  # strips both CLIP ViT-L prefixes, SD 1.x's and SDXL's; a file has one of them
        weights = convert_ldm_clip_checkpoint(state)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel's names
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    expected = model.state_dict()
    # In the file but not in the model, and rightly so: the position ids (a buffer transformers no
    # longer saves), SD 2.x's projection to the joint space (CLIPTextModel has none), and SD 2.x's unused
    # last layer.
    layer = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.")
    weights = {k: v for k, v in weights.items() if k in expected or not (
        k.endswith("position_ids") or k == "text_projection.weight"
        or ((m := layer.match(k)) and int(m.group(1)) >= text_config.num_hidden_layers))}
    _save(folder, "model.safetensors", folder.name.replace("_", " "), weights, expected)
    text_config.save_pretrained(folder)


def _write_tokenizer(folder: Path, pad: str, vocab_size: int, config: Path | None, path: Path) -> None:
    """The config folder's tokenizer where it has one; otherwise CLIP's, which every family uses."""
    if config is not None and (config / folder.name).is_dir():
        shutil.copytree(config / folder.name, folder)
    elif vocab_size != VOCAB_SIZE:
        raise EdgediffError(f"{path}: the text encoder of {folder.name}/ has {vocab_size} tokens, not CLIP's "
                            f"{VOCAB_SIZE}; give a config folder that has its {folder.name}/")
    else:
        write_clip_tokenizer(folder, pad_token=pad)


def _on_meta(build):
    """Build a model without memory for its weights: we need only its parameter names and shapes."""
    import torch

    with torch.device("meta"):
        return build()


def _save(folder: Path, name: str, what: str, weights: dict, expected: dict) -> None:
    """Check the converted names and shapes against the model's, then write float32 safetensors."""
    import torch
    from safetensors.torch import save_file

    missing = [k for k in expected if k not in weights]
    extra = [k for k in weights if k not in expected]
    wrong = [f"{k} {tuple(weights[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in weights and weights[k].shape != v.shape]
    for problem, names in (("lacks", missing), ("has unexpected", extra), ("has wrongly shaped", wrong)):
        if names:
            raise EdgediffError(f"the checkpoint's {what} does not fit its config: it {problem} tensors "
                                f"({len(names)}, e.g. {', '.join(names[:2])}); give the model's config "
                                "folder")
    tensors = {}
    for k in expected:
        t = weights[k].to(torch.float32) if weights[k].is_floating_point() else weights[k]
        # safetensors refuses views into a larger buffer (diffusers' conversion slices some weights)
        if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone(memory_format=torch.contiguous_format)
        tensors[k] = t
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / name), metadata={"format": "pt"})


def _model_index(found: Detected, scheduler: dict) -> dict:
    import diffusers

    none = [None, None]
    fmt = found.format
    pipelines = by_name(fmt.name).diffusers_pipelines  # (txt2img, img2img, inpainting)
    extra = {**fmt.index, **(fmt.inpainting_index if found.inpainting else {})}
    return {
        "_class_name": pipelines[2 if found.inpainting else 0], "_diffusers_version": diffusers.__version__,
        "feature_extractor": none, "image_encoder": none, **extra,
        "scheduler": ["diffusers", scheduler["_class_name"]],
        **{name: ["transformers", slot.config["architectures"][0]] for name, slot in fmt.texts.items()},
        **{slot.tokenizer: ["transformers", "CLIPTokenizer"] for slot in fmt.texts.values()},
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EdgediffError(f"{path} cannot be read: {_one_line(e)}") from None
