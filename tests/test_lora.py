"""LoRAs and textual-inversion embeddings applied at load time to exported models, against diffusers'
`load_lora_weights` + `set_adapters` and `load_textual_inversion` on the same latents (issue 13).

The LoRA files are written here in the formats people download (tests/loras.py): kohya/AUTOMATIC1111 with
diffusers' block names (SD 1.x, SD 2.x, LCM-LoRA) and with SGM's (kohya's SDXL), LoCon convolutions, PEFT.
Every parity test also checks that the LoRA changes the picture, so a LoRA that is silently dropped on
both sides cannot pass.
"""

from __future__ import annotations

import gc
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from loras import ATTENTION, CONVS, TEXT, embedding, kohya, modules, peft

from edgediff import Pipeline
from edgediff.engine import adapters, noise
from edgediff.engine.errors import EdgediffError
from edgediff.engine.metrics import psnr

MIN_PSNR = 60.0  # the issue asks 40 dB; measured 80-90 on these models
CHANGED = 35.0  # below this, a LoRA visibly changed the picture
PROMPT, NEGATIVE = "a red circle on a blue background", "blurry"
SEED, STEPS = 7, 4
SHAPE = (4, 8, 8)
KW = dict(num_inference_steps=STEPS, height=64, width=64, guidance_scale=7.5)
_cache: dict = {}


def reference(tiny, kind: str):
    """A fresh diffusers pipeline (LoRAs are loaded into it, so none is shared between tests)."""
    cls = StableDiffusionXLPipeline if kind.startswith("sdxl") else StableDiffusionPipeline
    extra = {} if kind.startswith("sdxl") else {"safety_checker": None}
    pipe = cls.from_pretrained(tiny(kind)[0], **extra)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def layers(tiny, kind: str, *, unet=ATTENTION, text=True, prefix="kohya", sgm=False) -> dict:
    """{(prefix, module): shape} over the tiny model's UNet layers matching `unet` and its text encoders'
    attention and MLP projections; kohya's prefixes or PEFT's. `sgm`: the UNet under SGM's names."""
    key = (kind, "modules")
    if key not in _cache:
        ref = reference(tiny, kind)
        encoders = [ref.text_encoder] + ([ref.text_encoder_2] if kind.startswith("sdxl") else [])
        _cache[key] = ref.unet, encoders
    model, encoders = _cache[key]
    names = adapters.ldm_unet_names(model.config) if sgm else {}
    out = {}
    if unet is not None:
        for m, shape in modules(model, unet).items():
            out[("lora_unet" if prefix == "kohya" else "unet", names.get(m, m))] = shape
    if text:
        for k, encoder in enumerate(encoders):
            if prefix == "kohya":
                p = "lora_te" if len(encoders) == 1 else f"lora_te{k + 1}"
            else:
                p = "text_encoder" if k == 0 else "text_encoder_2"
            out.update({(p, m): s for m, s in modules(encoder, TEXT).items()})
    return out


def ours(tiny, kind: str, **kwargs) -> Pipeline:
    return Pipeline.from_pretrained(tiny(kind)[1], backend="cpu", **kwargs)


def draw(pipe, prompt=PROMPT, **kwargs):
    latents = noise.batch_noise([SEED], noise.INITIAL, SHAPE)
    if isinstance(pipe, Pipeline):
        return pipe(prompt, latents=latents, seed=SEED, **{"scheduler": "euler", **KW, **kwargs}).images[0]
    return pipe(prompt, latents=torch.from_numpy(latents), **{**KW, **kwargs}).images[0]


def diffusers_with(tiny, kind, loras: list[tuple[Path, float]]):
    ref = reference(tiny, kind)
    names = [f"a{k}" for k in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        ref.load_lora_weights(str(path), adapter_name=name)
    ref.set_adapters(names, adapter_weights=[w for _, w in loras])
    return ref


def check(tiny, kind, loras, **kwargs):
    """Our picture with `loras` against diffusers', and against ours without them."""
    want = draw(diffusers_with(tiny, kind, loras), negative_prompt=NEGATIVE, **kwargs)
    pipe = ours(tiny, kind, loras=[(str(p), w) for p, w in loras])
    got = draw(pipe, negative_prompt=NEGATIVE, **kwargs)
    pipe.set_loras([])
    plain = draw(pipe, negative_prompt=NEGATIVE, **kwargs)
    print(f"[{kind}] {psnr(got, want):.1f} dB against diffusers; {psnr(got, plain):.1f} dB from no LoRA")
    assert psnr(got, want) >= MIN_PSNR, f"{psnr(got, want):.1f} dB against diffusers"
    assert psnr(got, plain) < CHANGED, f"the LoRA changed the picture by only {psnr(got, plain):.1f} dB"
    return got


# -- parity -------------------------------------------------------------------------------------------

def test_kohya_lora_on_unet_and_text_encoder_matches_diffusers(tiny, tmp_path):
    check(tiny, "sd1", [(kohya(tmp_path / "style.safetensors", layers(tiny, "sd1")), 0.8)])


def test_text_encoder_only_lora_matches_diffusers(tiny, tmp_path):
    check(tiny, "sd1", [(kohya(tmp_path / "te.safetensors", layers(tiny, "sd1", unet=None), scale=0.6), 1.0)])


def test_peft_lora_matches_diffusers(tiny, tmp_path):
    check(tiny, "sd1", [(peft(tmp_path / "peft.safetensors", layers(tiny, "sd1", prefix="peft")), 0.7)])


def test_locon_convolutions_match_diffusers(tiny, tmp_path):
    """LoCon: kohya's LoRA on the ResNets' 3x3 convolutions (down (rank, in, 3, 3), up (out, rank, 1, 1))."""
    path = kohya(tmp_path / "locon.safetensors", layers(tiny, "sd1", unet=CONVS, text=False), scale=0.2)
    check(tiny, "sd1", [(path, 1.0)])


def test_two_loras_at_different_weights_match_diffusers(tiny, tmp_path):
    a = kohya(tmp_path / "a.safetensors", layers(tiny, "sd1"), seed=1)
    b = peft(tmp_path / "b.safetensors", layers(tiny, "sd1", prefix="peft", text=False), seed=2)
    got = check(tiny, "sd1", [(a, 0.8), (b, 0.5)])
    only_a = draw(ours(tiny, "sd1", loras=[(a, 0.8)]), negative_prompt=NEGATIVE)
    assert psnr(got, only_a) < CHANGED  # the second one counted


def test_sd2_lora_matches_diffusers(tiny, tmp_path):
    check(tiny, "sd2", [(kohya(tmp_path / "sd2.safetensors", layers(tiny, "sd2")), 0.8)])


def test_sdxl_kohya_lora_with_sgm_names_matches_diffusers(tiny, tmp_path):
    """kohya's SDXL LoRAs name the UNet as SGM did (lora_unet_input_blocks_4_1_...), and the text encoders
    lora_te1_/lora_te2_; diffusers maps the names with its own code, edgediff with its own."""
    path = kohya(tmp_path / "xl.safetensors", layers(tiny, "sdxl", sgm=True))
    assert any("input_blocks" in k or "output_blocks" in k for k in adapters.read_lora(path).layers)
    check(tiny, "sdxl", [(path, 0.8)])


def test_sdxl_peft_lora_matches_diffusers(tiny, tmp_path):
    check(tiny, "sdxl", [(peft(tmp_path / "xlpeft.safetensors", layers(tiny, "sdxl", prefix="peft")), 0.6)])


def test_bf16_lora_file_is_read(tiny, tmp_path):
    """Many LoRAs ship in bfloat16, which numpy lacks: read by hand, and equal to the same file in fp32."""
    import torch
    from safetensors.torch import load_file, save_file

    f32 = kohya(tmp_path / "f32.safetensors", layers(tiny, "sd1", text=False))
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f32)).items()}, str(tmp_path / "bf16.safetensors"))
    read = adapters.read_lora(tmp_path / "bf16.safetensors")
    want = {k: v.to(torch.bfloat16).float().numpy() for k, v in load_file(str(f32)).items()}
    key = next(iter(read.layers))
    assert np.array_equal(read.layers[key].down, want[f"{key}.lora_down.weight"])


def test_lcm_lora_shaped_file_matches_diffusers(tiny, tmp_path):
    """LCM-LoRA's layout: kohya keys with diffusers' block names over every Linear and convolution of the
    UNet's blocks (projections, feed-forwards, time embeddings, ResNets, samplers), rank 8, alpha 8, at
    guidance 1 as LCM-LoRA runs. Euler steps: the LCM scheduler draws noise each step, and its parity
    with diffusers is tests/test_schedulers.py's concern."""
    import re

    every = re.compile(r"(attentions|resnets|samplers)\.\d+\.")
    path = kohya(tmp_path / "lcm.safetensors", layers(tiny, "sd1", unet=every, text=False), rank=8, alpha=8.0,
                 scale=0.15)
    assert any("time_emb_proj" in k for k in adapters.read_lora(path).layers)
    want = draw(diffusers_with(tiny, "sd1", [(path, 1.0)]), guidance_scale=1.0)
    pipe = ours(tiny, "sd1", loras=[(path, 1.0)])
    got = draw(pipe, guidance_scale=1.0)
    print(f"{psnr(got, want):.1f} dB against diffusers")
    assert psnr(got, want) >= MIN_PSNR, f"{psnr(got, want):.1f} dB"
    pipe.set_loras([])
    assert psnr(draw(pipe, guidance_scale=1.0), got) < CHANGED


@pytest.mark.slow
def test_fp16_export_takes_loras(tiny, tmp_path):
    """fp16 exports: merged in fp32, cast once. Compared with diffusers in fp32, so the bar is the fp16
    export's own distance from diffusers (measured first, on the same pipeline without the LoRA)."""
    from edgediff.export.onnx_export import ExportOptions, export_onnx

    src = tiny("sd1")[0]
    folder = tmp_path / "fp16"
    export_onnx(src, folder, ExportOptions(dtype="fp16"), profile_memory=False)
    path = kohya(tmp_path / "style.safetensors", layers(tiny, "sd1"))
    want = draw(diffusers_with(tiny, "sd1", [(path, 0.8)]), negative_prompt=NEGATIVE)
    pipe = Pipeline.from_pretrained(folder, backend="cpu", loras=[(path, 0.8)])
    got = draw(pipe, negative_prompt=NEGATIVE)
    print(f"fp16: {psnr(got, want):.1f} dB against diffusers fp32")
    assert psnr(got, want) >= 40, f"{psnr(got, want):.1f} dB"
    pipe.set_loras([])
    assert psnr(draw(pipe, negative_prompt=NEGATIVE), got) < CHANGED


# -- embeddings ---------------------------------------------------------------------------------------

def test_embeddings_in_prompt_and_negative_match_diffusers(tiny, tmp_path):
    """A three-vector embedding in the prompt and a one-vector one in the negative prompt, triggered by
    their file names, as diffusers' load_textual_inversion with those tokens."""
    width = layers(tiny, "sd1")[("lora_te", "text_model.encoder.layers.0.self_attn.q_proj")][1]
    shiny = embedding(tmp_path / "shiny.safetensors", 3, (width,), seed=3)
    ugly = embedding(tmp_path / "ugly.safetensors", 1, (width,), seed=4, scale=4.0)
    ref = reference(tiny, "sd1")
    ref.load_textual_inversion(str(shiny), token="shiny")
    ref.load_textual_inversion(str(ugly), token="ugly")
    prompt, negative = "a shiny red circle", "ugly, blurry"
    want = draw(ref, prompt, negative_prompt=negative)
    pipe = ours(tiny, "sd1", embeddings=[shiny, ugly])
    got = draw(pipe, prompt, negative_prompt=negative)
    print(f"{psnr(got, want):.1f} dB against diffusers")
    assert psnr(got, want) >= MIN_PSNR, f"{psnr(got, want):.1f} dB"
    plain = draw(ours(tiny, "sd1"), prompt, negative_prompt=negative)
    assert psnr(got, plain) < CHANGED
    # The negative embedding counted on its own: the tiny model reads its text weakly, and one token less
    # in the negative moves the picture to about 44 dB (measured), far below the parity bar above.
    assert psnr(draw(pipe, prompt, negative_prompt="blurry"), got) < 50


def test_sdxl_embedding_pair_matches_diffusers(tiny, tmp_path):
    from safetensors.numpy import load_file

    ref = reference(tiny, "sdxl")
    widths = (ref.text_encoder.config.hidden_size, ref.text_encoder_2.config.hidden_size)
    path = embedding(tmp_path / "glow.safetensors", 2, widths, seed=5)
    pair = load_file(str(path))
    ref.load_textual_inversion(torch.from_numpy(pair["clip_l"]), token="glow", text_encoder=ref.text_encoder,
                               tokenizer=ref.tokenizer)
    ref.load_textual_inversion(torch.from_numpy(pair["clip_g"]), token="glow", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    want = draw(ref, "a glow circle", negative_prompt=NEGATIVE)
    got = draw(ours(tiny, "sdxl", embedding_dir=tmp_path), "a glow circle", negative_prompt=NEGATIVE)
    print(f"{psnr(got, want):.1f} dB against diffusers")
    assert psnr(got, want) >= MIN_PSNR, f"{psnr(got, want):.1f} dB"
    assert psnr(got, draw(ours(tiny, "sdxl"), "a glow circle", negative_prompt=NEGATIVE)) < CHANGED


def test_embedding_for_another_family_is_one_line(tiny, tmp_path):
    path = embedding(tmp_path / "wide.safetensors", 1, (1024,))
    with pytest.raises(EdgediffError, match=r"wide.safetensors holds 1024-wide vectors \(an SD 2.x embedding\)"):
        ours(tiny, "sd1", embeddings=[path])
    pair = embedding(tmp_path / "xl.safetensors", 1, (8, 16))
    with pytest.raises(EdgediffError, match="xl.safetensors is an SDXL embedding"):
        ours(tiny, "sd1", embeddings=[pair])


# -- switching ----------------------------------------------------------------------------------------

def test_switching_gives_the_pictures_of_fresh_loads(tiny, tmp_path):
    """A, then B, then none on one pipeline: the pictures of three fresh loads, and the weights never
    drift (A again equals A). Only sessions whose weights change are re-created: a UNet-only LoRA
    leaves the text encoder's session alone."""
    a = kohya(tmp_path / "a.safetensors", layers(tiny, "sd1", text=False), seed=1)
    b = kohya(tmp_path / "b.safetensors", layers(tiny, "sd1", text=False), seed=2)
    fresh = {name: draw(ours(tiny, "sd1", loras=loras)) for name, loras in
             (("a", [(a, 1.0)]), ("b", [(b, 0.7)]), ("none", []))}
    pipe = ours(tiny, "sd1")
    text = pipe._session(pipe.model.family.text_encoders[0].spec)
    pictures = {}
    for name, loras in (("a", [(a, 1.0)]), ("b", [(b, 0.7)]), ("none", []), ("a2", [(a, 1.0)])):
        unet = pipe._sessions.get("unet")
        pipe.set_loras(loras)
        assert pipe._sessions.get("unet") is None or pipe._sessions.get("unet") is unet
        pictures[name] = draw(pipe)
        assert pipe._session(pipe.model.family.text_encoders[0].spec) is text  # never re-created
    for name in ("a", "b", "none"):
        assert psnr(pictures[name], fresh[name]) >= MIN_PSNR, name
    assert np.array_equal(np.asarray(pictures["a2"]), np.asarray(pictures["a"]))
    assert psnr(pictures["a"], pictures["b"]) < CHANGED


def test_setting_the_same_loras_again_keeps_the_sessions(tiny, tmp_path):
    a = kohya(tmp_path / "a.safetensors", layers(tiny, "sd1"), seed=1)
    pipe = ours(tiny, "sd1", loras=[(a, 1.0)])
    draw(pipe)
    sessions = dict(pipe._sessions)
    pipe.set_loras([(a, 1.0)])
    assert all(pipe._sessions[k] is v for k, v in sessions.items())


# -- the prompt's <lora:name:weight> and the PNG ------------------------------------------------------

def test_prompt_tag_equals_set_loras_and_is_taken_out_of_the_prompt(tiny, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    kohya(folder / "style.safetensors", layers(tiny, "sd1"))
    tagged = ours(tiny, "sd1", lora_dir=folder)
    result = tagged(f"{PROMPT} <lora:style:0.8>", latents=noise.batch_noise([SEED], noise.INITIAL, SHAPE),
                    seed=SEED, scheduler="euler", **KW)
    given = draw(ours(tiny, "sd1", loras=[("style", 0.8)], lora_dir=folder))
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(given))
    assert result.loras == [("style", 0.8)]
    lora_hash = adapters.read_lora(folder / "style.safetensors").hash
    text = result.parameters[0].a1111()
    assert text.splitlines()[0] == PROMPT
    assert f'Lora hashes: "style: {lora_hash}"' in text
    # the tag applies to its own call only
    assert psnr(draw(tagged), draw(ours(tiny, "sd1"))) == float("inf")


def test_png_parameters_read_back_by_sd_parsers(tiny, tmp_path):
    from sd_parsers import ParserManager

    from edgediff.engine.images import save_png

    folder = tmp_path / "loras"
    folder.mkdir()
    kohya(folder / "style.safetensors", layers(tiny, "sd1", text=False))
    result = ours(tiny, "sd1", lora_dir=folder)(f"{PROMPT}, <lora:style:0.6>", seed=SEED, **KW)
    path = save_png(result.images[0], tmp_path / "out.png", result.parameters[0].a1111())
    info = ParserManager().parse(str(path))
    assert [p.value for p in info.prompts] == [PROMPT]
    assert "lora" not in str(info.prompts).lower()


def test_lora_hash_is_automatic1111s_addnet_hash(tmp_path):
    """SHA-256 of the file after its header, 12 hex digits (kohya's addnet hash, which A1111 shows)."""
    import hashlib

    path = kohya(tmp_path / "h.safetensors", {("lora_unet", "x.to_q"): (8, 8)})
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert adapters.read_lora(path).hash == hashlib.sha256(data[8 + n:]).hexdigest()[:12]


# -- bad input ----------------------------------------------------------------------------------------

def _bad_inputs(tiny, tmp_path) -> dict:
    folder = tmp_path / "loras"
    folder.mkdir()
    good = kohya(folder / "good.safetensors", layers(tiny, "sd1", text=False))
    pickle = folder / "old.ckpt"
    pickle.write_bytes(b"\x80\x04\x95")  # never opened: the suffix is enough
    truncated = folder / "cut.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    xl = kohya(folder / "xl.safetensors", layers(tiny, "sdxl", sgm=True))
    return {"good": good, "pickle": pickle, "truncated": truncated, "xl": xl, "folder": folder}


@pytest.mark.parametrize("case, message", [
    ("pickle", r"old.ckpt is a pickle \(.ckpt\): reading one can run any code"),
    ("truncated", r"cut.safetensors is not a readable .safetensors LoRA \(tensor .* lies past the end of the file"),
    ("xl", r"xl.safetensors is an SDXL LoRA and this model is SD 1.x|xl.safetensors is an SDXL LoRA"),
    ("missing", r"LoRA 'nothere' is not in .*loras \(it has: cut, good, xl\)"),
    ("weight", r"the weight of LoRA .* must be a finite number, not 'heavy'"),
    ("tag", r"<lora:good:heavy>: the weight 'heavy' is not a number"),
])
def test_bad_lora_is_one_line_and_the_previous_set_stays(tiny, tmp_path, case, message):
    files = _bad_inputs(tiny, tmp_path)
    pipe = ours(tiny, "sd1", loras=[(files["good"], 1.0)], lora_dir=files["folder"])
    before = draw(pipe)
    with pytest.raises(EdgediffError, match=message) as raised:
        if case == "tag":
            draw(pipe, f"{PROMPT} <lora:good:heavy>")
        else:
            ref = {"missing": "nothere", "weight": files["good"]}.get(case, files.get(case))
            pipe.set_loras([(ref, "heavy" if case == "weight" else 1.0)])
    assert "\n" not in str(raised.value)
    assert np.array_equal(np.asarray(draw(pipe)), np.asarray(before))


def test_a_few_unmatched_keys_are_reported_and_skipped(tiny, tmp_path, caplog):
    layout = layers(tiny, "sd1", text=False)
    layout[("lora_unet", "down_blocks.9.attentions.0.proj_in")] = (32, 32)
    path = kohya(tmp_path / "extra.safetensors", layout)
    with caplog.at_level(logging.WARNING, logger="edgediff"):
        draw(ours(tiny, "sd1", loras=[(path, 1.0)]))
    assert "LoRA extra didn't match keys: lora_unet_down_blocks_9_attentions_0_proj_in" in caplog.text


def test_a_lora_matching_nothing_is_one_line(tiny, tmp_path):
    path = kohya(tmp_path / "odd.safetensors", {("lora_unet", "nowhere.to_q"): (8, 8)})
    with pytest.raises(EdgediffError, match="none of its 1 LoRA layers matches a weight of this SD 1.x model"):
        ours(tiny, "sd1", loras=[(path, 1.0)])


def test_an_export_without_a_weight_map_says_to_export_again(tiny, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(tiny("sd1")[1], folder)
    for f in folder.glob("*/weight_map.json"):
        f.unlink()
    path = kohya(tmp_path / "a.safetensors", layers(tiny, "sd1"))
    with pytest.raises(EdgediffError, match="records no weight map.*export the model again"):
        Pipeline.from_pretrained(folder, backend="cpu", loras=[(path, 1.0)])


def test_the_export_maps_every_weight_of_the_unet_and_text_encoder(tiny):
    """Every PyTorch weight of two or more dimensions has its initializer, and reading it back from the
    data file gives PyTorch's value (transposed MatMul weights included)."""
    import json

    from diffusers import UNet2DConditionModel

    src, folder = tiny("sd1")
    unet = UNet2DConditionModel.from_pretrained(src / "unet")
    params = {n: p.detach().numpy() for n, p in unet.named_parameters() if p.dim() >= 2}
    targets = adapters.Targets.of_folder(folder, ours(tiny, "sd1").model.family)
    mapped = {p: w for (c, p), w in targets.weights.items() if c == "unet"}
    assert set(mapped) == set(params)
    assert any(w.transposed for w in mapped.values()) and any(not w.transposed for w in mapped.values())
    for name, w in mapped.items():
        assert np.array_equal(w.read(), params[name]), name
    slots = json.loads((folder / "text_encoder" / "weight_map.json").read_text())["embedding_slots"]
    assert slots[1] == 1024
    gc.collect()


def test_the_plan_counts_the_weights_a_lora_replaces(tiny, tmp_path):
    """The merged weights live beside the sessions for their whole life (ONNX Runtime reads them from our
    buffers): on unified memory every stage's prediction grows by them and the LoRA's own tensors; a
    card's does not (the weights it gets replace the exported ones)."""
    import dataclasses

    from edgediff.engine.plan import Request

    path = kohya(tmp_path / "a.safetensors", layers(tiny, "sd1"))
    plain, pipe = ours(tiny, "sd1"), ours(tiny, "sd1", loras=[(path, 1.0)])
    lora = adapters.read_lora(path)
    merged, _ = adapters.merged(pipe._adapter_targets("LoRAs"), [(lora, 1.0)])
    held = sum(v.nbytes for c in merged.values() for v in c.values()) + sum(
        t.nbytes for layer in lora.layers.values() for t in (layer.down, layer.up))
    request = Request(64, 64)
    assert [s.peak - held for s in pipe.make_plan(request).stages] == [s.peak for s in plain.make_plan(request).stages]
    card = dataclasses.replace(pipe.device, backend="cuda", unified_memory=False, free_memory=None)
    pipe.device = plain.device = card
    assert [s.peak for s in pipe.make_plan(request).stages] == [s.peak for s in plain.make_plan(request).stages]


def test_with_embeddings_a_unet_lora_leaves_the_text_encoders_session(tiny, tmp_path):
    """A component's weights are named by what they depend on: with embeddings in the text encoder, a
    UNet-only LoRA switched on and off does not re-create the text encoder's session."""
    width = layers(tiny, "sd1")[("lora_te", "text_model.encoder.layers.0.self_attn.q_proj")][1]
    shiny = embedding(tmp_path / "shiny.safetensors", 2, (width,), seed=3)
    a = kohya(tmp_path / "a.safetensors", layers(tiny, "sd1", text=False), seed=1)
    pipe = ours(tiny, "sd1", embeddings=[shiny])
    spec = pipe.model.family.text_encoders[0].spec
    text = pipe._session(spec)
    for loras in ([(a, 1.0)], []):
        pipe.set_loras(loras)
        draw(pipe, "a shiny circle")
        assert pipe._session(spec) is text
