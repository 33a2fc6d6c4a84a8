"""Every mistake is one line: each class of bad input a probe of the API found getting through (issue 11)
raises EdgediffError (or its TypeError subclass) naming the argument and what to do, before any work;
valid values that looked odd to the old checks (numpy integers) are accepted. And one Pipeline called
from two threads gives each call the pictures it would get alone."""

from __future__ import annotations

import json
import shutil
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

import edgediff
from edgediff import EdgediffError
from edgediff.engine.errors import EdgediffTypeError
from edgediff.engine.images import MAX_INPUT_PIXELS
from edgediff.engine.schedulers import SCHEDULERS

FAST = dict(num_inference_steps=2, width=32, height=32, seed=1)  # the built-in model, about 20 ms a call


@pytest.fixture(scope="module")
def pipe(builtin_model):
    return edgediff.Pipeline.from_pretrained(builtin_model, backend="cpu")


def one_line_error(call, *words, kind=EdgediffError):
    with pytest.raises(kind) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and message.strip() == message and message, repr(message)
    for word in words:
        assert word in message, message
    return message


@pytest.mark.parametrize("prompt", [None, 5, 2.5, b"a red circle", b"\xff\xfe", [], [1], ["ok", None], {"a": 1}])
def test_prompts_that_are_not_text_are_type_errors(pipe, prompt):
    one_line_error(lambda: pipe(prompt, **FAST), "prompt must be a string", kind=EdgediffTypeError)


def test_bytes_prompts_are_told_to_decode(pipe):
    one_line_error(lambda: pipe(b"a cat", **FAST), "decode", kind=EdgediffTypeError)


def test_text_that_is_not_utf8_is_refused(pipe):
    # What Python makes of a command-line argument holding the bytes ff fe: lone surrogates.
    text = b"a red \xff\xfe circle".decode("utf-8", "surrogateescape")
    one_line_error(lambda: pipe(text, **FAST), "prompt is not valid UTF-8")
    one_line_error(lambda: pipe("a cat", negative_prompt=text, **FAST), "negative_prompt is not valid UTF-8")


@pytest.mark.parametrize("name, value", [
    ("num_inference_steps", "5"), ("num_inference_steps", 2.5), ("num_inference_steps", True),
    ("width", "32"), ("height", 32.0), ("seed", "42"), ("seed", 1.5), ("num_images_per_prompt", "2"),
    ("guidance_scale", "7.5"), ("strength", "0.5"), ("scheduler", 3), ("callback", 5), ("callback", "print"),
])
def test_values_of_the_wrong_type_are_type_errors(pipe, name, value):
    args = {**FAST, name: value}
    one_line_error(lambda: pipe("a cat", **args), name, kind=EdgediffTypeError)


@pytest.mark.parametrize("name, value, words", [
    ("width", 0, "width must be from 16"), ("height", 0, "height must be from 16"), ("width", -64, "width"),
    ("width", 44, "not a multiple of 16, which this model's UNet needs; try 48"),
    ("width", 10**9, "width must be from 16 to 16384"),
    ("guidance_scale", float("nan"), "guidance_scale must be a finite number"),
    ("guidance_scale", float("inf"), "guidance_scale must be a finite number"),
    ("guidance_scale", -1.0, "guidance_scale must be at least 0"),
    ("strength", float("nan"), "strength must be a finite number"), ("strength", 1.5, "from 0 to 1"),
    ("num_inference_steps", 0, "num_inference_steps must be from 1"),
    ("num_images_per_prompt", 0, "num_images_per_prompt must be at least 1"),
    ("seed", -2, "seed must be from 0 to 4294967295"), ("seed", 2**32, "(or -1 for a random seed)"),
])
def test_out_of_range_values_are_refused(pipe, name, value, words):
    args = {**FAST, name: value}
    if name == "strength":
        args["image"] = Image.new("RGB", (32, 32))
    one_line_error(lambda: pipe("a cat", **args), words)


def test_sides_the_unet_cannot_halve_are_refused_and_init_images_rounded_to_them(pipe):
    """The built-in model's UNet halves its 1/8-size latents once: sides are multiples of 16. A side of 24
    went into ONNX Runtime and failed there (a Concat of 1 and 2 columns), and so did an init image's."""
    assert pipe.model.size_multiple == 16
    one_line_error(lambda: pipe("a cat", **{**FAST, "width": 24}), "width 24 is not a multiple of 16")
    one_line_error(lambda: pipe("a cat", **{**FAST, "height": 40}), "height 40 is not a multiple of 16")
    result = pipe("a cat", image=Image.new("RGB", (40, 24)), strength=0.5, num_inference_steps=2, seed=1)
    assert result.images[0].size == (32, 16)
    result = pipe("a cat", image=Image.new("RGB", (8, 8)), strength=1.0, num_inference_steps=1, seed=1)
    assert result.images[0].size == (16, 16)


def test_a_backend_that_is_not_a_name_is_a_type_error(builtin_model):
    one_line_error(lambda: edgediff.Pipeline.from_pretrained(builtin_model, backend=["cpu"]),
                   "backend must be a backend's name", kind=EdgediffTypeError)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_more_steps_than_training_timesteps_are_refused_for_every_scheduler(pipe, scheduler):
    n = pipe.model.scheduler_config.num_train_timesteps  # 1000
    one_line_error(lambda: pipe("a cat", **{**FAST, "num_inference_steps": n + 1}, scheduler=scheduler),
                   "num_inference_steps")


@pytest.mark.parametrize("scheduler", ["pndm", "ddim"])
def test_leading_spacing_refuses_a_schedule_past_the_last_timestep(pipe, scheduler):
    """SD's steps_offset 1 with "leading" spacing gives t = 1000 at 1000 steps: an IndexError before."""
    message = one_line_error(lambda: pipe("a cat", **{**FAST, "num_inference_steps": 1000}, scheduler=scheduler),
                             "num_inference_steps 1000", "use at most 999")
    assert scheduler in message


def test_numpy_integers_are_whole_numbers(pipe):
    plain = pipe("a red circle", **FAST)
    numpy = pipe("a red circle", num_inference_steps=np.int64(2), width=np.int32(32), height=np.uint16(32),
                 seed=np.uint32(1), num_images_per_prompt=np.int8(1), guidance_scale=np.float32(7.5))
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(numpy.images[0]))


@pytest.mark.parametrize("latents, words", [
    (np.zeros((1, 4, 4, 4), np.complex64), "latents must be real numbers"),
    (np.full((1, 4, 4, 4), np.nan, np.float32), "latents hold NaN or infinite values"),
    (np.full((1, 4, 4, 4), 1e39), "latents hold NaN or infinite values"),  # inf once made float32
    (np.zeros((1, 4, 8, 8), np.float32), "latents have shape (1, 4, 8, 8); this request needs (1, 4, 4, 4)"),
    (np.array([object()] * 64, dtype=object).reshape(1, 4, 4, 4), "latents must be real numbers"),
    ([[1, 2], [3]], "latents must be an array"),
])
def test_bad_latents_are_refused(pipe, latents, words):
    one_line_error(lambda: pipe("a cat", latents=latents, **FAST), words)


@pytest.mark.parametrize("budget, words", [(0, "too small"), (-1, "too small"), ("0GB", "too small"),
                                           (float("nan"), "not a size"), ([4], "budget must be a size")])
def test_budgets_of_zero_or_less_are_refused(builtin_model, budget, words):
    one_line_error(lambda: edgediff.Pipeline.from_pretrained(builtin_model, backend="cpu", memory_budget=budget),
                   "budget", words)


def test_from_pretrained_needs_a_model(tmp_path):
    one_line_error(lambda: edgediff.Pipeline.from_pretrained(None), "from_pretrained needs a model",
                   kind=EdgediffTypeError)
    one_line_error(lambda: edgediff.Pipeline.from_pretrained(42), "not int", kind=EdgediffTypeError)


def png_header_only(path, width, height):
    """A PNG that declares width x height pixels and holds none: what a decompression bomb shows before
    its pixels are inflated."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [10_000, 50_000])  # 100 megapixels (300 MB as RGB); 2.5 gigapixels
def test_a_decompression_bomb_is_refused_under_the_pixel_limit(pipe, tmp_path, side):
    bomb = png_header_only(tmp_path / "bomb.png", side, side)
    limit = f"{MAX_INPUT_PIXELS // 2**20} megapixels"
    message = one_line_error(lambda: pipe("a cat", image=str(bomb), strength=0.5, **FAST), "init image", limit)
    assert "bomb.png" in message
    if side == 10_000:  # under PIL's own bomb error: refused from the header by edgediff's limit
        assert "10000x10000" in message
    one_line_error(lambda: pipe("a cat", image=Image.new("RGB", (32, 32)), mask_image=str(bomb), **FAST),
                   "mask", limit)
    one_line_error(lambda: pipe("a cat", image=Image.new("L", (9000, 8000)), strength=0.5, **FAST),
                   "init image is 9000x8000", limit)


@pytest.fixture
def damaged(builtin_model, tmp_path):
    """damaged(edit) -> a copy of the built-in model's export with `edit(folder)` applied."""
    def make(edit):
        folder = shutil.copytree(builtin_model, tmp_path / "model")
        edit(folder)
        return folder
    return make


def edit_json(relative, **changes):
    def edit(folder):
        path = folder / relative
        data = json.loads(path.read_text())
        data.update(changes)
        path.write_text(json.dumps(data))
    return edit


@pytest.mark.parametrize("edit, words", [
    (lambda f: (f / "tokenizer" / "tokenizer.json").write_text("{ this is not json"), ["tokenizer.json"]),
    (edit_json("tokenizer/tokenizer_config.json", model_max_length="long"), ["tokenizer_config.json", "model_max_length"]),
    (edit_json("scheduler/scheduler_config.json", prediction_type="banana"), ["scheduler_config.json", "prediction_type", "banana"]),
    (edit_json("scheduler/scheduler_config.json", beta_schedule="cosine"), ["scheduler_config.json", "beta_schedule"]),
    (edit_json("scheduler/scheduler_config.json", num_train_timesteps="many"), ["scheduler_config.json", "num_train_timesteps"]),
    (edit_json("scheduler/scheduler_config.json", beta_end=float("nan")), ["scheduler_config.json", "beta_end"]),
    (edit_json("scheduler/scheduler_config.json", steps_offset=-3), ["scheduler_config.json", "steps_offset"]),
    (edit_json("scheduler/scheduler_config.json", clip_sample="yes"), ["scheduler_config.json", "clip_sample"]),
    (edit_json("edgediff.json", components=["unet", "vae"]), ["edgediff.json", "components"]),
    (lambda f: (f / "edgediff.json").write_text("[1, 2, 3]"), ["edgediff.json", "not a JSON object"]),
    (edit_json("edgediff.json", components={"unet": {"activations": {"fit": "big"}}}), ["edgediff.json", "unet.activations.fit"]),
    (edit_json("edgediff.json", name=["x"]), ["edgediff.json", "'name'"]),
    (edit_json("unet/config.json", sample_size="large"), ["unet/config.json", "sample_size", "'large'"]),
    (edit_json("unet/config.json", in_channels=5.5), ["unet/config.json", "in_channels"]),
    (edit_json("vae_decoder/config.json", scaling_factor="x"), ["vae_decoder/config.json", "scaling_factor"]),
    (edit_json("vae_decoder/config.json", block_out_channels=7), ["vae_decoder/config.json", "block_out_channels"]),
])
def test_damaged_model_folders_name_the_file_and_field(damaged, edit, words):
    folder = damaged(edit)
    one_line_error(lambda: edgediff.Pipeline.from_pretrained(folder, backend="cpu"), *words)


def test_inf_from_an_fp32_decoder_is_not_blamed_on_fp16(pipe, monkeypatch):
    assert pipe.model.export_manifest["components"]["vae_decoder"]["dtype"] == "fp32"
    monkeypatch.setattr(type(pipe), "_run_decoder", lambda self, sessions, z, plan: np.full((1, 3, 32, 32), np.nan))
    message = one_line_error(lambda: pipe("a cat", **FAST), "runs in fp32", "weights")
    assert "fp16" not in message


def test_latents_that_diverge_are_named_before_the_decoder(pipe):
    message = one_line_error(lambda: pipe("a cat", **{**FAST, "guidance_scale": 1e38}), "denoised latents",
                             "guidance_scale")
    assert "decoder" not in message


def test_a_ckpt_that_is_no_pickle_is_called_damaged_not_unsafe(tmp_path):
    pytest.importorskip("torch")
    from edgediff.export.single_file import read_checkpoint

    garbage = tmp_path / "model.ckpt"
    garbage.write_bytes(b"\x80\x04garbage that is no pickle" * 10)
    message = one_line_error(lambda: read_checkpoint(garbage), "not a valid PyTorch checkpoint", "re-download")
    assert "unpickling" not in message


def test_two_threads_get_the_pictures_each_would_get_alone(pipe):
    """Different prompts, sizes, seeds and schedulers at once, on one Pipeline. Before the lock, the
    second call's text embeddings replaced the first's in the UNet's IO binding (a wrong picture), and
    a streamed plan freed a session the other thread was running (a segmentation fault)."""
    jobs = [dict(prompt="a red circle on a blue background", width=64, height=64, seed=3, scheduler="euler"),
            dict(prompt="a large white star on a purple background", width=48, height=32, seed=9,
                 scheduler="dpmpp_2m", negative_prompt="green")]
    alone = [np.asarray(pipe(**job, num_inference_steps=6).images[0]) for job in jobs]
    results: dict[tuple[int, int], np.ndarray] = {}
    errors = []

    def worker(k: int) -> None:
        try:
            for r in range(3):
                results[k, r] = np.asarray(pipe(**jobs[k], num_inference_steps=6).images[0])
        except Exception as e:  # reported below, with the thread's view
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(results) == 6
    for (k, r), image in results.items():
        assert np.array_equal(image, alone[k]), f"thread {k}, call {r}: not the picture it makes alone"


@pytest.mark.parametrize("argv, words", [
    (["plan", "--batch", "0"], "--batch must be from 1 to 1000, not 0"),
    (["plan", "--width", "0"], "width must be from 16"),
    (["plan", "--height", "40"], "height 40 is not a multiple of 16"),
    (["plan", "--guidance", "nan"], "--guidance must be a finite number"),
    (["plan", "--guidance", "-1"], "--guidance must be at least 0"),
    (["generate", "a cat", "--batch", "1000000"], "--batch must be from 1 to 1000"),
    (["generate", "a cat", "--width", "24"], "width 24 is not a multiple of 16"),
])
def test_the_command_line_refuses_what_the_api_refuses(builtin_model, tmp_path, capsys, argv, words):
    """`plan` checks what `generate` checks (it planned batch 0 and width 0), and a huge --batch is
    refused before a million output paths are checked (35 s)."""
    from edgediff.cli import main

    code = main([*argv, "--model", str(builtin_model)] + (["--out", str(tmp_path / "o.png")]
                                                         if argv[0] == "generate" else []))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and lines[-1].startswith("edgediff: error:") and words in lines[-1], err
    assert "Traceback" not in err and not list(tmp_path.iterdir())
