"""SDXL on exported models against diffusers' StableDiffusionXL pipelines (torch, fp32, CPU): same weights,
same latents, same random draws.

The tiny SDXL models (builtin/random_model.py) have two text encoders of different widths, so a mix-up of
the encoders, of their penultimate and pooled outputs, or of the micro-conditioning changes shapes or
pictures. Done-when of issue 12: at least 40 dB; the tests hold MIN_PSNR, as tests/test_parity.py does.
"""

from __future__ import annotations

import contextlib
import shutil

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline,
                       StableDiffusionXLPipeline)
from pictures import centre_mask, scene

from edgediff import Pipeline
from edgediff.backends.base import Device
from edgediff.engine import noise
from edgediff.engine.errors import EdgediffError
from edgediff.engine.metrics import psnr
from edgediff.engine.plan import RUNGS, ComponentFacts, GiB, Request, _plan, make_plan

MIN_PSNR = 60.0
SCHEDULERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "ddim": (DDIMScheduler, {}),
}
PROMPT, NEGATIVE = "a red circle on a blue background", "blurry"
STEPS, SEED = 6, 7
SHAPE = (4, 8, 8)  # the tiny models' latents: 64x64 pictures
_pipes: dict = {}


def reference(tiny, kind: str, cls, scheduler: str = "euler"):
    key = (kind, cls)
    if key not in _pipes:
        pipe = cls.from_pretrained(tiny(kind)[0])
        pipe.set_progress_bar_config(disable=True)
        _pipes[key] = pipe, pipe.scheduler.config
    pipe, config = _pipes[key]
    sched_cls, extra = SCHEDULERS[scheduler]
    pipe.scheduler = sched_cls.from_config(config, **extra)
    return pipe


def ours(tiny, kind: str) -> Pipeline:
    key = ("ours", kind)
    if key not in _pipes:
        _pipes[key] = Pipeline.from_pretrained(tiny(kind)[1], backend="cpu")
    return _pipes[key]


@contextlib.contextmanager
def diffusers_draws(monkeypatch, *arrays, seed: int = SEED):
    """diffusers' random draws, in order: the given arrays (posterior samples, img2img noise), then for
    Euler a's steps edgediff's step noise of `seed`, step by step."""
    queue = [torch.from_numpy(a) for a in arrays]
    step = [0]

    def draw(shape, generator=None, device=None, dtype=None, layout=None):
        if queue:
            value = queue.pop(0)
        else:  # an ancestral step
            value = torch.from_numpy(noise.batch_noise([seed], noise.STEP, tuple(shape[1:]), step=step[0]))
            step[0] += 1
        assert tuple(value.shape) == tuple(shape), (value.shape, shape)
        return value.to(dtype=dtype or torch.float32)

    import diffusers.models.autoencoders.vae as vae_module
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as img2img_module
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint as inpaint_module
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ancestral_module

    for module in (vae_module, img2img_module, inpaint_module, ancestral_module):
        monkeypatch.setattr(module, "randn_tensor", draw)
    yield
    assert not queue, "diffusers drew fewer random tensors than prepared"


def both(tiny, monkeypatch, scheduler="euler", kind="sdxl", **kwargs):
    """(ours, diffusers') txt2img picture for the same arguments and initial latents."""
    latents = noise.batch_noise([SEED], noise.INITIAL, SHAPE)
    with diffusers_draws(monkeypatch):
        want = reference(tiny, kind, StableDiffusionXLPipeline, scheduler)(
            PROMPT, num_inference_steps=STEPS, latents=torch.from_numpy(latents), height=64, width=64,
            **kwargs).images[0]
    got = ours(tiny, kind)(PROMPT, num_inference_steps=STEPS, latents=latents, height=64, width=64, seed=SEED,
                           scheduler=scheduler, **kwargs).images[0]
    assert got.size == want.size == (64, 64)
    return got, want


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_txt2img_matches_diffusers(tiny, monkeypatch, scheduler):
    got, want = both(tiny, monkeypatch, scheduler, negative_prompt=NEGATIVE, guidance_scale=7.5)
    assert psnr(got, want) >= MIN_PSNR, f"{scheduler}: {psnr(got, want):.1f} dB"


@pytest.mark.parametrize("negative", [None, "", NEGATIVE])
def test_negative_prompts_match_diffusers(tiny, monkeypatch, negative):
    """No negative prompt: zero conditioning (the folder's force_zeros_for_empty_prompt). An empty one
    given explicitly is encoded, as diffusers does."""
    got, want = both(tiny, monkeypatch, negative_prompt=negative, guidance_scale=5.0)
    assert psnr(got, want) >= MIN_PSNR, f"negative {negative!r}: {psnr(got, want):.1f} dB"


def test_zero_and_encoded_empty_negatives_differ(tiny):
    """The parity above holds only if the two are told apart: they give different pictures."""
    pipe, latents = ours(tiny, "sdxl"), noise.batch_noise([SEED], noise.INITIAL, SHAPE)
    zero = pipe(PROMPT, num_inference_steps=3, latents=latents, seed=SEED).images[0]
    empty = pipe(PROMPT, negative_prompt="", num_inference_steps=3, latents=latents, seed=SEED).images[0]
    assert psnr(zero, empty) < 40


def test_second_prompts_match_diffusers(tiny, monkeypatch):
    got, want = both(tiny, monkeypatch, prompt_2="a blue square in the corner", negative_prompt=NEGATIVE,
                     negative_prompt_2="a green tree", guidance_scale=7.5)
    assert psnr(got, want) >= MIN_PSNR, f"{psnr(got, want):.1f} dB"
    same = ours(tiny, "sdxl")(PROMPT, num_inference_steps=STEPS, negative_prompt=NEGATIVE, seed=SEED,
                              latents=noise.batch_noise([SEED], noise.INITIAL, SHAPE)).images[0]
    assert psnr(got, same) < 40  # prompt_2 reached the second encoder


def test_micro_conditioning_matches_diffusers(tiny, monkeypatch):
    sizes = dict(original_size=(512, 384), crops_coords_top_left=(16, 32), target_size=(64, 64),
                 negative_original_size=(256, 256), negative_target_size=(128, 96))
    got, want = both(tiny, monkeypatch, negative_prompt=NEGATIVE, guidance_scale=7.5, **sizes)
    assert psnr(got, want) >= MIN_PSNR, f"{psnr(got, want):.1f} dB"
    plain, _ = both(tiny, monkeypatch, negative_prompt=NEGATIVE, guidance_scale=7.5)
    assert psnr(got, plain) < 40  # the sizes reached the UNet


@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_no_guidance_runs_the_conditional_pass_alone(tiny, monkeypatch, guidance):
    """Turbo and Lightning run at guidance 0 or 1: one UNet pass per step, at batch 1."""
    got, want = both(tiny, monkeypatch, negative_prompt=NEGATIVE, guidance_scale=guidance)
    assert psnr(got, want) >= MIN_PSNR, f"guidance {guidance}: {psnr(got, want):.1f} dB"
    pipe = ours(tiny, "sdxl")
    batches = []
    unet = pipe._session(pipe.model.family.unet)
    run = unet.run
    monkeypatch.setattr(unet, "run", lambda **kw: batches.append(kw["sample"].shape[0]) or run(**kw))
    result = pipe(PROMPT, num_inference_steps=2, guidance_scale=guidance, seed=SEED)
    assert batches == [1, 1] and result.plan.request.cfg is False


def test_img2img_matches_diffusers(tiny, monkeypatch):
    strength = 0.6
    posterior = noise.batch_noise([SEED], noise.POSTERIOR, SHAPE)
    initial = noise.batch_noise([SEED], noise.INITIAL, SHAPE)
    with diffusers_draws(monkeypatch, posterior, initial):
        want = reference(tiny, "sdxl", StableDiffusionXLImg2ImgPipeline)(
            PROMPT, image=scene(), strength=strength, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
            guidance_scale=7.5).images[0]
    got = ours(tiny, "sdxl")(PROMPT, image=scene(), strength=strength, negative_prompt=NEGATIVE,
                             num_inference_steps=STEPS, guidance_scale=7.5, seed=SEED, scheduler="euler").images[0]
    assert psnr(got, want) >= MIN_PSNR, f"{psnr(got, want):.1f} dB"


@pytest.mark.parametrize("kind", ["sdxl-inpaint", "sdxl"])
def test_inpainting_matches_diffusers(tiny, monkeypatch, kind):
    """The 9-channel SDXL inpainting UNet, and a plain SDXL model given a mask (the known region pasted
    back at each step's noise level)."""
    latents = noise.batch_noise([SEED], noise.INITIAL, SHAPE)
    masked = noise.batch_noise([SEED], noise.MASKED_POSTERIOR, SHAPE)
    # diffusers encodes the image for a 4-channel UNet, then the masked image for either kind
    draws = (masked,) if kind == "sdxl-inpaint" else (noise.batch_noise([SEED], noise.POSTERIOR, SHAPE), masked)
    with diffusers_draws(monkeypatch, *draws):
        want = reference(tiny, kind, StableDiffusionXLInpaintPipeline)(
            PROMPT, image=scene(), mask_image=centre_mask(), strength=1.0, num_inference_steps=STEPS,
            negative_prompt=NEGATIVE, guidance_scale=7.5, latents=torch.from_numpy(latents),
            height=64, width=64).images[0]
    got = ours(tiny, kind)(PROMPT, image=scene(), mask_image=centre_mask(), strength=1.0, seed=SEED,
                           negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
                           latents=latents, scheduler="euler").images[0]
    assert psnr(got, want) >= MIN_PSNR, f"{kind}: {psnr(got, want):.1f} dB"


def test_the_export_describes_sdxl(tiny):
    """The manifest names the family, and the folder holds both encoders and both tokenizers."""
    model = ours(tiny, "sdxl").model
    assert model.family.name == "sdxl" and model.export_manifest["family"] == "sdxl"
    assert model.zeros_for_empty_negative and model.scaling_factor == pytest.approx(0.13025)
    for part in ("text_encoder_2/model.onnx", "tokenizer_2/vocab.json", "unet/model.onnx"):
        assert (model.path / part).is_file(), part
    unet_inputs = [i["name"] for i in model.export_manifest["components"]["unet"]["inputs"]]
    assert unet_inputs == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert ours(tiny, "sdxl-inpaint").model.family.name == "sdxl-inpainting"


@pytest.mark.parametrize("arguments", [
    dict(prompt_2="a cat"), dict(negative_prompt_2="dog"), dict(original_size=(1024, 1024)),
    dict(crops_coords_top_left=(0, 64)), dict(target_size=(512, 512)),
])
def test_sdxl_arguments_on_an_sd_model_are_refused_in_one_line(tiny, arguments):
    pipe = Pipeline.from_pretrained(tiny("sd1")[1], backend="cpu")
    with pytest.raises(EdgediffError) as e:
        pipe(PROMPT, num_inference_steps=1, **arguments)
    message = str(e.value)
    assert "\n" not in message and next(iter(arguments)) in message and "Stable Diffusion 1.x" in message


@pytest.mark.parametrize("arguments, problem", [
    (dict(original_size=(1024,)), "original_size must be two whole numbers"),
    (dict(target_size="1024x1024"), "target_size must be two whole numbers"),
    (dict(crops_coords_top_left=(-1, 0)), "crops_coords_top_left"),
    (dict(prompt_2=["a", "b"]), "2 prompt_2 texts for 1 prompts"),
    (dict(prompt_2=3), "prompt_2"),
])
def test_bad_sdxl_arguments_get_one_line(tiny, arguments, problem):
    with pytest.raises(EdgediffError, match=problem) as e:
        ours(tiny, "sdxl")(PROMPT, num_inference_steps=1, **arguments)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_fp16_sdxl_with_an_overflowing_vae(tiny, tmp_path, monkeypatch):
    """fp16 SDXL against diffusers' fp32 pipeline on the same weights, with a VAE made to overflow fp16
    (its decoder's residual stream scaled past 65504, as SDXL's stock VAE does at large sizes): the
    export's fp32 islands keep the picture; a plainly converted decoder goes inf and is re-run in fp32."""
    import onnx
    from diffusers import AutoencoderKL
    from onnxruntime.transformers.onnx_model import OnnxModel

    from edgediff.engine.components import FP32_FALLBACK
    from edgediff.export.onnx_export import ExportOptions, export_onnx

    src = shutil.copytree(tiny("sdxl")[0], tmp_path / "hot")
    vae = AutoencoderKL.from_pretrained(src / "vae")
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(8e4)
        vae.decoder.conv_in.bias.mul_(8e4)
    vae.save_pretrained(src / "vae")
    out = tmp_path / "fp16"
    manifest = export_onnx(src, out, ExportOptions(dtype="fp16"), profile_memory=False)
    assert manifest["components"]["unet"]["dtype"] == "fp16" and manifest["family"] == "sdxl"

    latents = noise.batch_noise([SEED], noise.INITIAL, SHAPE)
    reference_pipe = StableDiffusionXLPipeline.from_pretrained(src)
    reference_pipe.set_progress_bar_config(disable=True)
    want = reference_pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, height=64, width=64,
                          latents=torch.from_numpy(latents)).images[0]
    fp16 = Pipeline.from_pretrained(out, backend="cpu")(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                                                        latents=latents, seed=SEED, scheduler="euler")
    assert fp16.fp32_reruns == []  # the islands alone kept it finite
    assert psnr(fp16.images[0], want) >= 30, f"fp16 against fp32: {psnr(fp16.images[0], want):.1f} dB"

    naive = OnnxModel(onnx.load(str(out / "vae_decoder" / FP32_FALLBACK)))
    naive.convert_float_to_float16(keep_io_types=True)
    onnx.save(naive.model, str(out / "vae_decoder" / "model.onnx"))  # the black-image decoder
    rerun = Pipeline.from_pretrained(out, backend="cpu")(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                                                         latents=latents, seed=SEED, scheduler="euler")
    assert rerun.fp32_reruns == ["vae_decoder"]
    assert psnr(rerun.images[0], want) >= 30, f"re-run in fp32: {psnr(rerun.images[0], want):.1f} dB"


# -- few-step models: the schedule spacing a single file cannot carry --------------------------------

def test_trailing_spacing_matches_diffusers_for_one_step_at_guidance_0(tiny):
    """SDXL-Turbo's settings: one Euler step, guidance 0, "trailing" timesteps (the model folder says
    "leading"). With "leading", one step would start at t=1 and leave the noise in the picture."""
    latents = noise.batch_noise([SEED], noise.INITIAL, SHAPE)
    pipe = reference(tiny, "sdxl", StableDiffusionXLPipeline)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    want = pipe(PROMPT, num_inference_steps=1, guidance_scale=0.0, latents=torch.from_numpy(latents),
                height=64, width=64).images[0]
    result = ours(tiny, "sdxl")(PROMPT, num_inference_steps=1, guidance_scale=0.0, latents=latents, seed=SEED,
                                scheduler="euler", timestep_spacing="trailing")
    assert psnr(result.images[0], want) >= MIN_PSNR, f"{psnr(result.images[0], want):.1f} dB"
    leading = ours(tiny, "sdxl")(PROMPT, num_inference_steps=1, guidance_scale=0.0, latents=latents, seed=SEED,
                                 scheduler="euler").images[0]
    assert psnr(leading, want) < 40  # the option changed the schedule
    assert "Sampler: Euler, Schedule type: SGM Uniform," in result.parameters[0].a1111()


def test_an_unknown_spacing_is_one_line(tiny):
    with pytest.raises(EdgediffError, match="timestep_spacing 'sgm' is not one of leading, linspace, trailing"):
        ours(tiny, "sdxl")(PROMPT, num_inference_steps=1, timestep_spacing="sgm")


def test_the_command_line_takes_sdxl_options(tiny, tmp_path, capsys):
    from PIL import Image

    from edgediff.cli import main

    out = tmp_path / "turbo.png"
    code = main(["generate", PROMPT, "--model", str(tiny("sdxl")[1]), "--steps", "1", "--guidance", "0",
                 "--timestep-spacing", "trailing", "--prompt-2", "a blue square", "--seed", "3",
                 "--width", "64", "--height", "64", "--backend", "cpu", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    want = ours(tiny, "sdxl")(PROMPT, prompt_2="a blue square", num_inference_steps=1, guidance_scale=0.0,
                              seed=3, timestep_spacing="trailing").images[0]
    got = Image.open(out)
    assert psnr(got.convert("RGB"), want) == float("inf") and "SGM Uniform" in got.text["parameters"]


# -- single files in the original (SGM) layout, as AUTOMATIC1111 and ComfyUI users download them ------

@pytest.mark.slow
def test_a_single_file_gives_the_folders_pictures(tiny, tmp_path):
    """The tiny SDXL written in the original layout (tests/ldm_layout.py, from sgm's and open_clip's module
    names), converted and exported, draws what the diffusers folder's export draws."""
    from ldm_layout import folder_to_single_file

    from edgediff.export.sources import export_model

    src, folder_export = tiny("sdxl")
    single = folder_to_single_file(src, tmp_path / "tiny_xl.safetensors")
    manifest = export_model(single, tmp_path / "from-file", config=src)  # tiny widths: heads from the config
    assert manifest["family"] == "sdxl" and manifest["source"]["kind"] == "single-file"
    kwargs = dict(negative_prompt=NEGATIVE, prompt_2="a blue square", num_inference_steps=4, seed=SEED)
    want = Pipeline.from_pretrained(folder_export, backend="cpu")(PROMPT, **kwargs).images[0]
    got = Pipeline.from_pretrained(tmp_path / "from-file", backend="cpu")(PROMPT, **kwargs).images[0]
    assert psnr(got, want) >= 60, f"{psnr(got, want):.1f} dB"


def test_refiner_and_unknown_files_are_one_line_on_the_command_line(tiny, tmp_path, capsys):
    """Through `edgediff export`: one line that says what the file is, no traceback, nothing written."""
    from ldm_layout import SDXL_CLIP, SDXL_OPEN_CLIP, folder_to_single_file
    from safetensors.torch import save_file

    from edgediff.cli import main
    from edgediff.export.single_file import read_checkpoint

    state = read_checkpoint(folder_to_single_file(tiny("sdxl")[0], tmp_path / "base.safetensors"))
    (tmp_path / "base.safetensors").unlink()
    refiner = {k.replace(SDXL_OPEN_CLIP, "conditioner.embedders.0.model."): t for k, t in state.items()
               if not k.startswith(SDXL_CLIP)}
    save_file(refiner, str(tmp_path / "sd_xl_refiner_1.0.safetensors"))
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(4, 4)},
              str(tmp_path / "sd3.safetensors"))
    for name, words in (("sd_xl_refiner_1.0.safetensors", "SDXL refiner checkpoint"),
                        ("sd3.safetensors", "not supported")):
        code = main(["export", str(tmp_path / name), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("edgediff: error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert name in lines[0] and words in lines[0], lines[0]
        assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd3.safetensors", "sd_xl_refiner_1.0.safetensors"]


def test_the_core_ml_export_refuses_sdxl_in_one_line(tiny, tmp_path):
    """Its packages' shapes are one text encoder's and the plain UNet's: SDXL is refused before any
    work, naming the format that does run it."""
    from edgediff.export.coreml_export import export_coreml

    with pytest.raises(EdgediffError, match="Stable Diffusion XL model.*--format onnx") as e:
        export_coreml(tiny("sdxl")[0], tmp_path / "ml", [(64, 64)])
    assert "\n" not in str(e.value) and not (tmp_path / "ml").exists()


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["standard", "sliced", "split-einsum"])
def test_every_attention_variant_exports_sdxl(tiny, tmp_path, attention):
    """The variant is checked against standard attention in PyTorch, then the graphs pass the parity gate
    (fused, the default, is what every other test here runs)."""
    from edgediff.export.onnx_export import ExportOptions, export_onnx

    m = export_onnx(tiny("sdxl")[0], tmp_path / attention, ExportOptions(attention=attention, slices=2),
                    profile_memory=False)
    assert m["components"]["unet"]["attention"] == attention
    assert all(c["psnr"] is None or c["psnr"] >= 60 for c in m["components"].values())


def test_int8_calibration_records_the_sdxl_conditioning(tiny):
    """--dtype int8 calibrates the UNet on its inputs during real generations: for SDXL those include the
    pooled text and the micro-conditioning, batched with the rest."""
    from edgediff.export import quantize

    calls, held_out = quantize.calibration_inputs(tiny("sdxl")[1], 64, prompts=("a red circle",), steps=2)
    assert len(calls) == 2 and set(held_out) == {"sample", "timestep", "encoder_hidden_states", "text_embeds",
                                                 "time_ids"}
    assert held_out["text_embeds"].shape == (2, 40) and held_out["time_ids"].shape == (2, 6)
    assert held_out["time_ids"][1].tolist() == [64, 64, 0, 0, 64, 64]


def test_sdxl_decodes_in_tiles_when_planned(tiny, monkeypatch):
    """The tiled decodes a lean plan uses, on SDXL's VAE: blended tiles of the whole decoder stay close
    to the whole decode (42.6 dB measured here), and the split decoder (head whole, tail in tiles with
    image-wide GroupNorm statistics), exported for SDXL as for SD, runs through both graphs. Its pictures
    on these random tiny VAEs are 19-20 dB from the whole, for SD 1.x's tiny VAE alike; on trained VAEs it
    is the closer one (tests/test_plan.py, the built-in model)."""
    from dataclasses import replace

    from edgediff.engine.components import HIDDEN_SCALE

    pipe = Pipeline.from_pretrained(tiny("sdxl")[1], backend="cpu")
    args = dict(prompt=PROMPT, width=512, height=384, num_inference_steps=2, seed=SEED)
    whole = pipe(**args)
    assert not whole.plan.vae_tile
    margin = pipe.model.export_manifest["components"]["vae_decoder_tail"]["extra"]["margin"]
    opened, session = [], pipe._session
    monkeypatch.setattr(pipe, "_session", lambda spec, plan=None: opened.append(spec.name) or session(spec, plan))
    ran = []
    for tile, px in ((256, 0), (192, margin * pipe.model.vae_scale_factor // HIDDEN_SCALE)):
        ran.append(pipe(**args, plan=replace(whole.plan, vae_tile=tile, vae_margin=px, vae_overlap=64)))
    blended, split = ran
    assert psnr(blended.images[0], whole.images[0]) >= 35, f"{psnr(blended.images[0], whole.images[0]):.1f} dB"
    assert split.plan.vae_margin and split.images[0].size == (512, 384)
    assert {"vae_decoder_head", "vae_decoder_tail"} <= set(opened)


def test_the_text_streamed_plan_keeps_the_unet_and_frees_the_encoders(tiny):
    """The rung an 8 GB card gets for SDXL: both text encoders are loaded, run and freed each call, the
    UNet and the decoder stay loaded between calls; the picture is the resident plan's."""
    from edgediff.engine.plan import RUNGS, _plan, component_facts

    pipe = Pipeline.from_pretrained(tiny("sdxl")[1], backend="cpu")
    args = dict(prompt=PROMPT, num_inference_steps=2, seed=SEED)
    resident = pipe(**args)
    request = resident.plan.request
    peaks = {r[0]: _plan(pipe.model, component_facts(pipe.model), request, pipe.device, 10 ** 12, *r).predicted_peak
             for r in RUNGS}
    assert peaks["text-streamed"] < peaks["resident"]
    lean = Pipeline.from_pretrained(tiny("sdxl")[1], backend="cpu",
                                    memory_budget=(peaks["text-streamed"] + peaks["resident"]) // 2)
    result = lean(**args)
    assert result.plan.rung == "text-streamed"
    assert result.plan.streamed == ("text_encoder", "text_encoder_2")
    assert set(lean._sessions) == {"unet", "vae_decoder"}
    assert psnr(result.images[0], resident.images[0]) == float("inf")


@pytest.mark.slow
def test_the_sdxl_protocol_runs_against_diffusers(tiny, tmp_path, capsys):
    """`edgediff bench --protocol sdxl-512` in the sd15 protocols' form: the protocol with the tiny SDXL as
    --model, against diffusers' StableDiffusionXLPipeline, same latents: one table, the same picture."""
    import json

    from edgediff.cli import main

    code = main(["bench", "--protocol", "sdxl-512", "--model", str(tiny("sdxl")[0]), "--width", "64",
                 "--height", "64", "--steps", "2", "--against", "diffusers", "--json", str(tmp_path / "r.json"),
                 "--out-dir", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["protocol"]["name"] == "sdxl-512" and report["protocol"]["overrides"] == ["height", "model",
                                                                                            "steps", "width"]
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {"edgediff fp32", "diffusers"} and all(r["status"] == "ok" for r in rows.values())
    assert rows["diffusers"]["stages"]["text_encoder"] > 0 and report["unet_flops_per_step"] > 0
    ours = rows["edgediff fp32"]
    assert ours["psnr_note"] == "identical" or ours["psnr_db"] > 40, ours


# -- the planner on the full-size SDXL architecture ---------------------------------------------------

# SDXL base's components as edgediff exports them, measured: `python -m edgediff.bench.export_memory --model
# sdxl` exports bench/sdxl.py's random-weight SDXL (fp32, fused attention), and its edgediff.json gives
# each graph's bytes on disk and activation profile. An fp16 export halves both (as tests/test_plan.py
# does for SD 1.5).
SDXL_FP32 = {
    "text_encoder": ComponentFacts(463_614_807, (0.0, 3500276.0, 0.0)),
    "text_encoder_2": ComponentFacts(2_777_124_417, (0.0, 7227228.0, 0.0)),
    "unet": ComponentFacts(10_269_056_765, (0.0, 22672.02, 0.0)),
    "vae_encoder": ComponentFacts(136_692_400, (0.0, 131194.8, 0.0)),
    "vae_decoder": ComponentFacts(197_988_758, (0.0, 262130.97, 0.017455)),
    "vae_decoder_head": ComponentFacts(108_157_945, (0.0, 16360.56, 0.031388)),
    "vae_decoder_tail": ComponentFacts(90_231_466, (0.0, 327971.04, 0.0),
                                       {"norms": 19, "groups": 32, "channels": 512, "margin": 12}),
}
SDXL_FP16 = {k: ComponentFacts(v.weights // 2, tuple(c / 2 for c in v.fit), v.extra) for k, v in SDXL_FP32.items()}
# Simulated devices: what each backend's probe would report. Free memory is what such a card or Mac has
# with little else running (a 6 GB card driving a light desktop; an 8 GB Mac after a restart).
DEVICES = {
    "rtx-4060-8gb": Device("cuda", "NVIDIA GeForce RTX 4060", ("CUDAExecutionProvider",), 8 * GiB, int(7.4 * GiB),
                           fp16=True),
    "rx-7600-8gb": Device("rocm", "AMD Radeon RX 7600", ("MIGraphXExecutionProvider",), 8 * GiB, int(7.5 * GiB),
                          fp16=True),
    "m2-8gb": Device("coreml", "Apple M2", ("CoreMLExecutionProvider",), 8 * GiB, int(7.0 * GiB),
                     unified_memory=True, fp16=True),
    "rtx-2060-6gb": Device("cuda", "NVIDIA GeForce RTX 2060", ("CUDAExecutionProvider",), 6 * GiB, int(5.7 * GiB),
                           fp16=True),
    "gtx-1650-4gb": Device("cuda", "NVIDIA GeForce GTX 1650", ("CUDAExecutionProvider",), 4 * GiB, int(3.6 * GiB),
                           fp16=True),
}


def sdxl_fp16():
    from types import SimpleNamespace

    from edgediff.engine.families import SDXL

    return SimpleNamespace(family=SDXL, vae_scale_factor=8, path=None,
                           export_manifest={"dtype": "fp16", "attention": "fused"})


@pytest.mark.parametrize("name", ["rtx-4060-8gb", "rx-7600-8gb", "m2-8gb"])
def test_sdxl_1024_fits_an_8gb_card_under_7gb_with_no_flag(name):
    """The fastest plan whose prediction fits 7 GB: the text encoders are freed (or run on the host)
    before the UNet loads, and the decode fits beside what stays."""
    device, request, model = DEVICES[name], Request(1024, 1024), sdxl_fp16()
    plan = make_plan(model, request, device, facts=SDXL_FP16)
    assert plan.predicted_peak <= 7 * GiB and plan.budget == 7 * GiB
    order = [r[0] for r in RUNGS]
    for rung in RUNGS[:order.index(plan.rung)]:  # every faster rung was predicted over
        assert _plan(model, SDXL_FP16, request, device, plan.budget, *rung).predicted_peak > 7 * GiB
    unet = next(s for s in plan.stages if s.name == "unet")
    held = unet.detail.split("weights ")[1]
    assert float(held.split(" GB")[0]) < 5.0  # the UNet's 4.8 GiB and the decoder's at most: no encoder
    assert "text_encoder_2" not in plan.resident and plan.dtype == "fp16"


def test_sdxl_on_a_6gb_card_gets_a_leaner_plan_and_4gb_a_refusal_that_says_what_would_fit():
    model, request = sdxl_fp16(), Request(1024, 1024)
    order = [r[0] for r in RUNGS]
    eight = make_plan(model, request, DEVICES["rtx-4060-8gb"], facts=SDXL_FP16)
    six = make_plan(model, request, DEVICES["rtx-2060-6gb"], facts=SDXL_FP16)
    assert order.index(six.rung) > order.index(eight.rung)
    assert six.predicted_peak <= six.budget == DEVICES["rtx-2060-6gb"].free_memory
    assert six.on_host == ("text_encoder", "text_encoder_2")  # a discrete card spares the encoders' 1.5 GB
    with pytest.raises(EdgediffError) as e:
        make_plan(model, request, DEVICES["gtx-1650-4gb"], facts=SDXL_FP16)
    message = str(e.value)
    # the UNet's fp16 weights alone are 4.8 GiB: no size fits 4 GB, and the line says what would
    assert "\n" not in message and "what would fit: a budget of 5.60 GB" in message
    assert "no smaller size" in message and "GTX 1650" in message


def test_sdxl_at_768_fits_the_6gb_card_with_room():
    """What the 6 GB card's refusal-free sizes look like: 768x768 takes a faster rung than 1024."""
    model = sdxl_fp16()
    order = [r[0] for r in RUNGS]
    small = make_plan(model, Request(768, 768), DEVICES["rtx-2060-6gb"], facts=SDXL_FP16)
    big = make_plan(model, Request(1024, 1024), DEVICES["rtx-2060-6gb"], facts=SDXL_FP16)
    assert order.index(small.rung) < order.index(big.rung)  # the memory a smaller picture frees buys speed
    assert small.predicted_peak <= small.budget and big.predicted_peak <= big.budget


def test_an_sdxl_option_on_an_sd_model_from_the_command_line_writes_nothing(tiny, tmp_path, capsys):
    from edgediff.cli import main

    out = tmp_path / "x.png"
    code = main(["generate", PROMPT, "--model", str(tiny("sd1")[1]), "--prompt-2", "a cat", "--steps", "1",
                 "--out", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("edgediff: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "prompt_2 is for SDXL models" in lines[0] and "Stable Diffusion 1.x" in lines[0]
    assert list(tmp_path.iterdir()) == []
