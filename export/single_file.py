"""Single-file Stable Diffusion checkpoints (the original CompVis/LDM layout) to a diffusers folder.

A `.safetensors` or `.ckpt` as people download it holds the three networks under the names of the
original training code: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and
`cond_stage_model.transformer.*` (SD 1.x: OpenAI CLIP ViT-L in Hugging Face's layout) or
`cond_stage_model.model.*` (SD 2.x: OpenCLIP ViT-H). Conversion goes in three steps:

    read_checkpoint(path)  -> {name: tensor}           validated; never unpickles arbitrary objects
    detect(shapes)         -> Detected                 family and architecture, from names and shapes
    to_diffusers(path, out)                            diffusers' own key mapping, our configs

The key mapping is diffusers' (`diffusers.loaders.single_file_utils`); what diffusers fetches from the
Hub (the configs, the tokenizer) we write from `detect()`, so a full-size SD 1.5, 2.x or inpainting file
converts offline. Weights are written as float32 safetensors whatever the file's dtype: the export
starts from fp32, and transformers 5 would load an fp16 text encoder as fp16 (diffusers upcasts).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..engine.clip_vocab import PAD_SD1, PAD_SD2, VOCAB_SIZE, write_clip_tokenizer
from ..engine.errors import EdgediffError
from ..engine.files import atomic_folder

log = logging.getLogger("edgediff")

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_HF = "cond_stage_model.transformer."  # SD 1.x: transformers' CLIPTextModel, as LDM wrapped it
OPEN_CLIP = "cond_stage_model.model."  # SD 2.x: open_clip's text tower
FIRST_CONV = UNET + "input_blocks.0.0.weight"  # (model_channels, in_channels, 3, 3)
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth")
COMPONENTS = ("unet", "vae", "text_encoder")
PREDICTION_TYPES = ("epsilon", "v_prediction")
INPAINT_CHANNELS = 9  # 4 noisy latents + 1 mask + 4 masked-image latents
VAE_SCALING_FACTOR = 0.18215  # LDM's scale_factor in v1-inference.yaml and v2-inference-v.yaml

# The standard configs, as the reference repositories ship them (stable-diffusion-v1-5/
# stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1, */config.json). detect() replaces every
# number that shapes can tell; the rest (heads, norm groups, activations) comes from here.
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
    "scaling_factor": VAE_SCALING_FACTOR,
}
SD1_TEXT = {  # openai/clip-vit-large-patch14's text tower
    "architectures": ["CLIPTextModel"],
    "vocab_size": VOCAB_SIZE,  # 49408 BPE tokens
    "hidden_size": 768,
    "intermediate_size": 3072,  # 4 x width
    "num_hidden_layers": 12,
    "num_attention_heads": 12,  # head dim 64
    "max_position_embeddings": 77,  # CLIP's context length
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
# The scheduler configs exactly as the two repositories ship them (written by old diffusers, without
# `timestep_spacing`); to_diffusers adds `prediction_type`.
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
HEAD_DIM = 64  # SD 2.x's num_head_channels, and every CLIP text tower's head size


@dataclass(frozen=True)
class Detected:
    family: str  # "sd1" (CLIP ViT-L text encoder) or "sd2" (OpenCLIP)
    inpainting: bool
    prediction_type: str  # "epsilon" or "v_prediction"
    sample_size: int  # UNet latent side: 64, or 96 for SD 2.x v-prediction (768 px)
    unet_in_channels: int
    unet_out_channels: int
    unet_block_out_channels: tuple[int, ...]
    unet_layers_per_block: int
    unet_down_block_types: tuple[str, ...]
    unet_up_block_types: tuple[str, ...]
    cross_attention_dim: int
    use_linear_projection: bool
    attention_head_dim: int | tuple[int, ...]  # family convention: shapes cannot tell heads apart
    vae_block_out_channels: tuple[int, ...]
    vae_layers_per_block: int
    vae_latent_channels: int
    text_width: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    text_vocab_size: int
    text_max_positions: int

    def unet_config(self) -> dict:
        heads = self.attention_head_dim
        return {**(SD2_UNET if self.family == "sd2" else SD1_UNET), "sample_size": self.sample_size,
                "in_channels": self.unet_in_channels, "out_channels": self.unet_out_channels,
                "block_out_channels": list(self.unet_block_out_channels),
                "layers_per_block": self.unet_layers_per_block,
                "down_block_types": list(self.unet_down_block_types),
                "up_block_types": list(self.unet_up_block_types),
                "cross_attention_dim": self.cross_attention_dim,
                "use_linear_projection": self.use_linear_projection,
                "attention_head_dim": list(heads) if isinstance(heads, tuple) else heads}

    def vae_config(self) -> dict:
        n = len(self.vae_block_out_channels)
        return {**SD_VAE, "sample_size": self.sample_size * 2 ** (n - 1),
                "block_out_channels": list(self.vae_block_out_channels),
                "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
                "latent_channels": self.vae_latent_channels, "layers_per_block": self.vae_layers_per_block}

    def text_config(self) -> dict:
        return {**(SD2_TEXT if self.family == "sd2" else SD1_TEXT), "vocab_size": self.text_vocab_size,
                "hidden_size": self.text_width, "intermediate_size": self.text_intermediate,
                "num_hidden_layers": self.text_layers, "num_attention_heads": self.text_heads,
                "max_position_embeddings": self.text_max_positions}

    def scheduler_config(self) -> dict:
        return {**(SD2_SCHEDULER if self.family == "sd2" else SD1_SCHEDULER),
                "prediction_type": self.prediction_type}


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
        raise EdgediffError(f"the checkpoint lacks {e.args[0]}: it is not a complete SD 1.x/2.x "
                            "checkpoint") from None


def _detect(shapes: dict[str, tuple[int, ...]], prediction_type: str | None) -> Detected:
    if OPEN_CLIP + "token_embedding.weight" in shapes:
        family = "sd2"
    elif _text_key(shapes, "embeddings.token_embedding.weight"):
        family = "sd1"
    else:
        raise EdgediffError("the checkpoint has a UNet but no text encoder (neither "
                            f"{CLIP_HF}* nor {OPEN_CLIP}*); edgediff needs a complete SD 1.x/2.x file")
    if not any(k.startswith(VAE) for k in shapes):
        raise EdgediffError(f"the checkpoint has a UNet but no VAE ({VAE}*); edgediff needs a complete "
                            "SD 1.x/2.x file")

    # UNet. input_blocks: [conv_in] then per level `layers` (resnet[, attention]) and a downsampler
    # except on the last; output_blocks: per level `layers + 1` (resnet[, attention][, upsampler]).
    in_channels = shapes[FIRST_CONV][1]
    if in_channels not in (4, INPAINT_CHANNELS):
        raise EdgediffError(f"the UNet takes {in_channels} input channels; edgediff converts text-to-image "
                            "(4) and inpainting (9) checkpoints (8 is instruct-pix2pix, 7 the upscaler)")
    levels = 1 + len(_indices(shapes, UNET + r"input_blocks\.(\d+)\.0\.op\.weight"))
    num_out = len(_indices(shapes, UNET + r"output_blocks\.(\d+)\."))
    layers = num_out // levels - 1
    blocks, down, up = [], [], []
    for level in range(levels):
        first = 1 + level * (layers + 1)  # input block of the level's first resnet
        blocks.append(shapes[f"{UNET}input_blocks.{first}.0.out_layers.3.weight"][0])
        attn = f"{UNET}input_blocks.{first}.1.proj_in.weight" in shapes
        down.append("CrossAttnDownBlock2D" if attn else "DownBlock2D")
        attn = f"{UNET}output_blocks.{level * (layers + 1)}.1.proj_in.weight" in shapes
        up.append("CrossAttnUpBlock2D" if attn else "UpBlock2D")
    proj_in = shapes[UNET + "middle_block.1.proj_in.weight"]
    context = shapes[UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1]
    heads = tuple(c // HEAD_DIM for c in blocks) if family == "sd2" else SD1_UNET["attention_head_dim"]

    # VAE: encoder.down.{level}.block.{i}; the latent is post_quant_conv's input.
    vae_levels = len(_indices(shapes, VAE + r"encoder\.down\.(\d+)\."))
    vae_layers = len(_indices(shapes, VAE + r"encoder\.down\.0\.block\.(\d+)\."))
    vae_blocks = [shapes[f"{VAE}encoder.down.{i}.block.{vae_layers - 1}.conv2.weight"][0]
                  for i in range(vae_levels)]
    latent = shapes[VAE + "post_quant_conv.weight"][1]

    # Text encoder.
    if family == "sd2":
        vocab, width = shapes[OPEN_CLIP + "token_embedding.weight"]
        positions = shapes[OPEN_CLIP + "positional_embedding"][0]
        # SD 2.x takes the penultimate layer's output: the last resblock is in the file but unused.
        text_layers = len(_indices(shapes, OPEN_CLIP + r"transformer\.resblocks\.(\d+)\.")) - 1
        intermediate = shapes[OPEN_CLIP + "transformer.resblocks.0.mlp.c_fc.weight"][0]
    else:
        vocab, width = shapes[_text_key(shapes, "embeddings.token_embedding.weight")]
        positions = shapes[_text_key(shapes, "embeddings.position_embedding.weight")][0]
        prefix = _text_key(shapes, "embeddings.token_embedding.weight").rsplit("embeddings.", 1)[0]
        text_layers = len(_indices(shapes, re.escape(prefix) + r"encoder\.layers\.(\d+)\."))
        intermediate = shapes[f"{prefix}encoder.layers.0.mlp.fc1.weight"][0]
    if width != context:
        raise EdgediffError(f"the text encoder's width {width} differs from the UNet's cross-attention "
                            f"dimension {context}; the checkpoint mixes parts of different models")

    inpainting = in_channels == INPAINT_CHANNELS
    if prediction_type is None:
        # SD 2.x: the 768-v model, as diffusers assumes; SD 2 inpainting is the 512 epsilon model.
        v = "v_pred" in shapes or (family == "sd2" and not inpainting)
        prediction_type = "v_prediction" if v else "epsilon"
    elif prediction_type not in PREDICTION_TYPES:
        raise EdgediffError(f"unknown prediction type {prediction_type!r}; use epsilon or v_prediction")
    v768 = family == "sd2" and prediction_type == "v_prediction"
    return Detected(
        family=family, inpainting=inpainting, prediction_type=prediction_type,
        sample_size=SD2_UNET["sample_size"] if v768 else SD1_UNET["sample_size"],
        unet_in_channels=in_channels, unet_out_channels=shapes[UNET + "out.2.weight"][0],
        unet_block_out_channels=tuple(blocks), unet_layers_per_block=layers,
        unet_down_block_types=tuple(down), unet_up_block_types=tuple(up),
        cross_attention_dim=context, use_linear_projection=len(proj_in) == 2, attention_head_dim=heads,
        vae_block_out_channels=tuple(vae_blocks), vae_layers_per_block=vae_layers, vae_latent_channels=latent,
        text_width=width, text_layers=text_layers, text_heads=width // HEAD_DIM,
        text_intermediate=intermediate, text_vocab_size=vocab, text_max_positions=positions,
    )


def _reject_other_formats(shapes: dict) -> None:
    """Say what a file that is not an SD 1.x/2.x checkpoint looks like, rather than fail on a key."""
    keys = list(shapes)
    if not keys:
        raise EdgediffError("the checkpoint holds no tensors")
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise EdgediffError("this looks like an SDXL checkpoint (conditioner.embedders.* keys); edgediff "
                            "converts SD 1.x and 2.x checkpoints")
    if any(re.search(r"lora_(up|down|A|B)\b|^lora_", k) for k in keys):
        raise EdgediffError("this looks like a LoRA (lora_up/lora_down keys), which modifies a model rather "
                            "than being one; convert the base checkpoint it was trained for")
    if FIRST_CONV in shapes:
        return
    if any(k.startswith(UNET) for k in keys):
        raise EdgediffError(f"the checkpoint has {UNET}* tensors but no {FIRST_CONV}: not an SD 1.x/2.x "
                            "UNet (SD3, Flux and others are not supported)")
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


def _text_key(shapes: dict, name: str) -> str | None:
    """SD 1.x files name CLIP's tensors `...transformer.text_model.X` (or, from old transformers, without
    the `text_model.`)."""
    for key in (CLIP_HF + "text_model." + name, CLIP_HF + name):
        if key in shapes:
            return key
    return None


# ---------------------------------------------------------------------------------------------------
# 3. Writing the diffusers folder


def to_diffusers(path: str | Path, out_dir: str | Path, config: Path | None = None,
                 prediction_type: str | None = None, *, force: bool = False) -> Path:
    """Convert the checkpoint at `path` into a diffusers folder at `out_dir`; returns `out_dir`.

    `config`: a diffusers model folder whose unet/, vae/ and text_encoder/config.json (and, where it has
    them, tokenizer/ and scheduler/) describe the checkpoint, for models that the standard SD 1.x/2.x
    configs do not fit. `prediction_type` ("epsilon" or "v_prediction") overrides the detected one."""
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
    if config is not None:
        unet, vae, text = (_read_json(config / c / "config.json") for c in COMPONENTS)
    else:
        _check_conventions(path, found)
        unet, vae, text = found.unet_config(), found.vae_config(), found.text_config()
    scheduler = found.scheduler_config()
    if config is not None and (config / "scheduler" / "scheduler_config.json").is_file():
        # The config folder's scheduler is the model's own; its prediction type yields only to the
        # caller's and to the checkpoint's `v_pred` marker.
        scheduler = _read_json(config / "scheduler" / "scheduler_config.json")
        if prediction_type is None and "v_pred" not in state:
            scheduler.setdefault("prediction_type", "epsilon")
        else:
            scheduler["prediction_type"] = found.prediction_type
    log.info("%s: %s%s, %s", path.name, found.family, " inpainting" if found.inpainting else "",
             scheduler["prediction_type"])

    with atomic_folder(out) as tmp:
        try:
            _write_unet(tmp / "unet", state, unet)
            _write_vae(tmp / "vae", state, vae)
            _write_text_encoder(tmp / "text_encoder", state, text, found.family)
        except EdgediffError as e:
            raise EdgediffError(f"{path}: {e}") from None
        del state
        if config is not None and (config / "tokenizer").is_dir():
            shutil.copytree(config / "tokenizer", tmp / "tokenizer")
        elif text["vocab_size"] != VOCAB_SIZE:
            raise EdgediffError(f"{path}: the text encoder has {text['vocab_size']} tokens, not CLIP's "
                                f"{VOCAB_SIZE}; give a config folder that has its tokenizer/")
        else:
            write_clip_tokenizer(tmp / "tokenizer", pad_token=PAD_SD2 if found.family == "sd2" else PAD_SD1)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
        (tmp / "model_index.json").write_text(json.dumps(_model_index(found, scheduler), indent=2))
    return out


def _check_conventions(path: Path, found: Detected) -> None:
    """Heads are the one thing shapes do not show; the standard configs assume SD's head size."""
    widths = [found.text_width] + (list(found.unet_block_out_channels) if found.family == "sd2" else [])
    if any(w % HEAD_DIM for w in widths):
        raise EdgediffError(f"{path}: its widths {widths} are not multiples of SD's head size {HEAD_DIM}, so "
                            "the attention heads cannot be inferred; give the model's config folder")


def _write_unet(folder: Path, state: dict, config: dict) -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

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


def _write_text_encoder(folder: Path, state: dict, config: dict, family: str) -> None:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig.from_dict(config)
    text_config.architectures = ["CLIPTextModel"]
    model = _on_meta(lambda: CLIPTextModel(text_config))
    if family == "sd2":
        weights = convert_open_clip_checkpoint(model, state, prefix=OPEN_CLIP)
    else:
        weights = convert_ldm_clip_checkpoint(state)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel's names
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    expected = model.state_dict()
    # In the file but not in the model, and rightly so: the position ids (a buffer transformers no
    # longer saves), open_clip's projection to the joint space, and SD 2.x's unused last layer.
    layer = re.compile(r"encoder\.layers\.(\d+)\.")
    weights = {k: v for k, v in weights.items() if k in expected or not (
        k.endswith("position_ids") or k == "text_projection.weight"
        or ((m := layer.match(k)) and int(m.group(1)) >= text_config.num_hidden_layers))}
    _save(folder, "model.safetensors", "text encoder", weights, expected)
    text_config.save_pretrained(folder)


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

    pipeline = "StableDiffusionInpaintPipeline" if found.inpainting else "StableDiffusionPipeline"
    none = [None, None]
    return {
        "_class_name": pipeline, "_diffusers_version": diffusers.__version__,
        "feature_extractor": none, "image_encoder": none, "requires_safety_checker": False,
        "safety_checker": none, "scheduler": ["diffusers", scheduler["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EdgediffError(f"{path} cannot be read: {_one_line(e)}") from None

