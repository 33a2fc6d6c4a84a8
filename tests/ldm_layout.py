"""Diffusers state dicts back to the original single-file layouts, for the conversion tests: CompVis/LDM
(SD 1.x/2.x) and Stability's SGM (SDXL).

Written from the original sources' module names (ldm/modules/diffusionmodules/openaimodel.py and model.py,
sgm/modules/diffusionmodules/openaimodel.py, sgm/modules/encoders/modules.py's GeneralConditioner,
open_clip's TextTransformer), not from diffusers' converter, so that converting our output with
diffusers' mapping and getting the original tensors back checks two independent mappings against
each other. Works on meta tensors too, so full-size SD and SDXL shapes cost no memory.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_HF, OPEN_CLIP = "cond_stage_model.transformer.text_model.", "cond_stage_model.model."
# SGM's GeneralConditioner keeps its embedders in a ModuleList: SDXL base's 0 is FrozenCLIPEmbedder
# (a transformers CLIPTextModel as `transformer`), 1 is FrozenOpenCLIPEmbedder2 (open_clip as `model`).
SDXL_CLIP = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP = "conditioner.embedders.1.model."

# openaimodel.ResBlock: in_layers = [GroupNorm, SiLU, conv], emb_layers = [SiLU, Linear],
# out_layers = [GroupNorm, SiLU, Dropout, conv], skip_connection
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            # SGM: label_emb = Sequential(Sequential(Linear(adm_in_channels, time_embed_dim), SiLU, Linear))
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
# model.AttnBlock: norm, then q, k, v and proj_out as 1x1 convolutions
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_to_ldm(sd: dict, layers_per_block: int) -> dict:
    n = layers_per_block + 1  # LDM blocks per level: the resnets, then a down/upsampling slot
    attention_levels = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, t in sd.items():
        parts = key.split(".")
        top = next((name for name in UNET_TOP if key.startswith(name + ".")), None)
        if top:
            new = UNET_TOP[top] + key[len(top):]
        elif parts[0] in ("down_blocks", "up_blocks"):
            b, kind, i, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            down = parts[0] == "down_blocks"
            blocks, first = ("input_blocks", 1 + b * n) if down else ("output_blocks", b * n)
            if kind == "resnets":
                new = f"{blocks}.{first + i}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"{blocks}.{first + i}.1.{'.'.join(rest)}"
            elif kind == "downsamplers":  # the level's last input block; Downsample names its conv `op`
                new = f"input_blocks.{first + layers_per_block}.0.op.{rest[-1]}"
            else:  # Upsample follows the resnet, and the attention where the level has one
                slot = 2 if b in attention_levels else 1
                new = f"output_blocks.{first + layers_per_block}.{slot}.conv.{rest[-1]}"
        elif parts[0] == "mid_block":  # [ResBlock, SpatialTransformer, ResBlock]
            i, rest = int(parts[2]), parts[3:]
            new = (f"middle_block.{2 * i}.{_resnet(rest)}" if parts[1] == "resnets"
                   else f"middle_block.1.{'.'.join(rest)}")
        else:
            raise KeyError(f"unmapped UNet key {key}")
        out[UNET + new] = t
    return out


def _resnet(rest: list[str]) -> str:
    return f"{UNET_RESNET[rest[0]]}.{'.'.join(rest[1:])}"


def vae_to_ldm(sd: dict, levels: int) -> dict:
    out = {}
    block = re.compile(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\."
                       r"(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)")
    for key, t in sd.items():
        new = key.replace("conv_norm_out", "norm_out")
        if m := block.match(key):
            side, way, i, kind, j, rest = m.groups()
            level = int(i) if way == "down" else levels - 1 - int(i)  # LDM's decoder counts from the bottom
            if kind == "resnets":
                new = f"{side}.{way}.{level}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                new = f"{side}.{way}.{level}.{way}sample.{rest}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3)}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key):
            new = f"{m.group(1)}.mid.attn_1.{VAE_ATTENTION[m.group(2)]}.{m.group(3)}"
            if t.ndim == 2:
                t = t[:, :, None, None]
        out[VAE + new] = t
    return out


def clip_to_ldm(sd: dict, prefix: str = CLIP_HF) -> dict:
    """SD 1.x and SDXL's first encoder: transformers' CLIPTextModel as LDM's and SGM's FrozenCLIPEmbedder
    saved it, position ids included."""
    out = {prefix + k.removeprefix("text_model."): t for k, t in sd.items()}
    positions = sd[_find(sd, "embeddings.position_embedding.weight")].shape[0]
    out[prefix + "embeddings.position_ids"] = torch.arange(positions, device=_device(sd))[None]
    return out


def open_clip_to_ldm(sd: dict, prefix: str = OPEN_CLIP, skipped_layer: bool = True) -> dict:
    """open_clip's TextTransformer (q, k, v fused into `in_proj`) and its joint-space projection, stored
    (width, projection) because open_clip computes `x @ text_projection`. SD 2.x (`skipped_layer`): with
    the last resblock that SD 2.x skips (the real files have 24, the diffusers model 23) and a projection
    the model does not have; SDXL's bigG: every layer, and the model's own projection."""
    projection = sd.get("text_projection.weight")  # CLIPTextModelWithProjection's nn.Linear: (proj, width)
    sd = {k.removeprefix("text_model."): t for k, t in sd.items()}
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"]}
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    for i in range(layers + skipped_layer):
        src = f"encoder.layers.{min(i, layers - 1)}."
        dst = f"transformer.resblocks.{i}."
        # the skipped last layer: a copy of the one before (a copy: safetensors refuses shared memory)
        get = (lambda k: sd[src + k]) if i < layers else (lambda k: sd[src + k].clone())
        for p in ("weight", "bias"):
            out[dst + f"attn.in_proj_{p}"] = torch.cat([get(f"self_attn.{x}_proj.{p}") for x in "qkv"])
            out[dst + f"attn.out_proj.{p}"] = get(f"self_attn.out_proj.{p}")
            out[dst + f"ln_1.{p}"] = get(f"layer_norm1.{p}")
            out[dst + f"ln_2.{p}"] = get(f"layer_norm2.{p}")
            out[dst + f"mlp.c_fc.{p}"] = get(f"mlp.fc1.{p}")
            out[dst + f"mlp.c_proj.{p}"] = get(f"mlp.fc2.{p}")
    width = out["token_embedding.weight"].shape[1]
    out["text_projection"] = projection.T if projection is not None else torch.eye(width, device=_device(sd))
    out["logit_scale"] = torch.tensor(4.6052, device=_device(sd))  # log(100), CLIP's trained temperature
    return {prefix + k: t for k, t in out.items()}


def _find(sd: dict, name: str) -> str:
    return next(k for k in sd if k.endswith(name))


def _device(sd: dict) -> torch.device:
    return next(iter(sd.values())).device


def models_to_ldm(unet, vae, text_encoder, open_clip: bool) -> dict:
    """One LDM state dict from the three models (real, or on the meta device)."""
    text = open_clip_to_ldm if open_clip else clip_to_ldm
    return {**_networks_to_ldm(unet, vae), **text(text_encoder.state_dict())}


def sdxl_models_to_ldm(unet, vae, text_encoder, text_encoder_2) -> dict:
    """One SGM state dict (SDXL base or inpainting) from the four models (real, or on the meta device)."""
    return {**_networks_to_ldm(unet, vae), **clip_to_ldm(text_encoder.state_dict(), SDXL_CLIP),
            **open_clip_to_ldm(text_encoder_2.state_dict(), SDXL_OPEN_CLIP, skipped_layer=False)}


def _networks_to_ldm(unet, vae) -> dict:
    return {**unet_to_ldm(unet.state_dict(), unet.config.layers_per_block),
            **vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels))}


def folder_to_single_file(folder: Path, path: Path, open_clip: bool = False) -> Path:
    """Write a diffusers model folder as one LDM-layout .safetensors file (SGM's for an SDXL folder,
    recognised by its text_encoder_2/; `open_clip` says which SD 1.x/2.x layout)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    text = CLIPTextModel.from_pretrained(folder / "text_encoder")
    if (folder / "text_encoder_2").is_dir():
        text_2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
        sd = sdxl_models_to_ldm(unet, vae, text, text_2)
    else:
        sd = models_to_ldm(unet, vae, text, open_clip)
    save_file({k: t.contiguous() for k, t in sd.items()}, str(path))
    return path
