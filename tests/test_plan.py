"""The memory planner: choices on simulated machines, refusals that say what would fit, the real CPU
path under a budget, the tiling it relies on, and the fp16 guard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import hosts
import numpy as np
import pytest

from edgediff import Pipeline
from edgediff.backends.base import Device
from edgediff.engine.errors import EdgediffError
from edgediff.engine.plan import GiB, RUNGS, ComponentFacts, Request, _plan, make_plan, parse_budget
from edgediff.engine.tiling import starts, tiled

# SD 1.5's components as edgediff exports them, measured: `python -m edgediff.bench.export_memory` writes
# the export of bench/sd15.py's model, and its edgediff.json gives bytes on disk and the activation
# profile of each graph (export/memory_profile.py), fp32. An fp16 export halves both.
SD15_FP32 = {
    "text_encoder": ComponentFacts(491942596, (0.0, 3546972.0, 0.0)),
    "unet": ComponentFacts(3439224666, (0.0, 15332.2, 83.072)),
    "vae_encoder": ComponentFacts(136717885, (0.0, 131473.9, 0.0)),
    "vae_decoder": ComponentFacts(198014423, (0.0, 262127.9, 0.0215)),
    # the split decoder (`python -m edgediff.bench.tiled_vae` exports it): head whole, tail in tiles
    "vae_decoder_head": ComponentFacts(108180144, (0.0, 16357.5, 0.0355)),
    "vae_decoder_tail": ComponentFacts(90231466, (0.0, 328014.3, 0.0),
                                       {"margin": 12, "norms": 19, "groups": 32, "channels": 512}),
}
SD15_FP16 = {k: ComponentFacts(v.weights // 2, tuple(c / 2 for c in v.fit), v.extra) for k, v in SD15_FP32.items()}


def sd15(dtype="fp32"):
    return SimpleNamespace(vae_scale_factor=8, export_manifest={"dtype": dtype, "attention": "standard"},
                           path=None), (SD15_FP16 if dtype == "fp16" else SD15_FP32)


MACHINES = {  # name -> (device, export dtype that suits it)
    "nvidia-12gb": (Device("cuda", "NVIDIA GeForce RTX 3060", ("CUDAExecutionProvider",), 12 * GiB, 11 * GiB,
                           fp16=True), "fp16"),
    "nvidia-4gb": (Device("cuda", "NVIDIA GeForce GTX 1050 Ti", ("CUDAExecutionProvider",), 4 * GiB,
                          int(3.6 * GiB)), "fp16"),
    "amd-8gb": (Device("rocm", "AMD Radeon RX 6600", ("MIGraphXExecutionProvider",), 8 * GiB, int(7.5 * GiB),
                       fp16=True), "fp16"),
    "m1-8gb": (Device("coreml", "Apple M1", ("CoreMLExecutionProvider",), 8 * GiB, int(4.5 * GiB),
                      unified_memory=True, fp16=True), "fp16"),
    "cpu-8gb": (Device("cpu", "Intel Core i5 (4 cores)", ("CPUExecutionProvider",), 8 * GiB, int(5.5 * GiB),
                       unified_memory=True), "fp32"),
}
RUNG_ORDER = [r[0] for r in RUNGS]


@pytest.mark.parametrize("machine", sorted(MACHINES))
def test_sd15_512_plans_fit_every_machine(machine):
    device, dtype = MACHINES[machine]
    model, facts = sd15(dtype)
    plan = make_plan(model, Request(512, 512), device, facts=facts)
    limit = min(7 * GiB, device.free_memory)
    assert plan.predicted_peak <= plan.budget == limit
    assert plan.backend == device.backend and plan.dtype == dtype
    assert "predicted peak" in plan.describe() and device.name in plan.describe()
    # the fastest that fits: every faster rung was predicted over the limit
    for rung in RUNGS[:RUNG_ORDER.index(plan.rung)]:
        assert _plan(model, facts, Request(512, 512), device, limit, *rung).predicted_peak > limit


def test_more_memory_never_gives_a_slower_plan():
    model, facts = sd15("fp16")
    rungs = []
    for free in (2, 3, 4, 6, 8, 12):
        device = Device("cuda", "card", ("CUDAExecutionProvider",), free * GiB, free * GiB, fp16=True)
        try:
            rungs.append(RUNG_ORDER.index(make_plan(model, Request(512, 512), device, facts=facts).rung))
        except EdgediffError:
            rungs.append(len(RUNG_ORDER))
    assert rungs == sorted(rungs, reverse=True) and rungs[-1] == 0 and rungs[0] > 0


def test_big_card_keeps_everything_resident_small_card_streams():
    model, facts = sd15("fp16")
    big = make_plan(model, Request(512, 512), MACHINES["nvidia-12gb"][0], facts=facts)
    small = make_plan(model, Request(512, 512), MACHINES["nvidia-4gb"][0], budget=3 * GiB, facts=facts)
    assert big.rung == "resident" and big.streamed == ()
    assert small.rung != "resident" and small.predicted_peak < big.predicted_peak


def test_2048_on_a_2gb_card_is_refused_with_what_would_fit():
    model, facts = sd15("fp16")
    card = Device("cuda", "NVIDIA GeForce GT 1030", ("CUDAExecutionProvider",), 2 * GiB, int(1.8 * GiB))
    with pytest.raises(EdgediffError) as e:
        make_plan(model, Request(2048, 2048), card, facts=facts)
    message = str(e.value)
    assert "2048x2048 needs at least" in message and "budget of" in message
    # SD 1.5's fp16 UNet alone is 1.6 GB: on this card no size fits, and the message says so
    assert "even 256x256 needs" in message


def test_a_smaller_size_is_offered_when_one_fits():
    model, facts = sd15("fp16")
    card = Device("cuda", "NVIDIA GeForce GTX 1650", ("CUDAExecutionProvider",), 4 * GiB, int(3.8 * GiB))
    with pytest.raises(EdgediffError, match=r"what would fit: \d+x\d+"):
        make_plan(model, Request(2048, 2048), card, facts=facts)


def test_budget_is_capped_by_free_memory():
    model, facts = sd15()
    device = Device("cpu", "cpu", ("CPUExecutionProvider",), 8 * GiB, 6 * GiB, unified_memory=True)
    plan = make_plan(model, Request(512, 512), device, budget=7 * GiB, facts=facts)
    assert plan.budget == 6 * GiB


@pytest.mark.parametrize("text,expected", [("7GB", 7 * GiB), ("4.5 GiB", int(4.5 * GiB)), ("512MB", 512 * 2**20),
                                           ("2g", 2 * GiB), ("1000000000", 10**9)])
def test_budgets_parse(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["7 gigs", "lots", "-1GB", ""])
def test_bad_budgets_are_refused(text):
    with pytest.raises(EdgediffError, match="not a size"):
        parse_budget(text)


# -- the command line -----------------------------------------------------------------------------

def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "edgediff.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def test_plan_command_plans_for_the_device_the_host_has(tiny, monkeypatch, capsys):
    from edgediff.cli import main

    model = str(tiny("sd1")[1])
    hosts.simulate(monkeypatch)  # a PC with onnxruntime's CPU build, whatever runs this test
    assert main(["plan", "--model", model, "--width", "128", "--height", "128", "--budget", "3GB"]) == 0
    out = capsys.readouterr().out
    assert "plan on cpu: 128x128" in out and "predicted peak" in out and "unet" in out
    hosts.simulate(monkeypatch, providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
                   nvml=hosts.fake_nvml("NVIDIA GeForce RTX 3060", 12 * GiB, 11 * GiB, (8, 6)))
    assert main(["plan", "--model", model, "--width", "128", "--height", "128", "--budget", "3GB"]) == 0
    out = capsys.readouterr().out
    assert "plan on cuda: 128x128" in out and "device: NVIDIA GeForce RTX 3060" in out


@pytest.mark.parametrize("args,words", [
    (["--budget", "7 gigs"], ["budget '7 gigs' is not a size"]),
    (["--backend", "quantum"], ["unknown backend 'quantum'"]),
])
def test_plan_bad_input_is_one_line(tiny, args, words):
    run = cli("plan", "--model", str(tiny("sd1")[1]), *args)
    errors = [l for l in run.stderr.splitlines() if l.startswith("edgediff: error:")]
    assert run.returncode == 2 and len(errors) == 1 and "Traceback" not in run.stderr, run.stderr
    for w in words:
        assert w in errors[0]


@pytest.mark.parametrize("providers, words", [
    (("CPUExecutionProvider",), "backend 'cuda' is not available here: onnxruntime-gpu is not installed"),
    # onnxruntime-gpu on a machine without an NVIDIA driver
    (("CUDAExecutionProvider", "CPUExecutionProvider"), "backend 'cuda' is not available here: CUDA provider "
                                                        "present but no NVIDIA driver found"),
])
def test_plan_on_a_backend_the_host_lacks_is_one_line(tiny, monkeypatch, capsys, providers, words):
    from edgediff.cli import main

    hosts.simulate(monkeypatch, providers=providers,
                   nvml=hosts.fake_nvml("", 0, 0, (0, 0), init_error="Driver Not Loaded"))
    assert main(["plan", "--model", str(tiny("sd1")[1]), "--backend", "cuda"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"edgediff: error: {words}")


@pytest.fixture(scope="module")
def builtin_onnx(builtin_model):
    return builtin_model  # conftest's, exported once for the session


@pytest.mark.slow
def test_cpu_generates_under_a_budget_that_forces_the_lowest_plan(builtin_onnx, tmp_path):
    """The real CPU backend, the built-in model at 512x512 (attention over 4096 latents makes it big):
    a budget just above the lowest rung's prediction; the measured peak must stay under it."""
    from edgediff.engine.model_folder import read_model_folder
    from edgediff.engine.plan import _plan, component_facts

    out = builtin_onnx

    pipe = Pipeline.from_pretrained(out, backend="cpu")
    request = Request(512, 512)
    model = read_model_folder(out)
    facts = component_facts(model)
    ladder = {r[0]: _plan(model, facts, request, pipe.device, 10 ** 12, *r).predicted_peak for r in RUNGS}
    leanest = min(ladder.values())
    # with fused attention (the default export) the lowest rung needs no sliced export and equals
    # streamed-lean; with any other export it is strictly leaner
    assert ladder["lowest"] == leanest < ladder["streamed"]
    budget = (leanest + min(v for v in ladder.values() if v > leanest)) // 2
    run = cli("generate", "a red circle", "--model", str(out), "--width", "512", "--height", "512", "--steps", "1",
              "--seed", "1", "--backend", "cpu", "--budget", str(budget), "--out", str(tmp_path / "p.png"))
    assert run.returncode == 0, run.stderr
    first_leanest = next(k for k, v in ladder.items() if v == leanest)
    assert f"{first_leanest} plan on cpu" in run.stdout
    measured = float(re.search(r"measured ([\d.]+) GB", run.stdout).group(1)) * GiB
    assert measured < budget, run.stdout


# -- tiles and the fp16 guard ---------------------------------------------------------------------

def test_tile_origins_cover_and_overlap():
    assert starts(64, 64, 8) == [0] and starts(40, 64, 8) == [0]
    for length, tile, overlap in [(64, 32, 8), (100, 32, 8), (96, 32, 0)]:
        s = starts(length, tile, overlap)
        assert s[0] == 0 and s[-1] + tile == length
        assert all(b - a <= tile - overlap or overlap == 0 and b - a == tile for a, b in zip(s, s[1:]))


def test_tiled_blending_is_exact_for_a_pointwise_decoder():
    """What tiling itself adds must be nothing: with a decoder that only upsamples, tiled == whole."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((1, 4, 40, 56)).astype(np.float32)
    up = lambda t: np.repeat(np.repeat(t[:, :3] * 2 + 1, 8, axis=2), 8, axis=3)  # noqa: E731
    whole = up(z)
    for tile, overlap in [(16, 4), (32, 8), (24, 0)]:
        np.testing.assert_allclose(tiled(up, z, tile, overlap, 8), whole, rtol=1e-6, atol=1e-6)
    down = lambda t: t[:, :, ::8, ::8] * 0.5  # noqa: E731  an "encoder"
    x = rng.standard_normal((1, 3, 320, 448)).astype(np.float32)
    np.testing.assert_allclose(tiled(down, x, 128, 64, 1 / 8), down(x), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_fp16_decoder_overflow_is_rerun_in_fp32(tiny, tmp_path):
    """An fp16 decoder that overflows (built by ONNX Runtime's plain conversion of a VAE whose residual
    stream exceeds 65504) is re-run from the fp32 graph the export keeps, and the result says so."""
    import onnx
    import torch
    from diffusers import AutoencoderKL
    from onnxruntime.transformers.onnx_model import OnnxModel

    from edgediff.engine.components import FP32_FALLBACK
    from edgediff.export.onnx_export import ExportOptions, export_onnx

    src = shutil.copytree(tiny("sd1")[0], tmp_path / "hot")
    vae = AutoencoderKL.from_pretrained(src / "vae")
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(8e4)
        vae.decoder.conv_in.bias.mul_(8e4)
    vae.save_pretrained(src / "vae")
    out = tmp_path / "fp16"
    export_onnx(src, out, ExportOptions(dtype="fp16"), profile_memory=False)
    assert (out / "vae_decoder" / FP32_FALLBACK).is_file()
    good = Pipeline.from_pretrained(out, backend="cpu")("a cat", num_inference_steps=2, seed=4)
    assert good.fp32_reruns == []  # the export's own fp16 decoder keeps the hot parts fp32

    naive = OnnxModel(onnx.load(str(out / "vae_decoder" / FP32_FALLBACK)))
    naive.convert_float_to_float16(keep_io_types=True)
    onnx.save(naive.model, str(out / "vae_decoder" / "model.onnx"))  # the black-image decoder
    rerun = Pipeline.from_pretrained(out, backend="cpu")("a cat", num_inference_steps=2, seed=4)
    assert rerun.fp32_reruns == ["vae_decoder"]
    assert np.asarray(rerun.images[0]).std() > 1
    assert np.abs(np.asarray(rerun.images[0], float) - np.asarray(good.images[0], float)).mean() < 3

    (out / "vae_decoder" / FP32_FALLBACK).unlink()
    with pytest.raises(EdgediffError, match="inf/NaN.*no fp32 decoder"):
        Pipeline.from_pretrained(out, backend="cpu")("a cat", num_inference_steps=2, seed=4)


def test_a_small_card_runs_the_text_encoder_on_the_host():
    model, facts = sd15("fp16")
    small = make_plan(model, Request(512, 512), MACHINES["nvidia-4gb"][0], budget=3 * GiB, facts=facts)
    assert small.on_host == ("text_encoder",) and "on the host CPU" in small.describe()
    big = make_plan(model, Request(512, 512), MACHINES["nvidia-12gb"][0], facts=facts)
    assert big.on_host == ()
    unified = make_plan(model, Request(512, 512), MACHINES["m1-8gb"][0], budget=3 * GiB, facts=facts)
    assert unified.on_host == ()  # one memory: nothing to spare by moving


# -- tiled decode with image-wide GroupNorm statistics ---------------------------------------------

def _split_decoder(folder):
    import onnxruntime as ort

    from edgediff.engine.components import VAE_DECODER_TAIL

    opened = {name: ort.InferenceSession(str(folder / name / "model.onnx"), providers=["CPUExecutionProvider"])
              for name in ("vae_decoder", "vae_decoder_head", "vae_decoder_tail")}
    extra = json.loads((folder / "edgediff.json").read_text())["components"][VAE_DECODER_TAIL.name]["extra"]

    def whole(z):
        return opened["vae_decoder"].run(None, {"latent_sample": z})[0]

    def head(z):
        return opened["vae_decoder_head"].run(None, {"latent_sample": z})[0]

    def tail(hidden, stats, mask, mix):
        return tuple(opened["vae_decoder_tail"].run(None, {"hidden": hidden, "norm_stats": stats,
                                                          "stats_mask": mask, "stats_mix": mix}))
    return whole, head, tail, extra


def _picture_latent(folder, size=512):
    """The built-in VAE's latent of a picture: what a tiled decode meets in practice."""
    import onnxruntime as ort
    from pictures import scene

    encoder = ort.InferenceSession(str(folder / "vae_encoder" / "model.onnx"), providers=["CPUExecutionProvider"])
    pixels = np.asarray(scene(size, size), np.float32).transpose(2, 0, 1)[None] / 127.5 - 1
    return encoder.run(None, {"sample": pixels})[0][:, :4]


def _db(a, b):
    return float(10 * np.log10(4 / np.mean((np.clip(a, -1, 1) - np.clip(b, -1, 1)) ** 2)))


def test_split_decoder_tiles_are_exact_given_image_wide_statistics(builtin_onnx):
    """Head then tail is the decoder; tiles with the tail's margin and the whole image's statistics
    reproduce the whole decode, and the tiles' own statistics merge into the whole image's."""
    from edgediff.engine.tiling import _tail_tiles

    whole, head, tail, extra = _split_decoder(builtin_onnx)
    z = _picture_latent(builtin_onnx)
    reference = whole(z)
    hidden = head(z)
    n, g = extra["norms"], extra["groups"]
    own, stats = tail(hidden, np.zeros((n, 1, g, 2), np.float32), np.ones((1, 1) + hidden.shape[2:], np.float32),
                      np.zeros(1, np.float32))
    assert _db(own, reference) > 100
    for tile in (48, 20):
        image, merged = _tail_tiles(tail, hidden, stats, tile, extra["margin"])
        assert image.shape == reference.shape
        assert _db(image, reference) > 80, tile
        np.testing.assert_allclose(merged, stats, rtol=1e-3, atol=1e-4)
    # without the margin, the tiles' edges show (measured: 31 dB with none, 38 with one hidden pixel)
    assert _db(_tail_tiles(tail, hidden, stats, 20, 1)[0], reference) < 60


def test_tiled_decode_of_512_is_35_db_against_the_whole(builtin_onnx):
    """The issue's bar, on a trained VAE (the built-in model's) and a picture's latent."""
    from edgediff.engine.tiling import shared_stats_decode

    whole, head, tail, extra = _split_decoder(builtin_onnx)
    z = _picture_latent(builtin_onnx)
    reference = whole(z)
    for tile in (48, 24):  # hidden pixels: the planner's 192 px core, and one that needs two levels
        shared = shared_stats_decode(head, tail, z, tile, extra["margin"], extra["norms"], extra["groups"])
        assert _db(shared, reference) >= 35.0, tile
    blended = tiled(whole, z, 24, 8, 8)  # per-tile statistics: what the split decoder is for
    assert _db(blended, reference) < 30.0


@pytest.mark.slow
def test_pipeline_decodes_in_split_tiles_when_planned(builtin_onnx, monkeypatch):
    """The generation path: a plan with split tiles decodes through head and tail, close to whole."""
    from dataclasses import replace

    from edgediff.engine.plan import SPLIT_TILE

    pipe = Pipeline.from_pretrained(builtin_onnx, backend="cpu", safety_checker=False)
    args = dict(prompt="a red circle", width=512, height=512, num_inference_steps=2, seed=5)
    whole = pipe(**args)
    assert not whole.plan.vae_tile
    plan = replace(whole.plan, vae_tile=SPLIT_TILE, vae_margin=52, streamed=("vae_decoder",), resident=())
    split = pipe(**args, plan=plan)
    assert split.plan.vae_margin and "vae_decoder_tail" not in pipe._sessions  # streamed: freed after
    got, want = (np.asarray(r.images[0], np.float64) for r in (split, whole))
    assert 10 * np.log10(255 ** 2 / np.mean((got - want) ** 2)) >= 35.0


def test_sd15_lean_plans_use_the_split_decoder():
    """On SD 1.5's measured facts the tiled rungs take the split decoder where it predicts less than
    decoding whole (1024x1024), and folders without it fall back to blended tiles."""
    device = MACHINES["cpu-8gb"][0]
    model, facts = sd15()
    request = Request(1024, 1024)
    lean = _plan(model, facts, request, device, 10 ** 12, *RUNGS[-2])
    whole = _plan(model, facts, request, device, 10 ** 12, *RUNGS[2])
    assert lean.vae_tile == 192 and lean.vae_margin == 12 * 4
    decode = {p.rung: next(s.peak for s in p.stages if s.name == "vae_decoder") for p in (lean, whole)}
    assert decode[lean.rung] < 0.5 * decode[whole.rung]
    assert "GroupNorm statistics" in lean.summary()
    older = {k: v for k, v in facts.items() if not k.startswith("vae_decoder_")}
    blended = _plan(model, older, request, device, 10 ** 12, *RUNGS[-2])
    assert blended.vae_tile == 256 and blended.vae_margin == 0 and blended.vae_overlap == 64


# A CUDA 12 context with cuBLAS and cuDNN loaded holds 300-700 MB of device memory outside ONNX Runtime's
# arena, whatever the card (NVIDIA's own figures grow with the SM count).
CUDA_CONTEXT_AT_LEAST = 300 * 2 ** 20


def test_cuda_allocator_limit_leaves_room_for_the_context(tiny, monkeypatch):
    """End to end on a simulated 4 GB card, through the registry and the real CUDA backend: the
    gpu_mem_limit each CUDA session asks ONNX Runtime for (recorded; with no GPU here each session then
    falls back to the CPU). Every arena is capped; together they leave a context's worth of the budget
    free; and the caps follow the budget."""
    hosts.simulate(monkeypatch, providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
                   nvml=hosts.fake_nvml("NVIDIA GeForce GTX 1050 Ti", 4 * GiB, int(3.6 * GiB), (6, 1)))
    asked = hosts.record_sessions(monkeypatch)
    caps = {}
    for budget in (1 * GiB, 2 * GiB):
        asked.clear()
        pipe = Pipeline.from_pretrained(tiny("sd1")[1], backend="cuda", safety_checker=False, memory_budget=budget)
        result = pipe("a red circle", width=64, height=64, num_inference_steps=2, seed=1)
        assert result.plan.backend == "cuda" and result.plan.budget == budget and result.images
        limits = [int(options["gpu_mem_limit"]) for _, providers in asked
                  if (options := hosts.provider_options(providers, "CUDAExecutionProvider")) is not None]
        assert len(limits) == len(result.plan.resident) and all(limit > 0 for limit in limits)
        assert sum(limits) <= budget - CUDA_CONTEXT_AT_LEAST
        caps[budget] = sum(limits)
    assert caps[1 * GiB] < caps[2 * GiB]


def test_sessions_share_the_cuda_budget_instead_of_each_taking_it(tiny):
    """Every session has its own CUDA arena: a resident plan that gave each one the whole budget as its
    gpu_mem_limit would bound none. The limits the sessions are opened with, through the pipeline's one
    opener, add up to at most the budget less the context, the UNet getting the largest share."""
    from types import SimpleNamespace

    from edgediff.backends import get_backend
    from edgediff.backends.base import Device
    from edgediff.engine.model_folder import read_model_folder
    from edgediff.engine.tokenizer import ClipTokenizer

    model = read_model_folder(tiny("sd1")[1])
    card = Device("cuda", "NVIDIA GeForce RTX 3060", ("CUDAExecutionProvider", "CPUExecutionProvider"),
                  total_memory=12 * GiB, free_memory=11 * GiB, fp16=True)
    cpu = get_backend("cpu")
    limits, dtypes = {}, {}

    def open_on_card(path, spec, device, memory_limit=None, overrides=None, dtype="fp32", precision="f32"):
        limits[spec.name], dtypes[spec.name] = memory_limit, dtype
        return cpu.open(path, spec, cpu.probe(), None, overrides)

    backend = SimpleNamespace(name="cuda", open=open_on_card, probe=lambda: card)
    tokenizer = ClipTokenizer.from_folder(model.path / "tokenizer")
    pipe = Pipeline(model, backend, card, tokenizer, safety_checker=False, memory_budget="6GB")
    result = pipe("a red circle", num_inference_steps=2, seed=1, width=64, height=64)
    plan = result.plan
    assert plan.rung == "resident" and set(limits) == {"text_encoder", "unet", "vae_decoder"}
    assert sum(limits.values()) <= plan.session_memory_limit < 6 * GiB
    assert all(v > 0 for v in limits.values())
    assert limits["unet"] == max(limits.values())
    # each session is opened with the dtype its graph was exported in, from the model folder
    assert dtypes == {name: model.dtype(name) for name in limits} and set(dtypes.values()) == {"fp32"}


def test_the_plan_sizes_the_vae_encoder_in_the_tiles_the_pipeline_encodes_in(tiny):
    """A tiled plan encodes an init image in its tiles, as it decodes: the pipeline runs the encoder on
    tiles of the plan's size, and the plan predicts the encoder's stage for one tile, the same as for a
    whole image of that size (before, it predicted the whole 512x512 encode it never ran)."""
    from edgediff.backends import get_backend
    from edgediff.engine.model_folder import read_model_folder
    from edgediff.engine.plan import TILE, component_facts

    model = read_model_folder(tiny("sd1")[1])
    facts, device = component_facts(model), get_backend("cpu").probe()
    rung = next(r for r in RUNGS if r[0] == "streamed-tiled")
    tiled = _plan(model, facts, Request(512, 512, img2img=True), device, 64 * GiB, *rung)
    one_tile = _plan(model, facts, Request(TILE, TILE, img2img=True), device, 64 * GiB, *rung)
    stage = {s.name: s for s in tiled.stages}["vae_encoder"]
    assert tiled.vae_tile == TILE and not one_tile.vae_tile
    assert stage.peak == {s.name: s for s in one_tile.stages}["vae_encoder"].peak
    whole = _plan(model, facts, Request(512, 512, img2img=True), device, 64 * GiB, "streamed", True, True, False, False)
    assert stage.peak < {s.name: s for s in whole.stages}["vae_encoder"].peak

    pipe = Pipeline.from_pretrained(tiny("sd1")[1], backend="cpu", safety_checker=False)
    sizes, session = [], pipe._session

    def spy(spec, plan=None):
        s = session(spec, plan)
        if spec.name == "vae_encoder":
            run = s.run
            s.run = lambda **inputs: sizes.append(inputs["sample"].shape[-2:]) or run(**inputs)
        return s

    pipe._session = spy
    from PIL import Image

    pipe("a red circle", image=Image.new("RGB", (512, 512), (200, 30, 30)), strength=0.5, num_inference_steps=2,
         seed=1, plan=tiled)
    assert sizes and max(max(hw) for hw in sizes) <= TILE


def test_folders_without_a_profile_get_sd15s_scaled_to_their_size(tiny, tmp_path):
    """optimum's folders carry no activation profile: the planner falls back to SD 1.5's, measured on
    its full-size export and scaled to the component's weights (activations grow with the square root
    of the weights: widths against widths squared). On the tiny model, whose own profile is known, the
    fallback lands within 3x of it for the text encoder and the VAE (the old, unscaled figures were
    13-98x too large); the UNet is left out, its export having fused attention and the fallback
    optimum's standard one."""
    import json
    import shutil

    from edgediff.engine.model_folder import read_model_folder
    from edgediff.engine.plan import component_facts

    folder = tmp_path / "no-profile"
    shutil.copytree(tiny("sd1")[1], folder)
    measured = component_facts(read_model_folder(folder))
    manifest = json.loads((folder / "edgediff.json").read_text())
    for c in manifest["components"].values():
        c["activations"] = {}
    (folder / "edgediff.json").write_text(json.dumps(manifest))
    fallback = component_facts(read_model_folder(folder))
    for name in ("text_encoder", "vae_encoder", "vae_decoder"):
        want, got = measured[name].activations(1, 8, 8), fallback[name].activations(1, 8, 8)
        assert want / 3 <= got <= want * 3, f"{name}: {got} against {want} measured"


def test_precision_is_the_plans_bf16_only_where_the_device_is_fast_at_it(tiny, monkeypatch):
    """precision="bf16" asks; the plan decides (bf16 on a device that says it is fast at bf16, f32
    elsewhere, saying why), and every session the pipeline opens gets the plan's precision."""
    model, facts = sd15()
    rung = RUNGS[0]
    fast = Device("openvino", "Intel Xeon (CPU)", ("OpenVINO:CPU",), 24 * GiB, 20 * GiB, unified_memory=True, bf16=True)
    slow = Device("openvino", "Intel Core i5 (CPU)", ("OpenVINO:CPU",), 24 * GiB, 20 * GiB, unified_memory=True)
    assert _plan(model, facts, Request(512, 512, precision="bf16"), fast, 8 * GiB, *rung).precision == "bf16"
    assert _plan(model, facts, Request(512, 512), fast, 8 * GiB, *rung).precision == "f32"  # exact by default
    plan = _plan(model, facts, Request(512, 512, precision="bf16"), slow, 8 * GiB, *rung)
    assert plan.precision == "f32" and "bf16 asked; Intel Core i5 (CPU) is not fast at it" in plan.summary()

    import edgediff.backends as backends

    opened = []
    real = backends.open_with_fallback

    def spy(*args, **kwargs):
        opened.append((args[1].name, kwargs.get("precision")))
        return real(*args, **kwargs)

    monkeypatch.setattr(backends, "open_with_fallback", spy)
    pipe = Pipeline.from_pretrained(tiny("sd1")[1], backend="cpu", safety_checker=False)
    pipe.device = fast  # the pipeline plans for this device; the cpu backend opens the sessions (and ignores it)
    pipe("a cat", num_inference_steps=2, width=64, height=64)  # f32 sessions, kept by the resident plan
    opened.clear()
    result = pipe("a cat", num_inference_steps=2, width=64, height=64, precision="bf16")
    assert result.plan.precision == "bf16" and "bf16 arithmetic" in result.plan.summary()
    assert {name for name, _ in opened} >= {"text_encoder", "unet", "vae_decoder"}
    assert {p for _, p in opened} == {"bf16"}
    with pytest.raises(EdgediffError, match="precision must be 'f32' or 'bf16'"):
        pipe("a cat", num_inference_steps=2, width=64, height=64, precision="fp8")
