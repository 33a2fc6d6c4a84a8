"""Single-file checkpoints (CompVis/LDM and SDXL's SGM layouts) to diffusers folders, and the CLIP
vocabulary they need.

The tiny models go to the original layouts through tests/ldm_layout.py (our own mapping) and come back
through diffusers' conversion functions: equal tensors mean the two independent mappings agree.
Full-size SD 1.5 / 2.1 / SDXL shapes are checked on the meta device, so they cost no memory.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import regex
import torch
from diffusers import (AutoencoderKL, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                       StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from ldm_layout import folder_to_single_file, models_to_ldm, sdxl_models_to_ldm
from safetensors.torch import save_file
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,
                          CLIPTokenizerFast)

from edgediff.builtin.random_model import TinySpec, build_random_model
from edgediff.engine.clip_vocab import BPE_PATH, PAD_SD2, write_clip_tokenizer
from edgediff.engine.errors import EdgediffError
from edgediff.engine.tokenizer import ClipTokenizer
from edgediff.export import single_file as sf
from edgediff.export.single_file import detect, read_checkpoint, to_diffusers

COMPONENTS = ("unet", "vae", "text_encoder")
SDXL_COMPONENTS = COMPONENTS + ("text_encoder_2",)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """kind -> (diffusers folder, LDM single file) of the random tiny models."""
    root = tmp_path_factory.mktemp("single-file")
    cache = {}

    def get(kind: str):
        if kind not in cache:
            folder = build_random_model(root / kind, TinySpec(kind=kind, seed=1))
            cache[kind] = folder, folder_to_single_file(folder, root / f"{kind}.safetensors", kind == "sd2")
        return cache[kind]
    return get


def assert_same_weights(a, b, cast=lambda t: t, components=COMPONENTS) -> int:
    """Every parameter and buffer of two pipelines' networks equal (after `cast` of a's); returns how
    many were compared."""
    n = 0
    for name in components:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            want = cast(sa[k]) if sa[k].is_floating_point() else sa[k]
            assert want.dtype == sb[k].dtype and torch.equal(want, sb[k]), f"{name}.{k}"
        n += len(sa)
    return n


# ---------------------------------------------------------------------------------------------------
# (a) Round trips


@pytest.mark.parametrize("kind", ["sd1", "sd2", "inpaint"])
def test_round_trip_with_config_folder_gives_the_same_tensors(tiny_files, tmp_path, kind):
    folder, single = tiny_files(kind)
    out = to_diffusers(single, tmp_path / "out", config=folder)
    cls = StableDiffusionInpaintPipeline if kind == "inpaint" else StableDiffusionPipeline
    a, b = cls.from_pretrained(folder), cls.from_pretrained(out)
    assert type(b) is cls
    assert assert_same_weights(a, b) > 400  # tensors in the tiny UNet, VAE and text encoder
    assert type(b.scheduler) is type(a.scheduler)
    assert b.scheduler.config.prediction_type == ("v_prediction" if kind == "sd2" else "epsilon")
    assert b.tokenizer("a red circle").input_ids == a.tokenizer("a red circle").input_ids


def convention_models(kind: str):
    """Small random networks that follow the family conventions detect() assumes (SD 1.x: 8 heads;
    SD 2.x: head dim 64; CLIP: head dim 64, 49408 tokens), so they convert with no config folder."""
    sd2 = kind == "sd2"
    torch.manual_seed(0)
    c = (64, 128) if sd2 else (32, 64)
    unet = UNet2DConditionModel(
        sample_size=96 if sd2 else 64, in_channels=9 if kind == "inpaint" else 4, block_out_channels=c,
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        attention_head_dim=(1, 2) if sd2 else 8, use_linear_projection=sd2, upcast_attention=sd2)
    vae = AutoencoderKL(block_out_channels=(32,) * 4, layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=2, num_attention_heads=1,
                                        hidden_act="gelu" if sd2 else "quick_gelu"))
    return unet, vae, text


@pytest.mark.parametrize("kind", ["sd1", "sd2", "inpaint"])
def test_round_trip_without_config_uses_the_family_conventions(tmp_path, kind):
    unet, vae, text = convention_models(kind)
    single = tmp_path / "model.safetensors"
    ldm = models_to_ldm(unet, vae, text, open_clip=kind == "sd2")
    save_file({k: t.contiguous() for k, t in ldm.items()}, str(single))
    out = to_diffusers(single, tmp_path / "out")
    cls = StableDiffusionInpaintPipeline if kind == "inpaint" else StableDiffusionPipeline
    b = cls.from_pretrained(out)
    assert_same_weights(SimpleNamespace(unet=unet, vae=vae, text_encoder=text), b)
    for key in ("block_out_channels", "attention_head_dim", "use_linear_projection", "sample_size",
                "in_channels"):
        want = unet.config[key]
        assert b.unet.config[key] == (list(want) if isinstance(want, tuple) else want), key
    assert b.text_encoder.config.num_hidden_layers == 2  # the file's third (skipped) SD 2.x layer is dropped
    assert len(b.tokenizer) == 49408
    assert b.tokenizer.pad_token == (PAD_SD2 if kind == "sd2" else "<|endoftext|>")
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == ("DDIMScheduler" if kind == "sd2" else "PNDMScheduler")
    assert scheduler["prediction_type"] == ("v_prediction" if kind == "sd2" else "epsilon")
    assert scheduler["steps_offset"] == 1 and scheduler["set_alpha_to_one"] is False


def test_fp16_ckpt_is_read_with_weights_only_and_written_as_fp32(tiny_files, tmp_path):
    folder, single = tiny_files("sd1")
    ckpt = tmp_path / "model.ckpt"
    half = {k: t.half() if t.is_floating_point() else t for k, t in read_checkpoint(single).items()}
    torch.save({"state_dict": half, "global_step": 470000, "epoch": 6}, ckpt)  # as Lightning saves them
    out = to_diffusers(ckpt, tmp_path / "out", config=folder, prediction_type="v_prediction")
    a, b = StableDiffusionPipeline.from_pretrained(folder), StableDiffusionPipeline.from_pretrained(out)
    assert_same_weights(a, b, cast=lambda t: t.half().float())
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"  # the caller's, over the config folder's


SDXL_PIPELINES = {"sdxl": StableDiffusionXLPipeline, "sdxl-inpaint": StableDiffusionXLInpaintPipeline}


@pytest.mark.parametrize("kind", list(SDXL_PIPELINES))
def test_sdxl_round_trip_with_config_folder_gives_the_same_tensors(tiny_files, tmp_path, kind):
    folder, single = tiny_files(kind)
    out = to_diffusers(single, tmp_path / "out", config=folder)
    cls = SDXL_PIPELINES[kind]
    a, b = cls.from_pretrained(folder), cls.from_pretrained(out)
    assert type(b) is cls
    assert assert_same_weights(a, b, components=SDXL_COMPONENTS) > 500  # tensors in the four tiny networks
    assert type(b.scheduler) is type(a.scheduler) and b.scheduler.config.prediction_type == "epsilon"
    for tokenizer in ("tokenizer", "tokenizer_2"):
        ids = [getattr(p, tokenizer)("a red circle").input_ids for p in (a, b)]
        assert ids[0] == ids[1], tokenizer
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == cls.__name__ and index["force_zeros_for_empty_prompt"] is True
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index.get("requires_aesthetics_score") == (False if kind == "sdxl-inpaint" else None)


def sdxl_convention_models():
    """Small random SDXL networks that follow SDXL's conventions (head dim 64 everywhere, CLIP's 49408
    tokens), with two text encoders of different widths and a projection of a third width, so that
    detect() has to tell them apart."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(64, 128), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), cross_attention_dim=64 + 128, attention_head_dim=(1, 2),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 96)
    vae = AutoencoderKL(block_out_channels=(32,) * 4, layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025)
    common = dict(vocab_size=49408, intermediate_size=96, num_hidden_layers=3, layer_norm_eps=1e-5)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=64, num_attention_heads=1, hidden_act="quick_gelu",
                                        **common))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=128, num_attention_heads=2,
                                                        projection_dim=96, hidden_act="gelu", **common))
    return unet, vae, text, text_2


def test_sdxl_round_trip_without_config_uses_the_sdxl_conventions(tmp_path):
    unet, vae, text, text_2 = sdxl_convention_models()
    single = tmp_path / "model.safetensors"
    ldm = sdxl_models_to_ldm(unet, vae, text, text_2)
    save_file({k: t.contiguous() for k, t in ldm.items()}, str(single))
    out = to_diffusers(single, tmp_path / "out")
    b = StableDiffusionXLPipeline.from_pretrained(out)
    want = SimpleNamespace(unet=unet, vae=vae, text_encoder=text, text_encoder_2=text_2)
    assert_same_weights(want, b, components=SDXL_COMPONENTS)
    for key in ("block_out_channels", "attention_head_dim", "transformer_layers_per_block",
                "addition_time_embed_dim", "projection_class_embeddings_input_dim", "cross_attention_dim"):
        want = unet.config[key]
        assert b.unet.config[key] == (list(want) if isinstance(want, tuple) else want), key
    assert b.unet.config.sample_size == 128 and b.unet.config.addition_embed_type == "text_time"
    assert (b.vae.config.scaling_factor, b.vae.config.force_upcast) == (0.13025, True)
    # SDXL reads the penultimate state and the pooled output: all three layers stay, and the projection
    assert b.text_encoder_2.config.num_hidden_layers == 3 and b.text_encoder_2.config.projection_dim == 96
    assert (b.text_encoder.config.hidden_act, b.text_encoder_2.config.hidden_act) == ("quick_gelu", "gelu")
    assert (b.tokenizer.pad_token, b.tokenizer_2.pad_token) == ("<|endoftext|>", PAD_SD2)
    assert len(b.tokenizer) == len(b.tokenizer_2) == 49408
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "EulerDiscreteScheduler" and scheduler["prediction_type"] == "epsilon"
    assert scheduler["timestep_spacing"] == "leading" and scheduler["steps_offset"] == 1


# ---------------------------------------------------------------------------------------------------
# (b) Detection on full-size shapes

# The numbers as stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1 ship them (*/config.json),
# written out here rather than read from the module, so that a wrong number there shows.
SD15 = dict(family="sd1", inpainting=False, prediction_type="epsilon", sample_size=64, unet_in_channels=4,
            unet_out_channels=4, unet_block_out_channels=(320, 640, 1280, 1280), unet_layers_per_block=2,
            unet_down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            unet_up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, use_linear_projection=False, attention_head_dim=8,
            vae_block_out_channels=(128, 256, 512, 512), vae_layers_per_block=2, vae_latent_channels=4,
            text_width=768, text_layers=12, text_heads=12, text_intermediate=3072, text_vocab_size=49408,
            text_max_positions=77)
SD21 = {**SD15, "family": "sd2", "prediction_type": "v_prediction", "sample_size": 96,
        "cross_attention_dim": 1024, "use_linear_projection": True, "attention_head_dim": (5, 10, 20, 20),
        "text_width": 1024, "text_layers": 23, "text_heads": 16, "text_intermediate": 4096}
SD15_INPAINT = {**SD15, "inpainting": True, "unet_in_channels": 9}
# stabilityai/stable-diffusion-2-inpainting is the 512 px epsilon model, as diffusers also assumes
SD2_INPAINT = {**SD21, "inpainting": True, "unet_in_channels": 9, "prediction_type": "epsilon",
               "sample_size": 64}
FULL_SIZE = {"sd15": SD15, "sd21": SD21, "sd15-inpainting": SD15_INPAINT, "sd2-inpainting": SD2_INPAINT}


def meta_models(family: str, in_channels: int = 4):
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config({**(sf.SD2_UNET if family == "sd2" else sf.SD1_UNET),
                                                 "in_channels": in_channels})
        vae = AutoencoderKL.from_config(sf.SD_VAE)
        text = CLIPTextModel(CLIPTextConfig.from_dict(sf.SD2_TEXT if family == "sd2" else sf.SD1_TEXT))
    return unet, vae, text


def full_size_shapes(name: str) -> dict:
    want = FULL_SIZE[name]
    models = meta_models(want["family"], want["unet_in_channels"])
    ldm = models_to_ldm(*models, open_clip=want["family"] == "sd2")
    return {k: tuple(t.shape) for k, t in ldm.items()}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_detect_full_size_checkpoints(name):
    shapes = full_size_shapes(name)
    assert len(shapes) > 1000  # 1,1xx tensors in a real SD file
    found = detect(shapes)
    assert {k: getattr(found, k) for k in FULL_SIZE[name]} == FULL_SIZE[name]
    # The configs detect() writes rebuild exactly the architecture that gave the shapes.
    with torch.device("meta"):
        rebuilt = models_to_ldm(UNet2DConditionModel.from_config(found.unet_config()),
                                AutoencoderKL.from_config(found.vae_config()),
                                CLIPTextModel(CLIPTextConfig.from_dict(found.text_config())),
                                open_clip=found.family == "sd2")
    assert {k: tuple(t.shape) for k, t in rebuilt.items()} == shapes


def test_prediction_type_from_v_pred_key_or_caller():
    sd15, sd21 = full_size_shapes("sd15"), full_size_shapes("sd21")
    assert detect({**sd15, "v_pred": ()}).prediction_type == "v_prediction"
    assert detect({**sd15, "v_pred": ()}).sample_size == 64  # v-prediction SD 1.x stays at 512 px
    base = detect(sd21, prediction_type="epsilon")  # the 512-base SD 2.x checkpoints
    assert (base.prediction_type, base.sample_size) == ("epsilon", 64)
    with pytest.raises(EdgediffError, match="unknown prediction type"):
        detect(sd15, prediction_type="sample")


# stabilityai/stable-diffusion-xl-base-1.0 and diffusers/stable-diffusion-xl-1.0-inpainting-0.1
SDXL_BASE = dict(
    family="sdxl", inpainting=False, prediction_type="epsilon", sample_size=128, unet_in_channels=4,
    unet_out_channels=4, unet_block_out_channels=(320, 640, 1280), unet_layers_per_block=2,
    unet_down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    unet_up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048, use_linear_projection=True, attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), addition_time_embed_dim=256,
    vae_block_out_channels=(128, 256, 512, 512), vae_layers_per_block=2, vae_latent_channels=4,
    text_width=768, text_layers=12, text_heads=12, text_intermediate=3072, text_vocab_size=49408,
    text_max_positions=77,
    text_2=sf.TextTower(width=1280, layers=32, heads=20, intermediate=5120, vocab_size=49408,
                        max_positions=77, projection_dim=1280))
FULL_SIZE_SDXL = {"sdxl-base": SDXL_BASE,
                  "sdxl-inpainting": {**SDXL_BASE, "inpainting": True, "unet_in_channels": 9}}


def sdxl_meta_shapes(in_channels: int = 4) -> dict:
    with torch.device("meta"):
        models = (UNet2DConditionModel.from_config({**sf.SDXL_UNET, "in_channels": in_channels}),
                  AutoencoderKL.from_config(sf.SDXL_VAE),
                  CLIPTextModel(CLIPTextConfig.from_dict(sf.SDXL_TEXT)),
                  CLIPTextModelWithProjection(CLIPTextConfig.from_dict(sf.SDXL_TEXT_2)))
    return {k: tuple(t.shape) for k, t in sdxl_models_to_ldm(*models).items()}


@pytest.mark.parametrize("name", list(FULL_SIZE_SDXL))
def test_detect_full_size_sdxl_checkpoints(name):
    want = FULL_SIZE_SDXL[name]
    shapes = sdxl_meta_shapes(want["unet_in_channels"])
    assert len(shapes) > 2500  # 2,5xx tensors in a real SDXL file
    found = detect(shapes)
    assert {k: getattr(found, k) for k in want} == want
    unet = found.unet_config()
    assert (unet["projection_class_embeddings_input_dim"], unet["addition_embed_type"]) == (2816, "text_time")
    assert found.vae_config()["scaling_factor"] == 0.13025 and found.vae_config()["sample_size"] == 1024
    assert found.text_2_config()["architectures"] == ["CLIPTextModelWithProjection"]
    # The configs detect() writes rebuild exactly the architecture that gave the shapes.
    with torch.device("meta"):
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(found.text_2_config()))
        rebuilt = sdxl_models_to_ldm(UNet2DConditionModel.from_config(unet),
                                     AutoencoderKL.from_config(found.vae_config()),
                                     CLIPTextModel(CLIPTextConfig.from_dict(found.text_config())), text_2)
    assert {k: tuple(t.shape) for k, t in rebuilt.items()} == shapes
    assert detect({**shapes, "v_pred": ()}).prediction_type == "v_prediction"  # the v-prediction fine-tunes


# ---------------------------------------------------------------------------------------------------
# (c) Errors: one line each, and nothing left behind


DAMAGED = ("truncated", "bad-json", "header-too-long", "tiny", "data-longer")


class Callback:  # stands for the pytorch_lightning objects some .ckpt files pickle
    pass


def broken_files(tmp: Path, single: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the message must say)."""
    data = single.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert n < len(data) // 2  # so that cutting the file in half keeps the header whole
    damaged = {
        "truncated": (data[:len(data) // 2], "describes .* bytes of tensor data but the file holds"),
        "bad-json": (data[:8] + b"#" + data[9:], "header is not valid safetensors JSON"),
        "header-too-long": ((len(data) * 2).to_bytes(8, "little") + data[8:],
                            "header says it is .* bytes long"),
        "tiny": (data[:5], "too short"),
        "data-longer": (data + b"\0" * 16, "describes .* but the file holds"),
    }
    out = {}
    for name, (raw, message) in damaged.items():
        (tmp / f"{name}.safetensors").write_bytes(raw)
        out[name] = tmp / f"{name}.safetensors", message

    def st(name, tensors, message):
        save_file(tensors, str(tmp / f"{name}.safetensors"))
        out[name] = tmp / f"{name}.safetensors", message

    x = torch.zeros(4, 4)
    st("unrelated", {"fc.weight": x, "fc.bias": x[0].clone(), "emb": x.clone()},
       r"found 3 tensors, none of model\.diffusion_model\.\*")
    lora = "lora_unet_down_blocks_0_attentions_0_proj_in"
    st("lora", {f"{lora}.lora_down.weight": x, f"{lora}.lora_up.weight": x.clone()}, "looks like a LoRA")
    st("sdxl", {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": x,
                "model.diffusion_model.input_blocks.0.0.weight": x.clone()}, "looks like an SDXL checkpoint")
    st("vae-only", {"first_stage_model.encoder.conv_in.weight": x,
                    "first_stage_model.decoder.conv_out.weight": x.clone()}, "holds only a VAE")
    st("diffusers-unet", {"down_blocks.0.resnets.0.conv1.weight": x, "conv_in.weight": x.clone()},
       "diffusers-format weights file")
    ckpt = tmp / "pickled-object.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": x}, "callbacks": Callback()}, ckpt)
    out["pickled-object"] = ckpt, "needs unrestricted unpickling .*refuses because it can run code"
    (tmp / "model.bin").write_bytes(b"\0" * 16)
    out["suffix"] = tmp / "model.bin", "unknown checkpoint type '.bin'"
    return out


def test_bad_files_are_one_line_errors_and_leave_no_output(tiny_files, tmp_path):
    folder, single = tiny_files("sd1")
    inputs = tmp_path / "in"
    inputs.mkdir()
    outputs = tmp_path / "out"
    outputs.mkdir()
    cases = broken_files(inputs, single)
    for name, (path, message) in cases.items():
        with pytest.raises(EdgediffError, match=message) as e:
            to_diffusers(path, outputs / name)
        text = str(e.value)
        assert "\n" not in text and str(path) in text, (name, text)
        assert ("re-download it" in text) == (path.suffix == ".safetensors" and name in DAMAGED), (name, text)
    # A failure while writing (the sd1 file against the sd2 configs) removes its temporary folder too.
    with pytest.raises(EdgediffError, match="does not fit its config") as e:
        to_diffusers(single, outputs / "mismatch", config=tiny_files("sd2")[0])
    assert "\n" not in str(e.value) and str(single) in str(e.value)
    # The tiny models' 4 heads of 8 channels are not SD's convention: without their configs, no guess.
    with pytest.raises(EdgediffError, match="attention heads cannot be inferred; give the model's config"):
        to_diffusers(single, outputs / "no-config")
    assert list(outputs.iterdir()) == []


def test_existing_output_is_kept_unless_forced(tiny_files, tmp_path):
    folder, single = tiny_files("sd1")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(EdgediffError, match="already exists"):
        to_diffusers(single, out, config=folder)
    assert (out / "keep.txt").read_text() == "mine"
    to_diffusers(single, out, config=folder, force=True)
    assert not (out / "keep.txt").exists() and (out / "model_index.json").is_file()


def test_sdxl_refiner_is_refused_in_one_line_and_nothing_is_written(tiny_files, tmp_path):
    folder, single = tiny_files("sdxl")
    # The refiner's shape of file: bigG as the only text encoder, under embedders.0.model.
    refiner = {k.replace(sf.SDXL_OPEN_CLIP, sf.REFINER_OPEN_CLIP): t
               for k, t in read_checkpoint(single).items() if not k.startswith(sf.SDXL_CLIP)}
    path = tmp_path / "sd_xl_refiner_1.0.safetensors"
    save_file(refiner, str(path))
    out = tmp_path / "out"
    with pytest.raises(EdgediffError, match="SDXL refiner checkpoint.*runs the SDXL base model") as e:
        to_diffusers(path, out, config=folder)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_incomplete_and_unknown_families_are_one_line_errors(tiny_files, tmp_path):
    _, sdxl = tiny_files("sdxl")
    sd1_folder, sd1 = tiny_files("sd1")
    state, x = read_checkpoint(sdxl), torch.zeros(4, 4)
    unet_only = {k: t for k, t in read_checkpoint(sd1).items() if not k.startswith("cond_stage_model.")}
    cases = {
        "no-bigg": ({k: t for k, t in state.items() if not k.startswith(sf.SDXL_OPEN_CLIP)},
                    r"looks like an SDXL checkpoint .*lacks its OpenCLIP ViT-bigG text encoder"),
        "no-label-emb": ({k: t for k, t in state.items() if "label_emb" not in k},
                         r"lacks model\.diffusion_model\.label_emb\.0\.0\.weight"),
        "no-text-encoder": (unet_only, "has a UNet but no text encoder"),
        "sd3": ({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": x[0],
                 "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": x[1].clone()},
                "not an SD 1.x, 2.x or SDXL UNet"),
        "flux": ({"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": x[0]},
                 "not an SD 1.x, 2.x or SDXL UNet"),
    }
    outputs = tmp_path / "out"
    outputs.mkdir()
    for name, (tensors, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(path))
        with pytest.raises(EdgediffError, match=message) as e:
            to_diffusers(path, outputs / name)
        assert "\n" not in str(e.value) and str(path) in str(e.value), name
    # The tiny SDXL's widths (32, 48, 32, 64) are not multiples of SDXL's head size 64, and an SD 1.x
    # config folder has no second text encoder: both need the model's own config folder.
    with pytest.raises(EdgediffError, match="attention heads cannot be inferred; give the model's config"):
        to_diffusers(sdxl, outputs / "no-config")
    with pytest.raises(EdgediffError, match="has no text_encoder_2/config.json, which an SDXL checkpoint"):
        to_diffusers(sdxl, outputs / "sd1-config", config=sd1_folder)
    assert list(outputs.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# The CLIP vocabulary

PROMPTS = ["a photo of a cat", "An astronaut riding a horse on Mars, 4k!!  high-quality;",
           "it's a cat's toy, isn't it", "héllo wörld 123 ⚡", "red " * 100]


def reference_ids(text: str) -> list[int]:
    """openai/CLIP simple_tokenizer.py's BPE, written out again (without ftfy: the prompts are clean)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_encoder = dict(zip(bs, map(chr, cs)))
    with gzip.open(BPE_PATH) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(byte_encoder.values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    encoder, ranks = {t: i for i, t in enumerate(vocab)}, {m: i for i, m in enumerate(merges)}

    def bpe(token: str) -> list[str]:
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    pattern = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE)
    ids = []
    for token in regex.findall(pattern, " ".join(text.split()).lower()):
        ids += [encoder[t] for t in bpe("".join(byte_encoder[b] for b in token.encode("utf-8")))]
    return [49406] + ids + [49407]


def test_clip_tokenizer_folder_matches_transformers_edgediff_and_clip(tmp_path):
    write_clip_tokenizer(tmp_path)
    slow, fast = CLIPTokenizer.from_pretrained(tmp_path), CLIPTokenizerFast.from_pretrained(tmp_path)
    ours = ClipTokenizer.from_folder(tmp_path)
    assert len(slow) == len(fast) == 49408
    assert slow("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's ids
    assert (slow.bos_token_id, slow.eos_token_id, slow.pad_token_id, slow.model_max_length) == (49406, 49407,
                                                                                                  49407, 77)
    want = slow(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    assert fast(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids == want
    assert ours.encode(PROMPTS).ids.tolist() == want
    for prompt, row in zip(PROMPTS, want):
        ref = reference_ids(prompt)
        ref = ref[:76] + [49407] if len(ref) > 77 else ref
        assert row[:len(ref)] == ref, prompt


def test_sd2_tokenizer_pads_with_exclamation_mark(tmp_path):
    write_clip_tokenizer(tmp_path, pad_token=PAD_SD2)
    assert CLIPTokenizer.from_pretrained(tmp_path).pad_token_id == 0
    ids = ClipTokenizer.from_folder(tmp_path).encode(["a cat"]).ids[0].tolist()
    assert ids[:5] == [49406, 320, 2368, 49407, 0]
