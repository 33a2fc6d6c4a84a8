"""The numpy schedulers against Hugging Face diffusers' schedulers of the same name, step by step.

Each run feeds both sides the same random model outputs (and, for the stochastic samplers, the same noise,
handed to diffusers by patching `randn_tensor` in its scheduler module), lets each follow its own trajectory,
and compares every scaled input and every step output to 1e-5 relative. Run this file as a script to print
the largest relative error seen per scheduler.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from edgediff.engine.schedulers import SCHEDULERS, SchedulerConfig, get_scheduler  # noqa: E402
from edgediff.engine.schedulers.ddim import DDIM  # noqa: E402
from edgediff.engine.schedulers.lcm import LCM  # noqa: E402

SD15 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
CONFIGS = {
    "sd15": SD15,  # no timestep_spacing / prediction_type keys: each class's defaults apply
    "sd2_768": {**SD15, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    "linspace": {**SD15, "timestep_spacing": "linspace"},
    "defaults": {"_class_name": "DDIMScheduler"},  # every key missing: linear betas, clip_sample, ...
}
STEPS = (1, 2, 7, 20, 25)
SHAPE = (2, 4, 8, 8)

DIFFUSERS = {  # our name -> (diffusers module, class, extra from_config kwargs)
    "pndm": ("scheduling_pndm", "PNDMScheduler", {}),
    "ddim": ("scheduling_ddim", "DDIMScheduler", {}),
    "euler": ("scheduling_euler_discrete", "EulerDiscreteScheduler", {}),
    "euler_a": ("scheduling_euler_ancestral_discrete", "EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("scheduling_dpmsolver_multistep", "DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("scheduling_dpmsolver_multistep", "DPMSolverMultistepScheduler",
                        {"use_karras_sigmas": True}),
    "lcm": ("scheduling_lcm", "LCMScheduler", {}),
}

MAX_REL_ERR: dict[str, float] = {}
FLOAT32_ULPS = 4  # "the same up to float32 rounding": a few units in the last place


def _diffusers_module(name: str):
    return importlib.import_module(f"diffusers.schedulers.{DIFFUSERS[name][0]}")


def make_diffusers(name: str, cfg: dict):
    _, cls_name, extra = DIFFUSERS[name]
    cls = getattr(_diffusers_module(name), cls_name)
    return cls.from_config(cfg, **extra)


def check(name: str, ours: np.ndarray, theirs, what: str) -> None:
    theirs = theirs.numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    assert ours.dtype == np.float32, f"{what}: {ours.dtype}"
    assert ours.shape == theirs.shape, what
    rel = float(np.linalg.norm(ours - theirs) / max(np.linalg.norm(theirs), 1e-30))
    MAX_REL_ERR[name] = max(MAX_REL_ERR.get(name, 0.0), rel)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(theirs).max())),
                               err_msg=what)


def same_up_to_rounding(ours: np.ndarray, theirs: np.ndarray) -> None:
    """The claim for schedules: integer timesteps are diffusers' exactly; float ones (timesteps of the
    Euler family, sigmas, the initial noise scale) are diffusers' up to float32 rounding, a few ulp.
    Exact equality held against one diffusers release and broke on the next (0.42.1: sigma 0.0291675
    one ulp, 1.9e-9, away), which is rounding, not a different schedule."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    if np.issubdtype(theirs.dtype, np.integer):
        np.testing.assert_array_equal(ours, theirs)
    else:
        np.testing.assert_array_max_ulp(ours.astype(theirs.dtype), theirs, maxulp=FLOAT32_ULPS)


class NoiseFeed:
    """Stands in for diffusers' randn_tensor: returns the array we also give our scheduler."""

    def __init__(self):
        self.noise: np.ndarray | None = None

    def __call__(self, shape, *args, **kwargs):
        assert self.noise is not None and tuple(shape) == self.noise.shape
        return torch.from_numpy(self.noise.copy())


def run_pair(name: str, cfg: dict, n: int, strength: float | None, monkeypatch, ours=None, theirs=None,
             step_kwargs: dict | None = None, seed: int = 0) -> None:
    """Build both, compare the schedules, then run from index 0 (strength None) or img2img-style from
    start_index(schedule, strength), comparing add_noise, scale_model_input and every step."""
    ours = ours or SCHEDULERS[name](SchedulerConfig.from_dict(cfg))
    theirs = theirs or make_diffusers(name, cfg)
    step_kwargs = step_kwargs or {}
    feed = NoiseFeed()
    monkeypatch.setattr(_diffusers_module(name), "randn_tensor", feed, raising=False)

    try:
        sched = ours.schedule(n)
    except ValueError:  # e.g. PNDM's Runge-Kutta warm-up with fewer than 4 steps: diffusers fails too
        with pytest.raises(Exception):
            theirs.set_timesteps(n)
        return
    theirs.set_timesteps(n)
    their_ts = theirs.timesteps.numpy()
    assert sched.timesteps.dtype == their_ts.dtype, (sched.timesteps.dtype, their_ts.dtype)
    same_up_to_rounding(sched.timesteps, their_ts)
    if hasattr(theirs, "sigmas"):
        same_up_to_rounding(sched.sigmas, theirs.sigmas.numpy())
    else:
        assert sched.sigmas is None
    same_up_to_rounding(np.float32(sched.init_noise_sigma), np.float32(float(theirs.init_noise_sigma)))
    assert sched.order == theirs.order
    assert len(sched) == len(their_ts)

    rng = np.random.default_rng(seed)
    start = 0
    if strength is None:
        sample = (rng.standard_normal(SHAPE) * sched.init_noise_sigma).astype(np.float32)
        their_sample = torch.from_numpy(sample.copy())
    else:
        start = ours.start_index(sched, strength)
        if start >= len(sched):
            return  # strength too low for this many steps (diffusers' pipelines refuse it too)
        if hasattr(theirs, "set_begin_index"):
            theirs.set_begin_index(start)
        original = rng.standard_normal(SHAPE).astype(np.float32)
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        sample = ours.add_noise(sched, start, original, noise)
        their_sample = theirs.add_noise(torch.from_numpy(original), torch.from_numpy(noise),
                                        theirs.timesteps[start:start + 1])
        check(name, sample, their_sample, f"add_noise at {start}")

    state = None
    for i in range(start, len(sched)):
        t = theirs.timesteps[i]
        model_input = ours.scale_model_input(sched, i, sample)
        check(name, model_input, theirs.scale_model_input(their_sample, t), f"scale_model_input {i}")
        model_output = rng.standard_normal(SHAPE).astype(np.float32)
        noise = rng.standard_normal(SHAPE).astype(np.float32) if ours.stochastic else None
        feed.noise = noise
        sample, state = ours.step(sched, i, sample, model_output, state, noise)
        their_sample = theirs.step(torch.from_numpy(model_output.copy()), t, their_sample,
                                   **step_kwargs).prev_sample
        check(name, sample, their_sample, f"step {i} of {len(sched)} (t={t.item()})")


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_matches_diffusers(name, cfg_name, n, monkeypatch):
    run_pair(name, CONFIGS[cfg_name], n, None, monkeypatch)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_img2img_matches_diffusers(name, cfg_name, n, monkeypatch):
    run_pair(name, CONFIGS[cfg_name], n, 0.6, monkeypatch, seed=1)


@pytest.mark.parametrize("strength", [None, 0.6])
@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m", "dpmpp_2m_karras", "lcm"])
def test_sample_prediction_matches_diffusers(name, strength, monkeypatch):
    run_pair(name, {**SD15, "prediction_type": "sample"}, 7, strength, monkeypatch)


@pytest.mark.parametrize("name", ["pndm", "euler_a"])
def test_sample_prediction_refused_where_diffusers_lacks_it(name):
    with pytest.raises(ValueError, match="sample"):
        get_scheduler(name, SchedulerConfig.from_dict({**SD15, "prediction_type": "sample"}))


@pytest.mark.parametrize("strength", [None, 0.6])
@pytest.mark.parametrize("n", [4, 7, 20])
def test_pndm_runge_kutta_warmup_matches_diffusers(n, strength, monkeypatch):
    # skip_prk_steps False: F-PNDM with its 12 pseudo Runge-Kutta stages first.
    run_pair("pndm", {**SD15, "skip_prk_steps": False}, n, strength, monkeypatch)


def test_pndm_runge_kutta_needs_four_steps():
    ours = SCHEDULERS["pndm"](SchedulerConfig.from_dict({**SD15, "skip_prk_steps": False}))
    with pytest.raises(ValueError, match="Runge-Kutta"):
        ours.schedule(2)


@pytest.mark.parametrize("strength", [None, 0.6])
@pytest.mark.parametrize("cfg_name", ["sd15", "sd2_768"])
@pytest.mark.parametrize("n", [2, 20])
def test_ddim_eta_matches_diffusers(n, cfg_name, strength, monkeypatch):
    cfg = CONFIGS[cfg_name]
    ours = DDIM(SchedulerConfig.from_dict(cfg), eta=1.0)
    assert ours.stochastic
    run_pair("ddim", cfg, n, strength, monkeypatch, ours=ours, step_kwargs={"eta": 1.0})


@pytest.mark.parametrize("n", [1, 4, 8])
def test_lcm_img2img_strength_schedule(n):
    ours = LCM(SchedulerConfig.from_dict(SD15))
    theirs = make_diffusers("lcm", SD15)
    theirs.set_timesteps(n, strength=0.6)
    np.testing.assert_array_equal(ours.schedule(n, strength=0.6).timesteps, theirs.timesteps.numpy())


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_step_has_no_hidden_state(name):
    ours = get_scheduler(name, SchedulerConfig.from_dict(SD15))
    sched = ours.schedule(7)
    rng = np.random.default_rng(2)
    sample = rng.standard_normal(SHAPE).astype(np.float32)
    state = None
    for i in range(3):  # build up some history
        sample, state = ours.step(sched, i, sample, rng.standard_normal(SHAPE).astype(np.float32), state,
                                  rng.standard_normal(SHAPE).astype(np.float32))
    args = (sched, 3, sample, rng.standard_normal(SHAPE).astype(np.float32), state,
            rng.standard_normal(SHAPE).astype(np.float32))
    first, first_state = ours.step(*args)
    second, second_state = ours.step(*args)
    np.testing.assert_array_equal(first, second)
    assert type(first_state) is type(second_state)
    # A second scheduler object and a fresh schedule give the same answer too.
    other = get_scheduler(name, SchedulerConfig.from_dict(SD15))
    third, _ = other.step(other.schedule(7), *args[1:])
    np.testing.assert_array_equal(first, third)


def test_registry():
    assert set(SCHEDULERS) == {"pndm", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lcm"}
    for name, cls in SCHEDULERS.items():
        s = get_scheduler(name, SchedulerConfig.from_dict(SD15))
        assert isinstance(s, cls) and s.name == name and s.a1111_name
    assert [n for n, c in SCHEDULERS.items() if c.stochastic] == ["euler_a", "lcm"]


def test_unknown_scheduler_message():
    with pytest.raises(ValueError) as err:
        get_scheduler("k_lms", SchedulerConfig())
    message = str(err.value)
    assert "\n" not in message and "'k_lms'" in message
    for name in SCHEDULERS:
        assert name in message


if __name__ == "__main__":
    mp = pytest.MonkeyPatch()
    for name in DIFFUSERS:
        for cfg in CONFIGS.values():
            for n in STEPS:
                for strength in (None, 0.6):
                    run_pair(name, cfg, n, strength, mp)
    for name, err in MAX_REL_ERR.items():
        print(f"{name:16s} max relative error {err:.2e}")
