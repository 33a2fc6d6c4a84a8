"""LoRAs from the command line: `generate --lora/--lora-dir`, `edgediff loras`, `export --lora`.

What is checked is what a user sees: the pictures (the command's against the Python API's, the baked
export's against the one that takes the LoRA when loaded), the PNG's parameters read back by sd-parsers,
and the one line each mistake gets instead of a traceback."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from loras import ATTENTION, TEXT, embedding, kohya, modules
from test_cli import one_line_error
from PIL import Image

from edgediff.cli import main

STEPS = ["--steps", "3", "--seed", "42", "--no-safety-checker"]  # the tiny model's 64x64 by default


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err




def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def sd1_layers(tiny):
    """{("lora_unet", module): shape} of the tiny SD 1.x UNet's attention projections."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny("sd1")[0] / "unet")
    return {("lora_unet", m): shape for m, shape in modules(unet, ATTENTION).items()}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, sd1_layers):
    """A LoRA folder with one LoRA of the tiny SD 1.x model, `style`."""
    folder = tmp_path_factory.mktemp("loras")
    kohya(folder / "style.safetensors", sd1_layers, seed=3)
    return folder


def test_generate_lora_equals_the_python_api_and_changes_the_picture(tiny, lora_dir, tmp_path, capsys):
    from edgediff import Pipeline

    lora = lora_dir / "style.safetensors"
    code, out, err = run(capsys, "generate", "a red circle", "--model", tiny("sd1")[1], *STEPS,
                         "--lora", f"{lora}:0.8", "--out", tmp_path / "cli.png")
    assert code == 0, err
    assert "LoRAs: style at 0.8" in out
    pipe = Pipeline.from_pretrained(tiny("sd1")[1], backend="cpu", safety_checker=False, loras=[(lora, 0.8)])
    result = pipe("a red circle", num_inference_steps=3, seed=42)
    assert result.loras == [("style", 0.8)]
    assert np.array_equal(pixels(tmp_path / "cli.png"), np.asarray(result.images[0].convert("RGB")))

    code, _, err = run(capsys, "generate", "a red circle", "--model", tiny("sd1")[1], *STEPS,
                       "--out", tmp_path / "plain.png")
    assert code == 0, err
    plain, with_lora = pixels(tmp_path / "plain.png"), pixels(tmp_path / "cli.png")
    assert np.abs(plain.astype(int) - with_lora).mean() > 1.0  # the LoRA changed the picture
    assert with_lora.std() > 1.0  # a picture, not a blacked-out or flat one


def test_prompt_tag_equals_lora_flag_and_png_reads_back(tiny, lora_dir, tmp_path, capsys):
    from sd_parsers import ParserManager

    model = tiny("sd1")[1]
    code, _, err = run(capsys, "generate", "a red circle <lora:style:0.8>", "--model", model, *STEPS,
                       "--lora-dir", lora_dir, "--out", tmp_path / "tag.png")
    assert code == 0, err
    code, _, err = run(capsys, "generate", "a red circle", "--model", model, *STEPS, "--lora", "style:0.8",
                       "--lora-dir", lora_dir, "--out", tmp_path / "flag.png")
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "tag.png"), pixels(tmp_path / "flag.png"))

    parameters = Image.open(tmp_path / "tag.png").text["parameters"]
    assert re.search(r'Lora hashes: "style: [0-9a-f]{12}"', parameters), parameters
    info = ParserManager().parse(tmp_path / "tag.png")
    assert info is not None
    assert [p.value for p in info.prompts] == ["a red circle"]  # the tag is not part of the prompt


def test_embedding_dir_equals_the_python_api_and_changes_the_picture(tiny, tmp_path, capsys):
    from edgediff import Pipeline

    folder = tmp_path / "embeddings"
    folder.mkdir()
    embedding(folder / "shiny.safetensors", vectors=2, widths=(32,), seed=4)  # the tiny CLIP is 32 wide
    model = tiny("sd1")[1]
    code, _, err = run(capsys, "generate", "a shiny red circle", "--model", model, *STEPS, "--embedding-dir", folder,
                       "--out", tmp_path / "cli.png")
    assert code == 0, err
    pipe = Pipeline.from_pretrained(model, backend="cpu", safety_checker=False, embedding_dir=folder)
    image = pipe("a shiny red circle", num_inference_steps=3, seed=42).images[0]
    assert np.array_equal(pixels(tmp_path / "cli.png"), np.asarray(image.convert("RGB")))
    code, _, err = run(capsys, "generate", "a shiny red circle", "--model", model, *STEPS,
                       "--out", tmp_path / "plain.png")
    assert code == 0, err
    assert np.abs(pixels(tmp_path / "plain.png").astype(int) - pixels(tmp_path / "cli.png")).mean() > 1.0


def test_export_with_a_baked_lora_equals_the_lora_at_load_time(tiny, lora_dir, tmp_path, capsys):
    from edgediff.engine.metrics import psnr

    src, plain = tiny("sd1")
    lora = lora_dir / "style.safetensors"
    code, _, err = run(capsys, "export", src, "--lora", f"{lora}:0.8", "--out", tmp_path / "baked")
    assert code == 0, err
    code, _, err = run(capsys, "generate", "a red circle", "--model", tmp_path / "baked", *STEPS,
                       "--out", tmp_path / "baked.png")
    assert code == 0, err
    code, _, err = run(capsys, "generate", "a red circle", "--model", plain, *STEPS, "--lora", f"{lora}:0.8",
                       "--out", tmp_path / "loaded.png")
    assert code == 0, err
    code, _, err = run(capsys, "generate", "a red circle", "--model", plain, *STEPS,
                       "--out", tmp_path / "plain.png")
    assert code == 0, err
    baked, loaded = pixels(tmp_path / "baked.png"), pixels(tmp_path / "loaded.png")
    assert psnr(baked, loaded) >= 60.0  # the same weights, summed in another order
    assert psnr(baked, pixels(tmp_path / "plain.png")) < 40.0  # and the LoRA is in them


@pytest.mark.parametrize("argv, words", [
    (["--lora", "{dir}/old.ckpt:0.5"], ["old.ckpt is a pickle"]),
    (["--lora", "{dir}/xl.safetensors"], ["xl.safetensors is an SDXL LoRA", "SD 1.x"]),
    (["--lora", "nosuch", "--lora-dir", "{loras}"], ["'nosuch' is not in", "style"]),
    (["--lora", "{loras}/style.safetensors:x"], ["the weight 'x' is not a number"]),
])
def test_export_refuses_a_lora_before_exporting(tiny, bad_loras, lora_dir, capsys, argv, words):
    argv = [a.format(dir=bad_loras, loras=lora_dir) for a in argv]
    code, _, err = run(capsys, "export", tiny("sd1")[0], *argv, "--out", bad_loras / "o")
    one_line_error(code, err, *words)
    assert not (bad_loras / "o").exists()


@pytest.fixture
def bad_loras(tmp_path, lora_dir, sd1_layers):
    """Files each of which `generate --lora` must refuse in one line."""
    (tmp_path / "old.ckpt").write_bytes(b"a pickle: reading it could run code")
    data = (lora_dir / "style.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    # an SDXL LoRA: SDXL's 2048-wide cross-attention context, and a second text encoder
    to_k = next(m for _, m in sd1_layers if m.endswith("attn2.to_k"))
    kohya(tmp_path / "xl.safetensors", {("lora_unet", to_k): (sd1_layers[("lora_unet", to_k)][0], 2048),
                                        ("lora_te2", "text_model.encoder.layers.0.mlp.fc1"): (5120, 1280)})
    from safetensors.numpy import save_file

    key = "lora_unet_" + to_k.replace(".", "_")  # an alpha holding no value
    save_file({f"{key}.lora_down.weight": np.ones((4, 32), np.float32), f"{key}.lora_up.weight":
               np.ones((32, 4), np.float32), f"{key}.alpha": np.zeros(0, np.float32)},
              str(tmp_path / "alpha.safetensors"))
    return tmp_path


@pytest.mark.parametrize("case, argv, words", [
    ("pickle", ["--lora", "{dir}/old.ckpt"], ["old.ckpt is a pickle", ".safetensors"]),
    ("truncated", ["--lora", "{dir}/cut.safetensors:0.5"], ["cut.safetensors", "truncated"]),
    ("sdxl", ["--lora", "{dir}/xl.safetensors"], ["xl.safetensors is an SDXL LoRA", "SD 1.x"]),
    ("empty alpha", ["--lora", "{dir}/alpha.safetensors"], ["alpha.safetensors", "alpha holds 0 values"]),
    ("no such name", ["--lora", "nosuch:0.5", "--lora-dir", "{loras}"], ["'nosuch' is not in", "style"]),
    ("a name without a folder", ["--lora", "style"], ["'style' is not a file", "--lora-dir"]),
    ("weight", ["--lora", "{loras}/style.safetensors:abc"], ["the weight 'abc' is not a number"]),
    ("infinite weight", ["--lora", "{loras}/style.safetensors:inf"], ["finite"]),
    ("tag without folder", ["--prompt", "a cat <lora:style:0.5>"], ["<lora:style:...>", "--lora-dir"]),
    ("tag weight", ["--prompt", "a cat <lora:style:abc>", "--lora-dir", "{loras}"], ["'abc' is not a number"]),
    ("folder", ["--lora-dir", "{dir}/nowhere"], ["--lora-dir", "is not a folder"]),
    ("embedding folder", ["--embedding-dir", "{dir}/nowhere"], ["--embedding-dir", "is not a folder"]),
])
def test_bad_loras_are_one_line_and_write_nothing(tiny, bad_loras, lora_dir, capsys, case, argv, words):
    argv = [a.format(dir=bad_loras, loras=lora_dir) for a in argv]
    prompt = "a cat"
    if argv[0] == "--prompt":
        prompt, argv = argv[1], argv[2:]
    out = bad_loras / "out" / "x.png"
    code, _, err = run(capsys, "generate", prompt, "--model", tiny("sd1")[1], *STEPS, *argv, "--out", out)
    one_line_error(code, err, *words)
    assert not out.exists()


def test_a_file_whose_name_has_a_colon_is_a_file(tiny, lora_dir, tmp_path, capsys):
    odd = shutil.copy(lora_dir / "style.safetensors", tmp_path / "style:v2")
    code, out, err = run(capsys, "generate", "a cat", "--model", tiny("sd1")[1], *STEPS, "--lora", odd,
                         "--out", tmp_path / "o.png")
    assert code == 0, err
    assert "LoRAs: style:v2 at 1" in out


def test_loras_lists_a_folder(tiny, lora_dir, bad_loras, tmp_path, capsys):
    folder = tmp_path / "listing"
    folder.mkdir()
    shutil.copy(lora_dir / "style.safetensors", folder)
    for name in ("old.ckpt", "cut.safetensors", "xl.safetensors"):
        shutil.copy(bad_loras / name, folder)
    # an SD 1.x LoRA by its context width (768), which the tiny model (32 wide) is not
    kohya(folder / "real15.safetensors", {("lora_unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"):
                                          (320, 768)}, rank=8)
    (folder / "style.png").write_bytes(b"a preview picture")
    code, out, err = run(capsys, "loras", "--lora-dir", folder)
    assert code == 0, err
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    from edgediff.engine.adapters import read_lora

    assert re.fullmatch(rf"real15 +SD 1\.x +{read_lora(folder / 'real15.safetensors').hash} +1 +8", lines["real15"])
    assert re.fullmatch(rf"style +unknown +{read_lora(folder / 'style.safetensors').hash} +\d+ +4", lines["style"])
    assert re.fullmatch(r"xl +SDXL +[0-9a-f]{12} +2 +4", lines["xl"])
    assert "refused: old.ckpt is a pickle" in lines["old"]
    assert "cannot be used: cut.safetensors is not a readable .safetensors LoRA" in lines["cut"]
    assert "truncated" in lines["cut"]
    assert "(1 other file(s)" in out  # the preview, not listed as a LoRA
    assert "Traceback" not in err

    code, out, err = run(capsys, "loras", "--lora-dir", folder, "--model", tiny("sd1")[1])
    assert code == 0, err
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert lines["style"].endswith("  yes")
    assert "no: xl.safetensors is an SDXL LoRA" in lines["xl"]
    # SD 1.x by its width, and the tiny SD 1.x model's are others: not "an SD 1.x LoRA ... use an SD 1.x one"
    assert "no: real15.safetensors is a LoRA for another model" in lines["real15"]
    assert "refused:" in lines["old"] and "cannot be used:" in lines["cut"]


def test_loras_refuses_a_missing_folder(tmp_path, capsys):
    code, _, err = run(capsys, "loras", "--lora-dir", tmp_path / "nowhere")
    one_line_error(code, err, "--lora-dir", "nowhere", "is not a folder")


def test_coreml_export_bakes_the_loras(tiny, sd1_layers, tmp_path, capsys, monkeypatch):
    """`export --format coreml --lora` converts the text encoder and the UNet with the LoRA in their
    weights. Here the modules handed to the converter are checked (the conversion itself is
    tests/test_coreml_export.py's, and the packages run only on macOS)."""
    pytest.importorskip("coremltools")
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from edgediff.engine.adapters import read_lora
    from edgediff.export import coreml_export
    from edgediff.export.onnx_export import ComponentReport
    from edgediff.export.weight_map import canonical

    converted = {}

    def convert(spec, module, args, path, variant, has_attention, compute_units):
        converted[spec.name] = {n: p.detach().clone() for n, p in module.m.named_parameters()}
        return ComponentReport(spec.name, "coreml", "fp16", variant, [], [], 0, 0, None, 0.0, 0.0)
    monkeypatch.setattr(coreml_export, "_convert_one", convert)
    src = tiny("sd1")[0]
    text = CLIPTextModel.from_pretrained(src / "text_encoder")
    layers = {**sd1_layers, **{("lora_te", m): shape for m, shape in modules(text, TEXT).items()}}
    lora = kohya(tmp_path / "both.safetensors", layers, seed=5)
    code, _, err = run(capsys, "export", src, "--format", "coreml", "--width", "64", "--height", "64",
                       "--lora", f"{lora}:0.8", "--out", tmp_path / "o")
    assert code == 0, err

    pairs = read_lora(lora).layers
    plain = {"unet": (dict(UNet2DConditionModel.from_pretrained(src / "unet").named_parameters()), "lora_unet_"),
             "text_encoder": (dict(text.named_parameters()), "lora_te_")}
    changed = 0
    for component, (params, prefix) in plain.items():
        for name, value in converted[component].items():
            key = prefix + canonical(name, component == "text_encoder").removesuffix(".weight").replace(".", "_")
            want = params[name].detach()
            if key in pairs and name.endswith(".weight"):
                want = want + torch.from_numpy(pairs[key].delta(tuple(want.shape)) * np.float32(0.8))
                changed += 1
            torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-6)
    assert changed == len(pairs) == len(layers)
    import json

    manifest = json.loads((tmp_path / "o" / "edgediff.json").read_text())
    assert manifest["loras"] == [{"name": "both", "hash": read_lora(lora).hash, "weight": 0.8}]
