"""Feature caching across steps (DeepCache, arXiv 2312.00858): the export's full UNet also returns the
deep feature, its shallow UNet takes it; `cache_interval` N runs the full one every N steps. N = 1 must
be the plain UNet exactly; the branch (depth) is measured at export and recorded in the manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from edgediff import EdgediffError, Pipeline
from edgediff.cli import main
from edgediff.engine.deepcache import FeatureCache
from edgediff.engine.metrics import psnr
from edgediff.engine.plan import RUNGS, Request, _plan, component_facts
from edgediff.export import wrappers
from edgediff.export.onnx_export import CACHE_MIN_PSNR, ExportOptions, export_onnx

STEPS = 10
ARGS = dict(num_inference_steps=STEPS, width=64, height=64, seed=3, scheduler="euler")


@pytest.fixture(scope="module")
def deep(tiny, tmp_path_factory):
    """The tiny SD 1.x model exported with feature caching (depth measured), and its plain export."""
    src, plain = tiny("sd1")
    out = tmp_path_factory.mktemp("deepcache") / "sd1-deep"
    export_onnx(src, out, ExportOptions(deep_cache="auto"), profile_memory=True)
    return src, plain, out


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_shallow_path_on_its_own_steps_feature_is_the_full_unet(tiny, kind):
    """In PyTorch, on diffusers' own UNet: the full UNet with the feature output is diffusers' UNet, and the
    shallow UNet fed the feature of the same inputs gives the same noise, bit for bit, at every depth."""
    from diffusers import UNet2DConditionModel

    m = UNet2DConditionModel.from_pretrained(tiny(kind)[0] / "unet").eval()
    c = m.config
    g = torch.Generator().manual_seed(0)
    names = ["sample", "timestep", "encoder_hidden_states"]
    args = [torch.randn(2, 4, 16, 8, generator=g), torch.tensor([981.0, 500.0]),
            torch.randn(2, 77, c.cross_attention_dim, generator=g)]
    if c.addition_embed_type == "text_time":
        names += ["text_embeds", "time_ids"]
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        args += [torch.randn(2, pooled, generator=g), torch.tensor([[128.0, 64.0, 0.0, 0.0, 128.0, 64.0]] * 2)]
    with torch.no_grad():
        want = m(*args[:3], added_cond_kwargs=dict(zip(names[3:], args[3:])) or None).sample
        depths = wrappers.cache_depths(m)
        assert depths == len(m.up_blocks[-1].resnets) >= 2
        for depth in range(1, depths + 1):
            out, feature = wrappers.UnetWithFeature(m, names, depth)(*args)
            assert torch.equal(out, want)
            assert feature.shape[-2:] == (16, 8)  # the latent resolution: the last up block's
            assert torch.equal(wrappers.UnetShallow(m, names, depth)(*args, feature), want)


def test_export_measures_each_depth_and_records_the_choice(deep):
    _, _, out = deep
    manifest = json.loads((out / "edgediff.json").read_text())
    assert manifest["deep_cache"] == "auto"
    unet, shallow = manifest["components"]["unet"], manifest["components"]["unet_shallow"]
    assert [o["name"] for o in unet["outputs"]] == ["out_sample", "cache_feature"]
    assert [i["name"] for i in shallow["inputs"]] == ["sample", "timestep", "encoder_hidden_states", "cache_feature"]
    scores = shallow["extra"]["cache_psnr"]
    assert sorted(scores) == ["1", "2"]  # the tiny UNet's last up block has two layers
    depth = shallow["extra"]["cache_depth"]
    good = [int(d) for d, v in scores.items() if v >= CACHE_MIN_PSNR]
    assert depth == (min(good) if good else 2)
    assert unet["psnr"] >= 60 and shallow["psnr"] >= 60  # each graph against PyTorch
    assert shallow["bytes"] < unet["bytes"] / 2
    assert shallow["activations"]["fit"][1] > 0  # profiled for the planner


def test_interval_1_is_the_plain_unet_exactly(deep):
    _, plain, out = deep
    want = Pipeline.from_pretrained(plain, backend="cpu", safety_checker=False)("a red circle", **ARGS)
    pipe = Pipeline.from_pretrained(out, backend="cpu", safety_checker=False)
    got = pipe("a red circle", cache_interval=1, **ARGS)
    assert np.array_equal(np.asarray(got.images[0]), np.asarray(want.images[0]))
    assert "DeepCache" not in got.parameters[0].a1111()


def _spy(monkeypatch) -> list[tuple[int, tuple[str, ...], str]]:
    """(step, halves, "full" or "shallow") of every UNet call."""
    ran = []
    original = FeatureCache.run

    def run(self, step, halves, **inputs):
        before = dict(self.calls)
        out = original(self, step, halves, **inputs)
        ran.append((step, halves, next(k for k in self.calls if self.calls[k] != before[k])))
        return out

    monkeypatch.setattr(FeatureCache, "run", run)
    return ran


def test_interval_3_runs_the_full_unet_every_third_step(deep, monkeypatch):
    _, _, out = deep
    pipe = Pipeline.from_pretrained(out, backend="cpu", safety_checker=False)
    exact = pipe("a red circle", **ARGS).images[0]
    ran = _spy(monkeypatch)
    result = pipe("a red circle", cache_interval=3, **ARGS)
    assert [kind for _, _, kind in ran] == ["full", "shallow", "shallow"] * 3 + ["full"]
    assert {halves for _, halves, _ in ran} == {("uncond", "cond")}  # guidance batched: one call a step
    close = psnr(result.images[0], exact)
    assert 25 < close < float("inf"), close  # near the exact picture, not equal to it
    assert "CFG scale: 7.5, DeepCache interval: 3, Seed: 3" in result.parameters[0].a1111()
    assert "full UNet every 3 steps" in result.plan.summary()


def test_halves_keep_their_own_features(deep, monkeypatch):
    """Guidance one half at a time, and only at steps 4 and 5 (a guidance interval): the unconditional
    half has no feature at step 4, so its call runs the full UNet while the conditional one, whose
    feature is from the full step 3, runs the shallow one; at step 5 both are shallow."""
    from edgediff.engine.schedulers import get_scheduler

    _, _, out = deep
    pipe = Pipeline.from_pretrained(out, backend="cpu", safety_checker=False)
    sigmas = get_scheduler("euler", pipe.model.scheduler_config).schedule(STEPS).sigmas
    plan = _plan(pipe.model, component_facts(pipe.model), Request(64, 64, 1, cache_interval=3), pipe.device,
                 8 * 2**30, *next(r for r in RUNGS if r[0] == "sequential-cfg"))
    ran = _spy(monkeypatch)
    pipe("a red circle", cache_interval=3, plan=plan, guidance_interval=(float(sigmas[6]), float(sigmas[4])),
         **ARGS)
    cond, uncond = ("cond",), ("uncond",)
    assert ran == [(0, cond, "full"), (1, cond, "shallow"), (2, cond, "shallow"), (3, cond, "full"),
                   (4, uncond, "full"), (4, cond, "shallow"), (5, uncond, "shallow"), (5, cond, "shallow"),
                   (6, cond, "full"), (7, cond, "shallow"), (8, cond, "shallow"), (9, cond, "full")]


def test_plan_holds_the_shallow_unet_beside_the_full_one(deep):
    _, _, out = deep
    pipe = Pipeline.from_pretrained(out, backend="cpu", safety_checker=False)
    facts = component_facts(pipe.model)
    plain = pipe.make_plan(Request(64, 64, 1))
    cached = pipe.make_plan(Request(64, 64, 1, cache_interval=3))
    unet_stage = lambda plan: next(s.peak for s in plan.stages if s.name == "unet")  # noqa: E731
    extra = unet_stage(cached) - unet_stage(plain)
    assert extra >= facts["unet_shallow"].weights  # its weights, and its session
    assert dict(cached.needs)["unet_shallow"] > 0
    assert cached.keeps("unet_shallow") == cached.keeps("unet")


def test_caching_mistakes_are_one_line(deep, tmp_path, capsys):
    from loras import CONVS, kohya, modules
    from diffusers import UNet2DConditionModel

    src, plain, out = deep
    with pytest.raises(EdgediffError) as e:
        Pipeline.from_pretrained(plain, backend="cpu", safety_checker=False)("a cat", cache_interval=3, **ARGS)
    assert "needs an export with feature caching" in str(e.value) and "--deep-cache" in str(e.value)
    unet = UNet2DConditionModel.from_pretrained(src / "unet")
    lora = kohya(tmp_path / "style.safetensors", {("lora_unet", k): v for k, v in modules(unet, CONVS).items()})
    pipe = Pipeline.from_pretrained(out, backend="cpu", safety_checker=False, loras=[(lora, 1.0)])
    with pytest.raises(EdgediffError) as e:
        pipe("a cat", cache_interval=2, **ARGS)
    assert "with LoRAs is not supported" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(EdgediffError):
        pipe("a cat", cache_interval=0, **ARGS)
    with pytest.raises(EdgediffError) as e:
        ExportOptions(deep_cache="4x")
    assert "auto or a depth" in str(e.value)
    code = main(["export", str(src), "--out", str(tmp_path / "x"), "--deep-cache", "3"])
    assert code == 2 and "use a depth from 1 to 2" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_command_line_export_and_generate(deep, tmp_path):
    from sd_parsers import ParserManager

    _, _, out = deep
    png = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--model", str(out), "--steps", "6", "--seed", "1",
                 "--cache-interval", "3", "--out", str(png), "--no-safety-checker"]) == 0
    text = Image.open(png).text["parameters"]
    assert "DeepCache interval: 3" in text
    assert [p.value for p in ParserManager().parse(str(png)).prompts] == ["a red circle"]
