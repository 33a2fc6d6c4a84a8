"""The built-in model draws what its captions say, judged by pixel statistics (builtin/scenes.py).

These are the tests that see meaning: a wrong VAE scaling factor, a scheduler off by a step or a
broken guidance sign pass parity on random weights, but fail here.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from edgediff import Pipeline
from edgediff.builtin.evaluate import evaluate, evaluation_scenes
from edgediff.builtin.scenes import COLOURS, POSITIONS, Scene, judge, render
from edgediff.export.onnx_export import ExportOptions

pytestmark = pytest.mark.slow  # hundreds of 20-step generations with the built-in model


@pytest.fixture(scope="session")
def builtin(builtin_model) -> Pipeline:
    return Pipeline.from_pretrained(builtin_model, backend="cpu")  # conftest's export, made once


def test_fifty_captions_with_the_default_scheduler(builtin):
    """The issue's bar: at least 90% of 50 fixed captions, default scheduler, 20 steps, CPU."""
    result = evaluate(builtin, steps=20)
    assert result.rate >= 0.9, result.failures


# Per-scheduler bars on 20 captions at 20 steps, a little under what was measured (in brackets).
# PNDM (PLMS) is left out: it draws 1/20 here, and diffusers' own PNDMScheduler on the same weights drew
# 2/10 (the parity tests show both compute the same steps); LCM is not an LCM-distilled model.
SCHEDULER_BARS = {
    "euler": 0.85,  # 19/20
    "ddim": 0.85,  # 19/20
    "dpmpp_2m_karras": 0.85,  # 19/20
    "dpmpp_2m": 0.8,  # 18/20
    "euler_a": 0.6,  # 15/20
    "lcm": 0.4,  # 10/20
}


@pytest.mark.parametrize("scheduler", sorted(SCHEDULER_BARS))
def test_every_scheduler_draws_the_captions(builtin, scheduler):
    result = evaluate(builtin, scheduler=scheduler, steps=20, count=20)
    assert result.rate >= SCHEDULER_BARS[scheduler], result.failures


def recolourable(count: int) -> list[tuple[Scene, Scene]]:
    """(original, recoloured) pairs: the same shape, place and background in another colour."""
    pairs = []
    for scene in evaluation_scenes(count):
        other = [c for c in COLOURS if c not in (scene.colour, scene.background)][len(pairs) % 5]
        pairs.append((scene, dataclasses.replace(scene, colour=other, name_background=True)))
    return pairs


def test_img2img_recolours_a_shape(builtin):
    passed = 0
    pairs = recolourable(10)
    for k, (original, wanted) in enumerate(pairs):
        image = builtin(wanted.caption(), image=render(original), strength=0.75, num_inference_steps=20,
                        seed=k).images[0]
        passed += judge(image, wanted).passed
    assert passed >= 8, f"{passed}/10 recoloured"


def test_inpainting_adds_a_shape_in_the_masked_region(builtin):
    passed = kept = 0
    scenes = [s for s in evaluation_scenes(40) if s.position and "corner" in s.position][:10]
    for k, scene in enumerate(scenes):
        scene = dataclasses.replace(scene, name_background=True)
        empty = Image.new("RGB", (64, 64), COLOURS[scene.background])
        (x0, x1), (y0, y1) = POSITIONS[scene.position]
        mask = np.zeros((64, 64), np.uint8)
        mask[int((y0 - 0.25) * 64):int((y1 + 0.25) * 64), int((x0 - 0.25) * 64):int((x1 + 0.25) * 64)] = 255
        image = builtin(scene.caption(), image=empty, mask_image=Image.fromarray(mask), strength=1.0,
                        num_inference_steps=20, seed=k).images[0]
        passed += judge(image, scene).passed
        outside = np.asarray(image, float)[mask == 0]
        kept += np.abs(outside - np.asarray(COLOURS[scene.background], float)).mean() < 20
    assert passed >= 8, f"{passed}/{len(scenes)} shapes added"
    assert kept >= 9, f"the background outside the mask survived in {kept}/{len(scenes)}"


def test_the_checks_catch_a_wrong_vae_scaling_factor(builtin):
    """The failure the issue names: parity on random weights cannot see it, these checks do."""
    broken = Pipeline(dataclasses.replace(builtin.model, scaling_factor=builtin.model.scaling_factor * 2),
                      builtin.backend, builtin.device, builtin.tokenizer)
    assert evaluate(broken, steps=20, count=10).rate <= 0.5


@pytest.mark.parametrize("options", [ExportOptions(dtype="fp16"), ExportOptions(attention="sliced"),
                                     ExportOptions(dtype="int8")],
                         ids=lambda o: o.key())
def test_other_export_options_still_draw_the_captions(options):
    """fp16 (fragile parts kept fp32), sliced attention and the int8 UNet must not cost meaning:
    the default scheduler's bar on 20 captions, as for the default export."""
    from edgediff.export.sources import ensure_exported

    out = ensure_exported("builtin", options)  # the session's cache: tests/test_export.py's int8 test shares it
    result = evaluate(Pipeline.from_pretrained(out, backend="cpu"), steps=20, count=20)
    assert result.rate >= SCHEDULER_BARS["euler"], result.failures


# The fast plan of issue 15 on the built-in model: the int8 UNet and decoder, feature caching every 2
# steps, guidance only for sigmas in (0.28, 5.42]. Measured on the 50 captions: 47 (int8 decoder and
# interval alone: 47; caching every 3 without the interval: 45; every 3 with it: 42).
FAST_PLAN = dict(cache_interval=2, guidance_interval=(0.28, 5.42), vae_decoder="int8")


def test_the_fast_plan_still_draws_the_captions():
    """Issue 15's bar: at least 45 of the 50 held-out captions under the fast plan."""
    from edgediff.export.sources import ensure_exported

    out = ensure_exported("builtin", ExportOptions(dtype="int8", deep_cache="auto"))
    result = evaluate(Pipeline.from_pretrained(out, backend="cpu"), steps=20, **FAST_PLAN)
    assert result.passed >= 45, result.failures
