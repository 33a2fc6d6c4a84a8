"""Property-based tests of argument checking (issue 11, item 5): whatever a caller passes, edgediff answers
with pictures or with one line saying what is wrong, never with another exception or a traceback.

The Python API: every `Pipeline.from_pretrained(...)` and `pipe(...)` either returns a GenerationResult
whose images are RGB PIL images of the requested (or derived) size, one per prompt x images per prompt
(or `cancelled=True` when the callback returned False), or raises EdgediffError (a ValueError) with a
non-empty one-line message. The command line: `generate` exits 0 having written its PNGs and `plan` exits
0 having printed its plan, or either exits 2 with exactly one stderr line starting "edgediff: error:",
no traceback, and nothing written.

How the calls are drawn: a valid call (every argument valid, of every accepted type: numpy scalars,
tuples, paths) with up to three of its arguments drawn instead from values valid and invalid mixed (None,
bytes such as b"\\xff\\xfe", NaN and inf, "5", 0, negatives, 10**6 steps, lone surrogates, which is what
Python makes of a command line that is not UTF-8, wrong-shaped or complex latents, callbacks that cannot
be called). The valid rest of the call carries each bad value past the checks before it, to where it
would do harm; a call with nothing broken must make its pictures. Hypothesis shrinks a failure to the
fewest broken arguments, which names the culprit. The escapes found when these tests were written run
first, as @example cases.

Huge values must be refused up front, so every call runs under a watchdog: one still running after
CALL_SECONDS, or grown by CALL_MEMORY, fails. All on the built-in model (64x64, exported once per session
into the private cache); valid generations stay tiny (1-3 steps, sides 16-128) and the examples are
derandomized, so CI runs the same ones every time.
"""

from __future__ import annotations

import _thread
import math
import signal
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import event as _event
from hypothesis import strategies as st
from PIL import Image
from pictures import centre_mask, scene

from edgediff import EdgediffError, GenerationResult, Pipeline
from edgediff.cli import main
from edgediff.engine.noise import MAX_SEED
from edgediff.engine.schedulers import SCHEDULERS

CALL_SECONDS = 6.0  # a valid call here takes about 0.5 s (2 s for 4 images at 128x128); a refusal, ms
CALL_MEMORY = 2 * 2**30  # bytes the process may grow by in one call; a valid one needs about 0.1 GB
NATIVE = 64  # the built-in model's size
SIDE_STEP = 16  # its UNet halves the 1/8-size latents once, so sides are multiples of 16
SCENE = (40, 24)  # files["png"]: an init image whose derived size is a multiple of 8, not of 16
MAX_BROKEN = 3  # arguments drawn from the mixed values in one call


def event(text: str) -> None:
    """Counted in --hypothesis-show-statistics, whose report cannot hold a lone surrogate (a message may
    quote one)."""
    _event(text.encode("utf-8", "backslashreplace").decode())


def _settings(examples: int):
    # derandomize: CI runs the same examples every time; no example database to carry between runs
    # no explain phase: it reruns a failure hundreds of times to say which parts did not matter
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None, print_blob=False,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------------------
# Fixtures: the model and its pipeline once per module; files that path arguments name


@pytest.fixture(scope="module")
def model(builtin_model) -> Path:
    return builtin_model  # conftest's: exported once for the session


@pytest.fixture(scope="module")
def pipe(model):
    return Pipeline.from_pretrained(model, backend="cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    scene(*SCENE).save(root / "scene.png")
    scene(48, 32).save(root / "scene16.png")
    centre_mask(32, 32).save(root / "mask.png")
    (root / "junk.png").write_bytes(b"\x89PNG but not really")
    (root / "folder.png").mkdir()
    (root / "empty").mkdir()
    return {"png": root / "scene.png", "png16": root / "scene16.png", "mask": root / "mask.png",
            "junk": root / "junk.png", "dir": root / "folder.png", "missing": root / "missing.png",
            "empty-dir": root / "empty"}


class File:
    """A path drawn by name (strategies are built before the fixtures exist); `files` resolves it."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return f"File({self.name!r})"


def resolve(value, files):
    return files[value.name] if isinstance(value, File) else value


class Latents:
    """Initial latents drawn by kind; the test builds them for the shape the request needs."""

    def __init__(self, kind: str):
        self.kind = kind

    def __repr__(self):
        return f"Latents({self.kind!r})"

    def build(self, shape: tuple[int, int, int, int]):
        n, c, h, w = shape
        noise = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        return {"right": noise, "float64": noise.astype(np.float64), "int": np.zeros(shape, np.int64),
                "nan": np.full(shape, np.nan, np.float32), "inf": np.full(shape, np.inf, np.float32),
                "complex": noise.astype(np.complex64) * 1j, "batch+1": np.zeros((n + 1, c, h, w), np.float32),
                "3-channels": np.zeros((n, 3, h, w), np.float32),
                "swapped": np.zeros((n, c, w + 1, h), np.float32), "flat": noise.reshape(-1),
                "empty": np.zeros((0,), np.float32), "list": noise.tolist(), "string": "noise",
                "objects": np.array([object()] * 4), "none-list": [None]}[self.kind]


def stop(step, total, latents):
    return False


def go_on(step, total, latents):
    return None


def say_yes(step, total, latents):
    return True


# ---------------------------------------------------------------------------------------------------------
# Values valid and invalid mixed, per argument of pipe(...)

ODD_TEXT = ["", " ", "\x00", "a\nb", "\t\r", "🙂" * 30, "x " * 400, "\u202e\u0301\u200b", "a" * 5000,
            "日本語のプロンプト", "<|endoftext|>"]
SURROGATES = "\udcff\udcfe"  # b"\xff\xfe" on a command line, as Python decodes argv
JUNK = [None, "2", "x", "", b"2", [2], 1 + 1j, True, False, object()]

text = st.one_of(st.text(max_size=30), st.sampled_from(ODD_TEXT))
any_prompt = st.one_of(
    text, st.lists(text, min_size=1, max_size=2), st.tuples(text), st.binary(max_size=4), st.integers(),
    st.sampled_from([SURROGATES, [SURROGATES], None, 7, 1.5, b"a cat", b"\xff\xfe", [], (), [b"a"], [None],
                     ["a", 3], {"a": 1}, np.str_("a cat"), np.array(["a", "b"])]))
MIXED = {
    "prompt": any_prompt,
    "negative_prompt": st.one_of(st.none(), any_prompt),
    "num_inference_steps": st.one_of(
        # 4 to 1000 steps (the training schedule's length) are valid and slow, 30 a second here: left out
        st.integers(-5, 3), st.integers(1001, 1100),
        st.sampled_from([np.int64(2), np.uint8(3), 0, -1, -2**63, 10**6, 10**30, 2**63, 2.0, 2.5,
                         np.float64(2.0), math.nan, math.inf, -math.inf, np.int64(10**6), *JUNK])),
    "guidance_scale": st.one_of(
        st.floats(-1, 12), st.integers(-3, 12),
        st.sampled_from([np.float32(7.5), np.int64(3), math.nan, math.inf, -math.inf, 1e308, 1e30, -1e-300,
                         *JUNK])),
    "width": st.one_of(
        st.integers(-9, 136), st.sampled_from([0, 8, 24, 40, -8, 10**6, 2**31, 10**30, 64.0, 63.5, math.nan,
                                               math.inf, np.int64(64), np.uint16(48), np.float32(32), *JUNK])),
    "seed": st.one_of(
        st.integers(-3, MAX_SEED + 2),
        st.sampled_from([MAX_SEED + 1, 10**30, -10**30, np.int64(-1), np.int64(-5), np.uint64(2**64 - 1), 1.5,
                         42.0, math.nan, math.inf, *JUNK])),
    "scheduler": st.one_of(
        st.text(max_size=8), st.sampled_from(["", "heun", "EULER", "euler ", "euler\n", 3, b"euler", ["euler"],
                                              True, np.str_("euler"), SURROGATES])),
    "num_images_per_prompt": st.sampled_from([0, -1, 3, 10**6, 10**30, 2**63, 1.0, 1.5, math.nan, math.inf,
                                              np.int64(10**6), *JUNK]),
    "image": st.one_of(
        st.builds(Image.new, st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "1", "I", "I;16", "F", "CMYK",
                                              "YCbCr", "HSV"]),
                  st.tuples(st.integers(0, 72), st.integers(0, 72))),
        st.sampled_from([File("png"), File("junk"), File("dir"), File("missing"), 3, b"\x89PNG", "", "\x00",
                         np.zeros((16, 16, 3), np.uint8), [Image.new("RGB", (16, 16))], SURROGATES])),
    "strength": st.one_of(
        st.floats(0, 1), st.sampled_from([np.float32(0.5), 1, 0, -0.1, 1.1, 2, math.nan, math.inf, -math.inf,
                                          *JUNK])),
    "mask_image": st.one_of(
        st.builds(Image.new, st.sampled_from(["L", "1", "RGB", "RGBA", "F", "I;16"]),
                  st.tuples(st.integers(0, 72), st.integers(0, 72))),
        st.sampled_from([File("mask"), File("junk"), File("missing"), 0.5, np.ones((16, 16), np.uint8)])),
    "latents": st.sampled_from([Latents(k) for k in (
        "right", "float64", "int", "nan", "inf", "complex", "batch+1", "3-channels", "swapped", "flat", "empty",
        "list", "string", "objects", "none-list")]),
    "callback": st.sampled_from([stop, go_on, 3, "stop", [], object(), None]),
}
MIXED["height"] = MIXED["width"]
ARGUMENTS = sorted(MIXED)


@st.composite
def calls(draw):
    """(prompt, kwargs, broken): a valid call but for the arguments named in `broken`, drawn from MIXED."""
    broken = draw(st.sets(st.sampled_from(ARGUMENTS), max_size=MAX_BROKEN))

    def arg(name, valid):
        return draw(MIXED[name]) if name in broken else draw(valid)

    def kind(*types):  # the same value as a Python or a numpy scalar: both are accepted
        return st.sampled_from(types)

    def whole(lo, hi):
        return st.builds(lambda n, t: t(n), st.integers(lo, hi), kind(int, np.int64, np.int32))

    prompt = arg("prompt", st.one_of(st.text(max_size=30), st.sampled_from(ODD_TEXT),
                                     st.builds(lambda p, t: t(p), st.lists(st.text(max_size=20), min_size=1,
                                                                           max_size=2), kind(list, tuple))))
    n = len(prompt) if isinstance(prompt, (list, tuple)) and prompt else 1
    steps = arg("num_inference_steps", whole(1, 3))
    side = st.one_of(st.none(), st.builds(lambda k, t: t(k * SIDE_STEP), st.integers(1, 128 // SIDE_STEP),
                                          kind(int, np.int64, np.uint16)))
    negatives = st.one_of(st.none(), st.text(max_size=20),
                          st.lists(st.text(max_size=10), min_size=n, max_size=n))
    guidance = st.one_of(st.integers(0, 12),
                         st.builds(lambda x, t: t(x), st.floats(0, 12), kind(float, np.float32, np.float64)))
    seed = st.one_of(st.none(), st.just(-1),
                     st.builds(lambda s, t: t(s), st.integers(0, MAX_SEED), kind(int, np.int64, np.uint32)))
    kwargs = dict(
        negative_prompt=arg("negative_prompt", negatives), num_inference_steps=steps,
        guidance_scale=arg("guidance_scale", guidance), width=arg("width", side), height=arg("height", side),
        seed=arg("seed", seed),
        scheduler=arg("scheduler", st.one_of(st.none(), st.sampled_from(sorted(SCHEDULERS)))),
        num_images_per_prompt=arg("num_images_per_prompt", whole(1, 2)),
        latents=arg("latents", st.sampled_from([None, None, Latents("right")])),
        callback=arg("callback", st.sampled_from([None, go_on, stop, say_yes])))
    # img2img a third of the time, half of that inpainting: an RGB picture (or its path) whose sides are
    # multiples of 16, and a strength that leaves at least one of the steps to run
    sides = st.integers(1, 64 // SIDE_STEP).map(lambda k: k * SIDE_STEP)
    kwargs["image"] = arg("image", st.one_of(st.none(), st.none(), st.builds(scene, sides, sides),
                                             st.just(File("png16"))))
    least = 1 / steps if isinstance(steps, (int, np.integer)) and 1 <= steps <= 3 else 1.0
    kwargs["strength"] = arg("strength", st.builds(lambda x, t: t(x), st.floats(least, 1),
                                                   kind(float, np.float32)))
    masks = st.one_of(st.none(), st.builds(centre_mask, st.integers(8, 64), st.integers(8, 64)),
                      st.just(File("mask")))
    kwargs["mask_image"] = arg("mask_image", masks if kwargs["image"] is not None else st.none())
    return prompt, kwargs, broken


# ---------------------------------------------------------------------------------------------------------
# What a call must answer


def whole_number(value) -> int | None:
    """A count or a side as the caller meant it, where that is unambiguous (bools are not numbers)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    return None


def expected(prompt, per_prompt, width, height, image) -> tuple[int | None, tuple | None]:
    """(number of images, (width, height)) a call must return if it accepts these arguments; None where
    nothing valid can come of them, so that the call must refuse. A side left to the init image is
    ("derived", the image's side)."""
    if isinstance(prompt, str):
        n = 1
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        n = len(prompt)
    else:
        n = None
    k = whole_number(per_prompt)
    count = n * k if n is not None and k is not None and k >= 1 else None

    def side(value, from_image):
        if value is None:
            return NATIVE if from_image is None else ("derived", from_image)
        whole = whole_number(value)
        return whole if whole is not None and whole > 0 else None

    source = image.size if isinstance(image, Image.Image) else None
    size = (side(width, source and source[0]), side(height, source and source[1]))
    return count, (None if None in size else size)


def latent_shape(count, size) -> tuple[int, int, int, int]:
    """The shape right latents have for the request (a stand-in where the request has none)."""
    def one(want):
        if isinstance(want, tuple):
            return want[1] // 8 if want[1] >= 8 else NATIVE // 8
        return want // 8 if want < 4096 else NATIVE // 8
    w, h = (NATIVE, NATIVE) if size is None else (one(size[0]) * 8, one(size[1]) * 8)
    return (count if count and count < 16 else 1, 4, h // 8, w // 8)


def check_refusal(error: BaseException) -> None:
    """An EdgediffError with a non-empty one-line message; anything else fails the test as itself."""
    if not isinstance(error, EdgediffError):
        raise error
    message = str(error)
    assert message.strip(), f"{type(error).__name__} with an empty message"
    assert "\n" not in message, f"a message of {message.count(chr(10)) + 1} lines: {message!r}"
    event(f"refused: {message[:40]}")


def check_images(result, count, size, callback) -> None:
    assert isinstance(result, GenerationResult), type(result)
    if result.cancelled:
        event("cancelled")
        assert callback is stop, f"cancelled, but the callback was {callback!r}"
        assert result.images == []
        return
    event("made images")
    assert callback is not stop, "the callback returned False and the call was not cancelled"
    assert count is not None and size is not None, "accepted arguments that cannot make a valid request"
    assert len(result.images) == count, (len(result.images), count)
    for im in result.images:
        assert isinstance(im, Image.Image) and im.mode == "RGB", im
        for got, want in zip(im.size, size):
            if isinstance(want, tuple):  # derived from the init image: a multiple of SIDE_STEP no larger than it
                assert got > 0 and got % SIDE_STEP == 0 and (got <= want[1] or want[1] < SIDE_STEP), (im.size, want)
            else:
                assert got == want, (im.size, size)


class _Overrun(BaseException):
    """Raised inside a call that ran too long or grew too much; a BaseException, so that no `except
    Exception` in the code under test turns it into an answer."""


@contextmanager
def watchdog(what: str):
    """Fails the test when the call inside runs past CALL_SECONDS or grows the process by CALL_MEMORY.
    A thread watches and interrupts the main thread with a simulated signal (no signal is sent, so ONNX
    Runtime's threads never see one), which stops a loop in Python too. It interrupts again until the
    call stops: an exception raised where Python ignores it (in a gc callback) is lost."""
    process = psutil.Process()
    start, base = time.monotonic(), process.memory_info().rss
    done = threading.Event()
    reason: list[str] = []

    def watch():
        while not done.wait(0.05):
            if not reason:
                rss = process.memory_info().rss
                if time.monotonic() - start > CALL_SECONDS:
                    reason.append(f"still running after {CALL_SECONDS:g} s")
                elif rss - base > CALL_MEMORY:
                    reason.append(f"grew by {(rss - base) / 2**30:.1f} GiB")
            if reason:
                _thread.interrupt_main(signal.SIGUSR1)

    def interrupt(signum, frame):
        if reason and not done.is_set():
            raise _Overrun(reason[0])

    old = signal.signal(signal.SIGUSR1, interrupt)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    except _Overrun as e:
        raise AssertionError(f"{what}: {e}; a value this large must be refused up front") from None
    finally:
        done.set()
        thread.join()
        signal.signal(signal.SIGUSR1, old)
    if reason:  # it did return, late, every interrupt lost
        raise AssertionError(f"{what}: took over {CALL_SECONDS:g} s; a value this large must be refused "
                             "up front")


# ---------------------------------------------------------------------------------------------------------
# The Python API


def api_call(broken: dict, **valid):
    """A 1-step call with the arguments of `broken`, for @example: escapes found before, kept as cases."""
    kwargs = dict(negative_prompt=None, num_inference_steps=1, guidance_scale=7.5, width=None, height=None,
                  seed=1, scheduler=None, num_images_per_prompt=1, latents=None, callback=None, image=None,
                  strength=1.0, mask_image=None)
    return "a red circle", {**kwargs, **valid, **broken}, set(broken)


@_settings(50)
@given(call=calls())
@example(call=api_call({}, num_inference_steps=np.int64(4), guidance_scale=np.float32(7.5), seed=np.uint32(5),
                       width=np.int64(64), num_images_per_prompt=np.int32(1)))  # numpy scalars are numbers
@example(call=api_call({"num_inference_steps": 10**6}))  # refused, not run for hours
@example(call=api_call({"width": 24}))  # a multiple of 8 the UNet cannot take (onnxruntime's Concat failed)
@example(call=api_call({"image": File("png")}))  # the same, with 40x24 derived from the init image
def test_call_returns_images_or_one_line_error(pipe, files, call):
    prompt, kwargs, broken = call
    picture = {"png": scene(*SCENE), "png16": scene(48, 32)}.get(getattr(kwargs["image"], "name", None),
                                                                 kwargs["image"])
    kwargs = {name: resolve(value, files) for name, value in kwargs.items()}
    count, size = expected(prompt, kwargs["num_images_per_prompt"], kwargs["width"], kwargs["height"], picture)
    if isinstance(kwargs["latents"], Latents):
        kwargs["latents"] = kwargs["latents"].build(latent_shape(count, size))
    event(f"broken arguments: {len(broken)}")
    try:
        with watchdog("pipe(...)"):
            result = pipe(prompt, **kwargs)
    except Exception as e:
        check_refusal(e)
        assert broken, f"refused a valid call: {e}"
        return
    check_images(result, count, size, kwargs["callback"])


OPEN_VALID = {"path": ["model", "builtin"], "backend": ["cpu", "auto"], "safety_checker": [True, False],
              "memory_budget": [None, "4GB", 2**32, np.int64(2**33)]}
OPEN_MIXED = {"path": [File("missing"), File("empty-dir"), File("junk"), None, 3, b"builtin", SURROGATES],
              "backend": ["gpu", "cuda", "CPU", "", None, 0, ["cpu"], SURROGATES],
              "safety_checker": ["no", None, 0, np.bool_(False)],
              "memory_budget": ["512MB", "1KB", "7 GiB", "x", "", 0, -1, 10**30, 2.5e9, math.nan, math.inf,
                                b"4GB", "1e3GB", True]}


@st.composite
def opens(draw):
    broken = draw(st.sets(st.sampled_from(sorted(OPEN_VALID)), max_size=2))
    return {name: draw(st.sampled_from((OPEN_MIXED if name in broken else OPEN_VALID)[name]))
            for name in OPEN_VALID}, broken


@_settings(6)
@given(command=opens())
@example(command=({"path": "model", "backend": ["cpu"], "safety_checker": True, "memory_budget": None},
                  {"backend"}))  # TypeError: unhashable type: 'list'
def test_from_pretrained_opens_or_one_line_error(model, files, command):
    kwargs, broken = dict(command[0]), command[1]
    path = kwargs.pop("path")
    path = model if path == "model" else resolve(path, files)
    try:
        with watchdog("from_pretrained and a 1-step call"):
            pipe = Pipeline.from_pretrained(path, **kwargs)
            result = pipe("a red circle", num_inference_steps=1, seed=1)
    except Exception as e:
        check_refusal(e)
        assert broken, f"refused a valid call: {e}"
        return
    check_images(result, 1, (NATIVE, NATIVE), None)


# ---------------------------------------------------------------------------------------------------------
# The command line: flag values are strings, as a shell hands them over; None leaves a flag out


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    with watchdog(f"edgediff {argv[0]}"):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's exit: the status the shell would see
            code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def check_cli_refusal(code: int, err: str, broken) -> None:
    assert "Traceback" not in err, err
    assert code == 2, f"exit status {code}; stderr: {err!r}"
    lines = [line for line in err.splitlines() if line.startswith("edgediff: error:")]
    assert len(lines) == 1, f"{len(lines)} 'edgediff: error:' lines in stderr: {err!r}"
    assert broken, f"refused a valid command: {lines[0]}"
    event(f"refused: {lines[0][17:57]}")


def flags(draw, broken, valid: dict, mixed: dict) -> dict:
    """Each flag's value (None: left out), from `mixed` for the flags in `broken`, else from `valid`."""
    return {name: draw(st.one_of(st.none(), st.sampled_from(mixed[name])) if name in broken else valid[name])
            for name in valid}


def none_or(*values):
    return st.sampled_from([None, *values])


GENERATE_MIXED = {
    "prompt": ["", SURROGATES, "-a cat", "--", "-1", "x " * 400, "\x00", "🙂"],
    "--steps": ["0", "-1", "1000000", "x", "2.5", "", "1e3", "٣", " 2", "10" + "0" * 30],
    "--model": ["builtin", File("missing"), File("empty-dir"), File("junk"), File("png")],
    "--negative": ["", "blurry", SURROGATES, "x " * 300],
    "--guidance": ["1", "0", "-1", "nan", "inf", "1e400", "x", "", "7,5"],
    "--scheduler": ["heun", "", "EULER", *sorted(SCHEDULERS)],
    "--width": ["8", "24", "40", "0", "-16", "65", "x", "64.0", "1000000", "٣٢"],
    "--height": ["16", "40", "0", "-64", "1e3", "99999999999999999999"],
    "--seed": [str(MAX_SEED + 1), "-5", "x", "1.5", "99999999999999999999"],
    "--batch": ["0", "-1", "3", "x", "1000000", "10" + "0" * 30],
    "--init-image": [File("png"), File("junk"), File("dir"), File("missing"), "", SURROGATES],
    "--strength": ["0.5", "0", "-0.1", "1.5", "nan", "x"],
    "--mask": [File("mask"), File("junk"), File("missing")],
    "--backend": ["gpu", "cuda", ""],
    "--budget": ["1KB", "0", "-1", "x", "nan", "1e3GB", "99999999999TB", ""],
    "--out": ["out.jpg", "out", "dir.png", ".png", "sub/out.png", "OUT.PNG", "taken.png"],
}


@st.composite
def generate_commands(draw):
    broken = draw(st.sets(st.sampled_from(sorted(GENERATE_MIXED)), max_size=MAX_BROKEN))
    steps = draw(st.sampled_from(["1", "2", "3"]))
    image = draw(st.sampled_from([None, None, File("png16")]))
    valid = {
        "prompt": st.one_of(st.text(max_size=30), st.sampled_from(ODD_TEXT)).filter(
            lambda p: not p.startswith("-")),  # "-a cat" is an unknown option to argparse: in the mixed values
        "--steps": st.just(steps), "--model": st.just("model"),
        "--negative": st.one_of(st.none(), st.text(max_size=20).filter(lambda p: not p.startswith("-"))),
        "--guidance": none_or("0", "1", "7.5", "12"), "--scheduler": none_or(*sorted(SCHEDULERS)),
        "--width": none_or("16", "64", "128"), "--height": none_or("32", "64", "112"),
        "--seed": none_or("-1", "0", "42", str(MAX_SEED)), "--batch": none_or("1", "2"),
        "--init-image": st.just(image),
        # the default strength, 0.8, leaves no step of 1 (diffusers' rule: int(steps * strength) >= 1)
        "--strength": st.just("1") if steps == "1" else none_or("0.5", "1"),
        "--mask": none_or(File("mask")) if image else st.none(),
        "--backend": none_or("cpu", "auto"), "--budget": none_or("4GB"), "--out": none_or("out.png", "a.b.png"),
    }
    return flags(draw, broken, valid, GENERATE_MIXED), broken


def cli_command(names, broken: dict):
    """A valid 1-step command but for the flags of `broken`, for @example: escapes found before."""
    values = {name: None for name in names}
    values["--model"] = "model"
    if "prompt" in names:  # generate
        values.update({"prompt": "a red circle", "--steps": "1"})
    return {**values, **broken}, set(broken)


@_settings(15)
@given(command=generate_commands())
@example(command=cli_command(GENERATE_MIXED, {"--steps": "x"}))  # argparse's "edgediff generate: error:"
@example(command=cli_command(GENERATE_MIXED, {"--width": "24"}))  # exit 1, "unexpected error: RuntimeError"
@example(command=cli_command(GENERATE_MIXED, {"--batch": "1000000"}))  # a million --out paths checked first
def test_generate_writes_png_or_one_line_error(model, files, tmp_path, capsys, command):
    values, broken = dict(command[0]), command[1]
    work = tmp_path / uuid.uuid4().hex  # each example's own folder: what it wrote, and only that
    work.mkdir()
    (work / "dir.png").mkdir()
    (work / "taken.png").write_bytes(b"someone's picture")
    before = sorted(work.rglob("*"))
    out = work / (values.pop("--out") or "out.png")
    model_arg = values.pop("--model") or "model"
    argv = ["generate", values.pop("prompt") or "", "--model", str(model) if model_arg == "model" else
            str(resolve(model_arg, files)), "--out", str(out)]
    for name, value in values.items():
        if value is not None:
            argv += [name, str(resolve(value, files))]
    event(f"broken flags: {len(broken)}")
    code, stdout, err = run_cli(capsys, argv)
    written = sorted(set(work.rglob("*")) - set(before))
    if code != 0:
        check_cli_refusal(code, err, broken)
        assert written == [], f"refused, and wrote {written}"
        return
    event("wrote PNGs")
    batch = int(values["--batch"] or "1")
    want = [out] if batch == 1 else [out.with_name(f"{out.stem}-{k + 1}{out.suffix}") for k in range(batch)]
    assert [p for p in written if p.is_file()] == sorted(want), (written, want, stdout)
    for path in want:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "RGB", (im.format, im.mode)
            for got, name in zip(im.size, ("--width", "--height")):
                if values[name] is not None:
                    assert got == int(values[name]), (im.size, values)


PLAN_MIXED = {
    "--model": ["builtin", File("missing"), File("empty-dir"), File("junk")],
    "--width": ["24", "8", "0", "-16", "x", "1000000", "99999999999999999999"],
    "--height": ["0", "-1", "7", "40", "٣٢"],
    "--batch": ["0", "-1", "x", "1000000", "10" + "0" * 30],
    "--guidance": ["nan", "inf", "-1", "x"],
    "--budget": ["1KB", "0", "-1", "x", "nan", "1e3GB", "99999999999TB", ""],
    "--backend": ["gpu", "cuda", ""],
}


@st.composite
def plan_commands(draw):
    broken = draw(st.sets(st.sampled_from(sorted(PLAN_MIXED)), max_size=MAX_BROKEN))
    valid = {"--model": st.just("model"), "--width": none_or("16", "64", "128"),
             "--height": none_or("32", "64"),
             "--batch": none_or("1", "4"), "--guidance": none_or("1", "7.5"), "--budget": none_or("4GB"),
             "--backend": none_or("cpu", "auto")}
    return flags(draw, broken, valid, PLAN_MIXED), broken


@_settings(40)
@given(command=plan_commands(), img2img=st.booleans())
@example(command=cli_command(PLAN_MIXED, {"--batch": "0"}), img2img=False)  # planned x0
@example(command=cli_command(PLAN_MIXED, {"--width": "0"}), img2img=False)  # planned 64
@example(command=cli_command(PLAN_MIXED, {"--guidance": "nan"}), img2img=False)
def test_plan_prints_or_one_line_error(model, files, capsys, command, img2img):
    values, broken = dict(command[0]), command[1]
    model_arg = values.pop("--model") or "model"
    argv = ["plan", "--model", str(model) if model_arg == "model" else str(resolve(model_arg, files))]
    argv += [a for name, value in values.items() if value is not None for a in (name, value)]
    argv += ["--img2img"] if img2img else []
    code, stdout, err = run_cli(capsys, argv)
    if code != 0:
        check_cli_refusal(code, err, broken)
        return
    # a plan is for a request generate would take: sides positive multiples of SIDE_STEP, a batch, a real guidance
    w, h = (int(values[name] or NATIVE) for name in ("--width", "--height"))
    batch, guidance = int(values["--batch"] or 1), float(values["--guidance"] or 7.5)
    first = stdout.splitlines()[0]
    assert w > 0 and h > 0 and w % SIDE_STEP == 0 and h % SIDE_STEP == 0, f"accepted a {w}x{h} request: {first}"
    assert batch >= 1, f"accepted a batch of {batch}: {first}"
    assert math.isfinite(guidance) and guidance >= 0, f"accepted guidance {guidance}: {first}"
    assert f"{w}x{h} x{batch}" in first, stdout
