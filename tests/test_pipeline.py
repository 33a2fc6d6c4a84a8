"""Pipeline behaviour beyond parity: reproducible stochastic samplers, cancel, sizes, seeds."""

from __future__ import annotations

import numpy as np
import pytest

from edgediff import EdgediffError, Pipeline
from edgediff.engine import noise

_pipes: dict = {}


def pipe(tiny, kind="sd1") -> Pipeline:
    if kind not in _pipes:
        _pipes[kind] = Pipeline.from_pretrained(tiny(kind)[1], backend="cpu")
    return _pipes[kind]


def pixels(result, k=0):
    return np.asarray(result.images[k], dtype=np.int16)


@pytest.mark.parametrize("scheduler", ["euler_a", "lcm"])
def test_stochastic_samplers_are_reproducible_from_the_seed(tiny, scheduler):
    p = pipe(tiny)
    steps = 4
    a = p("a red circle", seed=123, num_inference_steps=steps, scheduler=scheduler)
    b = p("a red circle", seed=123, num_inference_steps=steps, scheduler=scheduler)
    c = p("a red circle", seed=124, num_inference_steps=steps, scheduler=scheduler)
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(c)).mean() > 1.0
    # The per-step noise matters: same initial latents, different step noise, different picture.
    latents = noise.batch_noise([123], noise.INITIAL, (4, 8, 8))
    d = p("a red circle", seed=999, latents=latents, num_inference_steps=steps, scheduler=scheduler)
    assert np.abs(pixels(a) - pixels(d)).mean() > 0.5


def test_image_k_of_a_batch_is_the_single_image_of_seed_plus_k(tiny):
    p = pipe(tiny)
    batch = p("a blue square", seed=40, num_images_per_prompt=3, num_inference_steps=3, scheduler="euler_a")
    assert batch.seeds == [40, 41, 42]
    single = p("a blue square", seed=42, num_inference_steps=3, scheduler="euler_a")
    assert np.abs(pixels(batch, 2) - pixels(single)).max() <= 1  # batched vs single ONNX runs: rounding


def test_callback_sees_every_step_and_can_cancel(tiny):
    p = pipe(tiny)
    seen = []
    p("a cat", seed=1, num_inference_steps=5, scheduler="euler",
      callback=lambda step, total, latents: seen.append((step, total, latents.shape)))
    assert seen == [(i, 5, (1, 4, 8, 8)) for i in range(5)]
    calls = []

    def stop_after_two(step, total, latents):
        calls.append(step)
        return step < 1

    result = p("a cat", seed=1, num_inference_steps=5, scheduler="euler", callback=stop_after_two)
    assert result.cancelled and result.images == [] and calls == [0, 1]


def test_default_size_and_scheduler_come_from_the_model_folder(tiny):
    p = pipe(tiny, "sd2")
    assert p.default_scheduler() == "ddim"  # the SD 2.1 scheduler_config names DDIMScheduler
    result = p("a cat", seed=1, num_inference_steps=2)
    assert result.images[0].size == (64, 64)  # sample_size 8 x VAE factor 8
    assert result.parameters[0].sampler == "DDIM"
    assert pipe(tiny).default_scheduler() == "pndm"  # SD 1.5's config names PNDMScheduler


def test_img2img_size_follows_the_init_image(tiny):
    from pictures import scene

    result = pipe(tiny)("a cat", image=scene(83, 50), strength=0.5, seed=2, num_inference_steps=4)
    assert result.images[0].size == (80, 48)  # rounded down to multiples of 8, as diffusers does


@pytest.mark.parametrize("kwargs, words", [
    (dict(strength=1.5), "strength must be from 0 to 1"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be at least 1"),
    (dict(seed=2**40), "seed must be"),
    (dict(latents=np.zeros((1, 4, 4, 4), np.float32)), "latents have shape"),
    (dict(negative_prompt=["a", "b"]), "2 negative prompts for 1 prompts"),
    (dict(mask_image="x.png"), "a mask needs an init image"),
])
def test_bad_arguments_are_refused_before_any_work(tiny, kwargs, words):
    with pytest.raises(EdgediffError, match=words):
        pipe(tiny)("a cat", num_inference_steps=2, **kwargs)


def test_strength_too_low_for_the_step_count(tiny):
    from pictures import scene

    with pytest.raises(EdgediffError, match="leaves no step to run"):
        pipe(tiny)("a cat", image=scene(), strength=0.05, num_inference_steps=10)


def test_inpainting_model_without_mask_says_what_it_needs(tiny):
    with pytest.raises(EdgediffError, match="inpainting model"):
        pipe(tiny, "inpaint")("a cat", num_inference_steps=2)


def test_plain_model_inpainting_keeps_the_unmasked_region(tiny):
    """A 4-channel model inpaints by pasting the noised original outside the mask every step, so the
    final latents there are the image's own (diffusers' StableDiffusionInpaintPipeline)."""
    from pictures import centre_mask, scene

    p = pipe(tiny)
    inpainted = p("a cat", image=scene(), mask_image=centre_mask(), strength=1.0, seed=3, num_inference_steps=6,
                  scheduler="ddim")
    img2img = p("a cat", image=scene(), strength=1.0, seed=3, num_inference_steps=6, scheduler="ddim")
    a, b = pixels(inpainted).astype(float), pixels(img2img).astype(float)
    border = np.ones((64, 64), bool)
    border[8:56, 8:56] = False  # away from the mask edge, where the VAE mixes the two regions
    centre = np.zeros((64, 64), bool)
    centre[24:40, 24:40] = True
    reconstruction = np.asarray(scene(), dtype=float)
    assert np.abs(a[border] - reconstruction[border]).mean() < np.abs(b[border] - reconstruction[border]).mean()
    assert np.abs(a[centre] - b[centre]).mean() < np.abs(a[border] - b[border]).mean() + 50


def test_text_embeddings_are_sent_to_the_unet_once_per_generation(tiny):
    """The UNet's encoder_hidden_states are the same at every step: kept on the session's device (IO
    binding) once, not sent again each step; the images are the ones of plain runs."""
    pipe = Pipeline.from_pretrained(tiny("sd1")[1], backend="cpu")
    first = pipe("a red circle", num_inference_steps=3, seed=2, scheduler="euler")
    unet = pipe._sessions["unet"]
    assert (unet.uploads, unet.bound_runs) == (1, 3)
    second = pipe("a blue square", num_inference_steps=3, seed=2, scheduler="euler")
    assert (unet.uploads, unet.bound_runs) == (2, 6)  # new prompt, new embeddings: sent once more
    unet._kept.clear()  # plain runs, no binding
    again = pipe("a red circle", num_inference_steps=3, seed=2, scheduler="euler")
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(first.images[0]))
    assert not np.array_equal(np.asarray(second.images[0]), np.asarray(first.images[0]))


def test_a_streamed_plan_frees_the_unet_before_the_vae_runs(tiny, monkeypatch):
    """Streaming is only worth its load times if a stage's session is gone when the next stage runs,
    even though the pipeline's code still names it."""
    import gc
    import weakref
    from dataclasses import replace

    from edgediff.engine.plan import Request

    p = Pipeline.from_pretrained(tiny("sd1")[1], backend="cpu")
    plan = replace(p.make_plan(Request(64, 64)), resident=(), streamed=("text_encoder", "unet", "vae_decoder"))
    opened, open_session = {}, p._session

    def spy(spec, plan=None):
        session = open_session(spec, plan)
        opened[spec.name] = weakref.ref(session)
        return session

    unet_alive, decode = [], p._decode

    def check(*args, **kwargs):
        gc.collect()
        unet_alive.append(opened["unet"]() is not None)
        return decode(*args, **kwargs)

    monkeypatch.setattr(p, "_session", spy)
    monkeypatch.setattr(p, "_decode", check)
    p("a red circle", num_inference_steps=2, seed=1, plan=plan)
    assert unet_alive == [False]


def test_a_kept_input_stays_alive_when_the_session_had_to_copy_it(tiny, monkeypatch):
    """`keep` binds the array it feeds: a copy when the graph's dtype differs or the array is not
    contiguous. ONNX Runtime's binding points at that memory without owning it (an OrtValue made from
    numpy holds no reference to the array), so the session must keep the copy alive for as long as it is
    bound; the runs after still see the kept values. onnxruntime 1.32's Python wrapper happens to keep
    the bound OrtValue too; the releases pyproject admits before it bound the bare value, as simulated."""
    import gc
    import weakref

    import onnxruntime as ort

    from edgediff.backends.base import OrtSession

    def bind_as_before(self, name, ortvalue):  # onnxruntime < 1.2x: nothing on the Python side keeps it
        self._iobinding.bind_ortvalue_input(name, ortvalue._ortvalue)

    monkeypatch.setattr(ort.IOBinding, "bind_ortvalue_input", bind_as_before)
    from edgediff.engine.plan import Request

    pipe = Pipeline.from_pretrained(tiny("sd1")[1], backend="cpu")
    unet = pipe._session(pipe.model.family.unet, pipe.make_plan(Request(64, 64)))
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 77, 32, 2))[..., 0]  # float64 and strided: _feed copies it
    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([500.0, 500.0], np.float32)
    want = unet.run(sample=sample, timestep=t, encoder_hidden_states=hidden)["out_sample"]
    fed, feed = [], OrtSession._feed

    def spy(self, name, array):
        value = feed(self, name, array)
        if name == "encoder_hidden_states":
            fed.append(weakref.ref(value))
        return value

    monkeypatch.setattr(OrtSession, "_feed", spy)
    unet.keep("encoder_hidden_states", hidden)
    gc.collect()
    assert fed and fed[-1]() is not None, "the bound copy was freed while ONNX Runtime still points at it"
    assert np.array_equal(unet.run(sample=sample, timestep=t)["out_sample"], want)


def test_the_plan_is_a_value_passed_in(tiny):
    """pipe(..., plan=) follows the plan given (here: everything streamed, cond and uncond one after the
    other), the stages read it rather than the pipeline's last plan, and its picture is the default
    plan's; a plan made for another request is refused in one line."""
    from dataclasses import replace

    from edgediff.engine.errors import EdgediffError
    from edgediff.engine.plan import Request

    pipe = Pipeline.from_pretrained(tiny("sd1")[1], backend="cpu")
    args = dict(prompt="a red circle", num_inference_steps=3, seed=4, width=64, height=64, scheduler="euler")
    default = pipe(**args)
    lean = replace(default.plan, rung="streamed", cfg_batched=False, resident=(),
                   streamed=("text_encoder", "unet", "vae_decoder"))
    calls = []
    result = pipe(**args, plan=lean, unet_inputs=lambda inputs: calls.append(inputs["sample"].shape[0]))
    assert result.plan is lean and pipe.plan is lean
    assert calls == [1] * 6  # 3 steps, uncond then cond: the plan was followed
    assert "unet" not in pipe._sessions  # streamed: freed when its stage ended
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(default.images[0]))
    with pytest.raises(EdgediffError, match=r"the plan was made for 64x64 x1 .* this call is 128x128 x1"):
        pipe(**{**args, "width": 128, "height": 128}, plan=lean)
    other = pipe.make_plan(Request(64, 64, cfg=False))
    with pytest.raises(EdgediffError, match="cfg False"):
        pipe(**args, plan=other)


def test_calibration_records_every_unet_call_of_a_streamed_plan(tiny, monkeypatch):
    """int8 calibration records the UNet's inputs through the call's public hook, so a plan that
    streams the UNet (its session re-opened for every call) records them too: before the hook it swapped
    a recorder into the pipeline's sessions, which a streamed UNet dropped (IndexError)."""
    from dataclasses import replace

    from edgediff.export import quantize

    planned = Pipeline.make_plan

    def streamed(self, request):
        plan = planned(self, request)
        return replace(plan, resident=(), streamed=tuple(s.name for s in plan.stages))

    monkeypatch.setattr(Pipeline, "make_plan", streamed)
    calls, held_out = quantize.calibration_inputs(tiny("sd1")[1], 64, prompts=("a red circle", "a blue square"),
                                                  steps=3)
    assert len(calls) == 2 * 3  # two prompts, three steps, cond and uncond batched
    assert set(calls[0]) == {"sample", "timestep", "encoder_hidden_states"}
    assert calls[0]["sample"].shape == (2, 4, 8, 8) and held_out["sample"].shape == (2, 4, 8, 8)
