"""The `edgediff` command: files it writes, and the one-line errors it gives instead of writing them."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image
from pictures import centre_mask, scene

from edgediff.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *words):
    lines = [line for line in err.splitlines() if line.startswith("edgediff: error:")]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]


def test_generate_writes_png_with_a1111_parameters(tiny, tmp_path, capsys):
    out = tmp_path / "pic.png"
    code, stdout, _ = run(capsys, "generate", "a red circle", "--model", str(tiny("sd1")[1]), "--negative",
                          "blurry, bad", "--steps", "3", "--seed", "42", "--scheduler", "euler_a",
                          "--guidance", "6.5", "--out", str(out))
    assert code == 0, stdout
    image = Image.open(out)
    assert image.size == (64, 64)
    assert image.text["parameters"] == (
        "a red circle\nNegative prompt: blurry, bad\n"
        f"Steps: 3, Sampler: Euler a, CFG scale: 6.5, Seed: 42, Size: 64x64, Model: {tiny('sd1')[0].name}, "
        "Version: edgediff")
    assert [p.name for p in tmp_path.iterdir()] == ["pic.png"]  # no temporary file left behind


def test_batch_writes_one_file_per_seed(tiny, tmp_path, capsys):
    out = tmp_path / "b.png"
    code, stdout, _ = run(capsys, "generate", "a star", "--model", str(tiny("sd1")[1]), "--steps", "2",
                          "--seed", "7", "--batch", "2", "--width", "48", "--height", "32", "--out", str(out))
    assert code == 0
    seeds = [Image.open(tmp_path / f"b-{k}.png").text["parameters"].split("Seed: ")[1].split(",")[0]
             for k in (1, 2)]
    assert seeds == ["7", "8"]
    assert Image.open(tmp_path / "b-1.png").size == (48, 32)


def test_img2img_and_inpainting_from_the_command_line(tiny, tmp_path, capsys):
    scene().save(tmp_path / "in.png")
    centre_mask().save(tmp_path / "mask.png")
    code, _, _ = run(capsys, "generate", "a cat", "--model", str(tiny("sd1")[1]), "--steps", "4",
                     "--init-image", str(tmp_path / "in.png"), "--strength", "0.5", "--out", str(tmp_path / "i.png"))
    assert code == 0
    assert "Denoising strength: 0.5" in Image.open(tmp_path / "i.png").text["parameters"]
    code, _, _ = run(capsys, "generate", "a cat", "--model", str(tiny("inpaint")[1]), "--steps", "3",
                     "--init-image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                     "--out", str(tmp_path / "p.png"))
    assert code == 0 and (tmp_path / "p.png").is_file()


@pytest.fixture
def broken_models(tiny, tmp_path):
    """Copies of the exported tiny model with one component missing, and one corrupt."""
    good = tiny("sd1")[1]
    missing = shutil.copytree(good, tmp_path / "missing")
    (missing / "unet" / "model.onnx").unlink()
    corrupt = shutil.copytree(good, tmp_path / "corrupt")
    (corrupt / "vae_decoder" / "model.onnx").write_bytes(b"not an onnx model at all")
    return missing, corrupt


@pytest.mark.parametrize("case, extra, words", [
    ("missing", [], ["unet/model.onnx", "export"]),
    ("corrupt", [], ["vae_decoder/model.onnx", "not a valid ONNX model"]),
    ("width", ["--width", "100"], ["width 100", "not a multiple of 16"]),
    ("height", ["--height", "65"], ["height 65", "not a multiple of 16"]),
    ("steps", ["--steps", "0"], ["num_inference_steps must be from 1 to 1000, not 0"]),
    ("image", ["--init-image", "NOFILE.png"], ["init image", "NOFILE.png"]),
    ("mask", ["--init-image", "IN.png", "--mask", "BAD.png"], ["mask", "BAD.png"]),
    ("nomodel", [], ["does not exist"]),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny, broken_models, tmp_path, capsys, case, extra, words):
    missing, corrupt = broken_models
    model = {"missing": missing, "corrupt": corrupt, "nomodel": tmp_path / "nowhere"}.get(case, tiny("sd1")[1])
    scene().save(tmp_path / "IN.png")
    (tmp_path / "BAD.png").write_bytes(b"\x89PNG but not really")
    extra = [str(tmp_path / a) if a.endswith(".png") else a for a in extra]
    out = tmp_path / "out" / "x.png"
    code, _, err = run(capsys, "generate", "a cat", "--model", str(model), "--steps", "2", *extra,
                       "--out", str(out))
    one_line_error(code, err, *words)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_unknown_scheduler_is_refused(tiny, capsys):
    with pytest.raises(SystemExit) as e:  # argparse's refusal, listing the choices
        main(["generate", "x", "--model", str(tiny("sd1")[1]), "--scheduler", "heun"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'heun'" in err and "euler_a" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, words", [
    (["generate", "x", "--model", "m", "--steps", "abc"], "edgediff: error: argument --steps: invalid int"),
    (["generate", "--model", "m"], "edgediff: error: the following arguments are required: prompt"),
    (["bogus"], "edgediff: error: argument command: invalid choice: 'bogus'"),
    ([], "edgediff: error: the following arguments are required: command"),
    (["export", "builtin", "--out", "x", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["bench", "compare"], "edgediff: error: the following arguments are required: reports (see `edgediff bench compare --help`)"),
])
def test_command_line_mistakes_are_one_line_without_the_usage_block(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "--help" in err and "usage:" not in err, err


def test_unknown_scheduler_in_the_api(tiny):
    from edgediff import EdgediffError, Pipeline

    with pytest.raises(EdgediffError, match="unknown scheduler 'heun'.*euler_a"):
        Pipeline.from_pretrained(tiny("sd1")[1], backend="cpu")("x", scheduler="heun")


def test_mask_of_another_size_is_resized_with_a_warning(tiny, tmp_path, capsys, caplog):
    scene(64, 64).save(tmp_path / "in.png")
    centre_mask(32, 32).save(tmp_path / "m.png")
    code, _, _ = run(capsys, "generate", "a cat", "--model", str(tiny("inpaint")[1]), "--steps", "2",
                     "--init-image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png"),
                     "--out", str(tmp_path / "o.png"))
    assert code == 0
    assert "the mask is 32x32 but the image is 64x64: resized the mask" in caplog.text
    assert Image.open(tmp_path / "o.png").size == (64, 64)


def test_export_refuses_a_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    code, _, err = run(capsys, "export", str(tmp_path / "src"), "--out", str(tmp_path / "o"))
    one_line_error(code, err, "not a diffusers Stable Diffusion folder", "model_index.json")
    assert not (tmp_path / "o").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no partial folder left


@pytest.mark.slow
def test_export_writes_optimum_layout(tiny, tmp_path, capsys):
    code, stdout, _ = run(capsys, "export", str(tiny("sd2")[0]), "--out", str(tmp_path / "o"))
    assert code == 0
    for part in ("model_index.json", "text_encoder/model.onnx", "unet/model.onnx", "vae_encoder/model.onnx",
                 "vae_decoder/model.onnx", "tokenizer", "scheduler/scheduler_config.json",
                 "edgediff.json"):
        assert (tmp_path / "o" / part).exists(), part
    assert "parity vs PyTorch" in stdout
    code, _, err = run(capsys, "export", str(tiny("sd2")[0]), "--out", str(tmp_path / "o"))
    one_line_error(code, err, "already holds an edgediff export", "--force")


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if the model is loaded: refusals of --out must come before it."""
    from edgediff.engine.pipeline import Pipeline

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")
    monkeypatch.setattr(Pipeline, "from_pretrained", loaded)


@pytest.mark.parametrize("batch, existing", [(1, "out.png"), (3, "out-2.png")])
def test_generate_refuses_an_existing_out_before_loading(no_loading, tmp_path, capsys, batch, existing):
    (tmp_path / existing).write_bytes(b"the user's picture")
    code, _, err = run(capsys, "generate", "a cat", "--model", str(tmp_path / "nowhere"), "--batch", str(batch),
                       "--out", str(tmp_path / "out.png"))
    one_line_error(code, err, str(tmp_path / existing), "already exists", "--force", "another --out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]
    assert (tmp_path / existing).read_bytes() == b"the user's picture"


def test_generate_force_replaces_out(tiny, tmp_path, capsys):
    out = tmp_path / "out.png"
    out.write_bytes(b"old")
    code, _, _ = run(capsys, "generate", "a cat", "--model", str(tiny("sd1")[1]), "--steps", "2", "--force",
                     "--out", str(out))
    assert code == 0 and Image.open(out).size == (64, 64)


@pytest.mark.parametrize("case, out, words", [
    ("a folder", "d.png", ["d.png is a folder", "--out"]),
    ("under a file", "f.txt/sub/x.png", ["f.txt is a file, not a folder", "another --out"]),
    ("read-only", "ro/x.png", ["no permission to write in", "ro", "another --out"]),
])
def test_generate_refuses_an_out_it_cannot_write_before_loading(no_loading, tmp_path, capsys, case, out, words):
    import os

    (tmp_path / "d.png").mkdir()
    (tmp_path / "f.txt").write_text("a file")
    (tmp_path / "ro").mkdir(mode=0o555)
    if case == "read-only" and os.access(tmp_path / "ro", os.W_OK):
        pytest.skip("running as root: every folder is writable")
    code, _, err = run(capsys, "generate", "a cat", "--model", "builtin", "--out", str(tmp_path / out))
    one_line_error(code, err, *words)


def test_export_refuses_an_out_it_cannot_create_before_exporting(tmp_path, capsys):
    (tmp_path / "f.txt").write_text("a file")
    code, _, err = run(capsys, "export", "builtin", "--out", str(tmp_path / "f.txt" / "model"))
    one_line_error(code, err, "f.txt is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


@pytest.fixture
def broken_devices(monkeypatch):
    """`edgediff devices` with a bug in it."""
    import edgediff.cli

    def bug(args):
        return 1 / 0
    monkeypatch.setattr(edgediff.cli, "_devices", bug)


def test_an_unexpected_error_is_one_line_naming_it(broken_devices, capsys):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    code, _, err = run(capsys, "devices")
    assert code == 1
    assert err.splitlines() == ["edgediff: unexpected error: ZeroDivisionError: division by zero "
                                "(run again with --debug for the traceback)"]
    assert signal.getsignal(signal.SIGTERM) is before  # the command's SIGTERM handler is gone again


@pytest.mark.parametrize("argv", [["--debug", "devices"], ["devices", "--debug"]])
def test_debug_shows_the_traceback(broken_devices, argv):
    with pytest.raises(ZeroDivisionError):  # raised out of main: Python prints the traceback
        main(argv)


def test_ctrl_c_is_one_line_and_status_130(monkeypatch, capsys):
    import edgediff.cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(edgediff.cli, "_devices", interrupted)
    code, _, err = run(capsys, "devices")
    assert (code, err) == (130, "edgediff: interrupted\n")


def test_sizes_outside_a_core_ml_export_is_refused(tmp_path, capsys):
    """--sizes shapes Core ML packages; given to an ONNX export it would be ignored: one line instead."""
    code, _, err = run(capsys, "export", "builtin", "--out", str(tmp_path / "x"), "--sizes", "512x512")
    one_line_error(code, err, "--sizes is for Core ML packages (--format coreml)")
    assert not (tmp_path / "x").exists()
