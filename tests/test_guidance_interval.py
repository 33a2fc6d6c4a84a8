"""Guidance in a limited interval of noise levels (Kynkaanniemi et al. 2024, arXiv 2404.07724; the CFG
cut-off of ComfyUI and AUTOMATIC1111 users): the unconditional pass runs only for the steps whose sigma
lies in (low, high], and the PNG parameters name the interval."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgediff import EdgediffError, Pipeline
from edgediff.cli import main
from edgediff.engine.errors import EdgediffTypeError
from edgediff.engine.plan import RUNGS, Request, _plan, component_facts
from edgediff.engine.schedulers import get_scheduler

STEPS = 10


@pytest.fixture(scope="module")
def pipe(tiny):
    return Pipeline.from_pretrained(tiny("sd1")[1], backend="cpu", safety_checker=False)


def _rows(pipe, **kwargs) -> tuple[list[int], list[np.ndarray]]:
    """The rows of every UNet call of one generation, and its images."""
    rows = []
    result = pipe("a red circle", num_inference_steps=STEPS, seed=4, width=64, height=64,
                  unet_inputs=lambda inputs: rows.append(len(inputs["sample"])), **kwargs)
    return rows, [np.asarray(im) for im in result.images]


def test_steps_outside_the_interval_skip_the_unconditional_call(pipe):
    sigmas = get_scheduler("euler", pipe.model.scheduler_config).schedule(STEPS).sigmas
    interval = (float(sigmas[6]), float(sigmas[2]))  # (s6, s2]: steps 2, 3, 4 and 5
    rows, _ = _rows(pipe, scheduler="euler", guidance_interval=interval)
    assert rows == [1, 1, 2, 2, 2, 2, 1, 1, 1, 1]  # guidance batched inside, the conditional half outside
    # guidance one half at a time: two calls of one row inside the interval, one outside
    request = Request(64, 64, 1)
    plan = _plan(pipe.model, component_facts(pipe.model), request, pipe.device, 8 * 2**30,
                 *next(r for r in RUNGS if r[0] == "sequential-cfg"))
    rows, _ = _rows(pipe, scheduler="euler", guidance_interval=interval, plan=plan)
    assert rows == [1, 1] + [1] * 8 + [1] * 4 and len(rows) == 14
    # DDIM's steps have no sigmas of their own: their timesteps' sigmas on the training schedule
    ddim = get_scheduler("ddim", pipe.model.scheduler_config)
    schedule = ddim.schedule(STEPS)
    levels = [ddim.sigma(schedule, i) for i in range(STEPS)]
    rows, _ = _rows(pipe, scheduler="ddim", guidance_interval=(levels[6], levels[2]))
    assert rows == [1, 1, 2, 2, 2, 2, 1, 1, 1, 1]


def test_ddim_sigmas_are_diffusers_training_sigmas(pipe):
    from diffusers import DDIMScheduler

    reference = DDIMScheduler.from_pretrained(pipe.model.path / "scheduler")
    reference.set_timesteps(STEPS)
    ddim = get_scheduler("ddim", pipe.model.scheduler_config)
    schedule = ddim.schedule(STEPS)
    a = reference.alphas_cumprod.numpy()
    want = [float(np.sqrt((1 - a[t]) / a[t])) for t in reference.timesteps.numpy()]
    assert [ddim.sigma(schedule, i) for i in range(STEPS)] == pytest.approx(want, rel=1e-6)


def test_an_interval_holding_every_step_is_plain_guidance_and_one_holding_none_is_guidance_1(pipe, tiny):
    _, plain = _rows(pipe)
    rows, everywhere = _rows(pipe, guidance_interval=(0.0, float("inf")))
    assert set(rows) == {2} and all(np.array_equal(a, b) for a, b in zip(plain, everywhere))  # (PNDM: 11 calls)
    rows, nowhere = _rows(pipe, guidance_interval=(1000.0, 2000.0))  # above SD's highest sigma (14.6)
    _, unguided = _rows(pipe, guidance_scale=1.0)
    assert set(rows) == {1} and all(np.array_equal(a, b) for a, b in zip(nowhere, unguided))
    assert not all(np.array_equal(a, b) for a, b in zip(plain, nowhere))
    # an inpainting UNet's extra channels follow the rows of each call
    inpaint = Pipeline.from_pretrained(tiny("inpaint")[1], backend="cpu", safety_checker=False)
    image, mask = Image.new("RGB", (64, 64), (200, 40, 40)), Image.new("L", (64, 64), 255)
    results = [inpaint("a cat", image=image, mask_image=mask, num_inference_steps=4, seed=1, guidance_interval=i)
               for i in (None, (0.0, float("inf")), (1.0, 3.0))]
    assert np.array_equal(np.asarray(results[0].images[0]), np.asarray(results[1].images[0]))
    assert results[2].images[0].size == (64, 64)


def test_png_parameters_name_the_interval(tiny, tmp_path):
    from sd_parsers import ParserManager

    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--model", str(tiny("sd1")[1]), "--steps", "4", "--seed", "1",
                 "--guidance-interval", "0.5,3", "--out", str(out), "--no-safety-checker"]) == 0
    text = Image.open(out).text["parameters"]
    assert "CFG scale: 7.5, Guidance interval: 0.5-3, Seed: 1" in text
    info = ParserManager().parse(str(out))
    assert [p.value for p in info.prompts] == ["a red circle"]
    assert any("0.5-3" in str(v) for v in _values(info))
    # guidance off: no interval to name
    out2 = tmp_path / "y.png"
    assert main(["generate", "a red circle", "--model", str(tiny("sd1")[1]), "--steps", "2", "--guidance", "1",
                 "--guidance-interval", "0.5,3", "--out", str(out2), "--no-safety-checker"]) == 0
    assert "Guidance interval" not in Image.open(out2).text["parameters"]


def _values(info) -> list:
    """Every value sd-parsers read from the parameters (its samplers' and its metadata's)."""
    found = [info.metadata]
    for sampler in info.samplers:
        found += [sampler.parameters, getattr(sampler, "name", None)]
    return found


@pytest.mark.parametrize("interval, error, words", [
    ((3.0, 1.0), EdgediffError, "high sigma must be a number above the low one (3)"),
    ((-1.0, 2.0), EdgediffError, "low sigma must be at least 0"),
    ((0.5, float("nan")), EdgediffError, "high sigma must be a number above the low one"),
    ("0.5,3", EdgediffTypeError, "must be two sigmas (low, high)"),
    ((1.0,), EdgediffTypeError, "must be two sigmas (low, high)"),
])
def test_bad_intervals_are_refused_in_one_line(pipe, interval, error, words):
    for guidance in (7.5, 1.0):  # refused even where guidance is off and the interval would go unused
        with pytest.raises(error) as e:
            pipe("a cat", num_inference_steps=2, width=64, height=64, guidance_scale=guidance,
                 guidance_interval=interval)
        assert words in str(e.value) and "\n" not in str(e.value)


def test_bad_interval_on_the_command_line(tiny, tmp_path, capsys):
    code = main(["generate", "a cat", "--model", str(tiny("sd1")[1]), "--guidance-interval", "1",
                 "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "edgediff: error: --guidance-interval '1' is not LOW,HIGH; write it like 0.28,5.42"
    assert not (tmp_path / "x.png").exists()
