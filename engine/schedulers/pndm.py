"""PNDM / PLMS: pseudo numerical methods for diffusion models (Liu et al. 2022, arXiv 2202.09778).

The DDIM update (the "transfer" part, eq. 9 of the paper) is applied to a noise estimate that is not the
model's current output but a linear multistep (Adams-Bashforth) combination of the last outputs, which
is what AUTOMATIC1111 calls "PLMS". The paper warms the history up with pseudo Runge-Kutta (PRK) steps;
Stable Diffusion's config sets `skip_prk_steps` and instead uses crowsonkb's warm-up: step 0 is a plain
Euler-like step, step 1 re-does it from the same sample with the mean of two outputs (a Heun step), then
2nd, 3rd and 4th order Adams-Bashforth. That is why the schedule has n + 1 timesteps for n steps
(the second timestep repeats).

Matches diffusers' PNDMScheduler; its counter, `ets` history and `cur_sample` live in `PNDMState`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import Schedule, Scheduler, SchedulerConfig, add_noise_vp, alphas_cumprod_for


@dataclass(frozen=True)
class PNDMState:
    counter: int = 0  # how many steps this run has taken
    ets: tuple[np.ndarray, ...] = ()  # the last (up to 4) raw model outputs, oldest first
    cur_sample: np.ndarray | None = None  # the sample a warm-up step started from
    cur_model_output: np.ndarray | None = None  # PRK: running 1/6, 1/3, 1/3, 1/6 sum of the 4 stages


class PNDM(Scheduler):
    name = "pndm"
    a1111_name = "PLMS"

    def __init__(self, config: SchedulerConfig | None = None):
        super().__init__(config)
        if self.prediction_type == "sample":
            raise ValueError("pndm supports prediction_type epsilon or v_prediction, not 'sample'")
        # PNDMScheduler has no rescale_betas_zero_snr argument, so diffusers ignores that key.
        self.alphas_cumprod = alphas_cumprod_for(self.config, zero_snr_supported=False)
        # The alpha "before" t=0, used by the last step: SD says set_alpha_to_one False (diffusers' default).
        one = self.config.get("set_alpha_to_one", False)
        self.final_alpha_cumprod = np.float32(1.0) if one else self.alphas_cumprod[0]
        self.skip_prk_steps = self.config.get("skip_prk_steps", False)
        self.spacing = self.config.get("timestep_spacing", "leading")
        self.steps_offset = self.config.get("steps_offset", 0)

    def _base_timesteps(self, n: int) -> np.ndarray:
        """n ascending training timesteps (arXiv 2305.08891, table 2)."""
        N = self.num_train_timesteps
        if self.spacing == "linspace":
            return np.linspace(0, N - 1, n).round().astype(np.int64)
        if self.spacing == "leading":
            return (np.arange(0, n) * (N // n)).round() + self.steps_offset
        if self.spacing == "trailing":
            return np.round(np.arange(N, 0, -N / n))[::-1].astype(np.int64) - 1
        raise ValueError(f"timestep_spacing {self.spacing!r} is not supported (leading, linspace or trailing)")

    def schedule(self, num_inference_steps: int) -> Schedule:
        n = num_inference_steps
        ts = self._base_timesteps(n)
        if self.skip_prk_steps:
            # PLMS with the Euler/Heun warm-up: the second-highest timestep is visited twice.
            prk = np.array([], dtype=np.int64)
            plms = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]
        else:
            if n < 4:
                raise ValueError(f"pndm without skip_prk_steps (the Runge-Kutta warm-up) needs at least 4 "
                                 f"steps, not {n}")
            # F-PNDM (the paper's algorithm 2): 3 Runge-Kutta steps of 4 stages each over the highest 4
            # timesteps, each stage at t or at the half-way point t - (N // n) // 2.
            half = self.num_train_timesteps // n // 2
            prk = np.array(ts[-4:]).repeat(2) + np.tile(np.array([0, half]), 4)
            prk = prk[:-1].repeat(2)[1:-1][::-1]
            plms = ts[:-3][::-1]
        timesteps = np.concatenate([prk, plms]).astype(np.int64)
        return Schedule(num_inference_steps=n, timesteps=timesteps, init_noise_sigma=1.0, order=1,
                        data=(("prk_timesteps", prk.astype(np.int64)),))

    def _prev_sample(self, sample: np.ndarray, t: int, prev_t: int, eps: np.ndarray) -> np.ndarray:
        """Eq. 9 of Liu et al.: the DDIM step from t to prev_t written with the noise estimate `eps`."""
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t, b_prev = 1 - a_t, 1 - a_prev
        if self.prediction_type == "v_prediction":
            # v = sqrt(a) eps - sqrt(1 - a) x0  =>  eps = sqrt(a) v + sqrt(1 - a) x_t (Salimans & Ho 2022)
            eps = (a_t**0.5) * eps + (b_t**0.5) * sample
        # (a_prev - a_t) / (sqrt(a_t) (sqrt(a_prev) + sqrt(a_t))) + 1 simplifies to sqrt(a_prev / a_t).
        sample_coeff = (a_prev / a_t) ** 0.5
        eps_denominator = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
        return sample_coeff * sample - (a_prev - a_t) * eps / eps_denominator

    def step(self, schedule: Schedule, i: int, sample: np.ndarray, model_output: np.ndarray,
             state: Any = None, noise: np.ndarray | None = None) -> tuple[np.ndarray, PNDMState]:
        state = state or PNDMState()
        t = int(schedule.timesteps[i])
        if not self.skip_prk_steps and state.counter < len(schedule.extra("prk_timesteps")):
            prev, state = self._step_prk(schedule, t, sample, model_output, state)
        else:
            prev, state = self._step_plms(schedule, t, sample, model_output, state)
        return prev.astype(np.float32, copy=False), state

    def _step_plms(self, schedule: Schedule, t: int, sample: np.ndarray, e: np.ndarray,
                   s: PNDMState) -> tuple[np.ndarray, PNDMState]:
        if not self.skip_prk_steps and len(s.ets) < 3:
            raise ValueError("pndm without skip_prk_steps needs its 12 Runge-Kutta warm-up steps first "
                             "(at least 4 inference steps, starting at index 0)")
        ratio = self.num_train_timesteps // schedule.num_inference_steps
        prev_t = t - ratio
        ets, cur_sample = s.ets, s.cur_sample
        if s.counter != 1:
            ets = ets[-3:] + (e,)
        else:
            # Warm-up step 1 re-does step 0 (from t + ratio, from the same sample) with the averaged output.
            prev_t, t = t, t + ratio
        if len(ets) == 1 and s.counter == 0:
            cur_sample = sample  # remembered for the Heun correction of the next call
        elif len(ets) == 1 and s.counter == 1:
            e = (e + ets[-1]) / 2
            sample, cur_sample = cur_sample, None
        elif len(ets) == 2:
            e = (3 * ets[-1] - ets[-2]) / 2  # Adams-Bashforth 2
        elif len(ets) == 3:
            e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12  # Adams-Bashforth 3
        else:
            e = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])  # Liu et al. eq. 12
        prev = self._prev_sample(sample, t, prev_t, e)
        return prev, PNDMState(s.counter + 1, ets, cur_sample, s.cur_model_output)

    def _step_prk(self, schedule: Schedule, t: int, sample: np.ndarray, e: np.ndarray,
                  s: PNDMState) -> tuple[np.ndarray, PNDMState]:
        """One stage of a pseudo 4th-order Runge-Kutta step (Liu et al. eq. 13), as diffusers' step_prk."""
        half = self.num_train_timesteps // schedule.num_inference_steps // 2
        prev_t = t - (0 if s.counter % 2 else half)
        t = int(schedule.extra("prk_timesteps")[s.counter // 4 * 4])
        ets, cur_sample, acc = s.ets, s.cur_sample, s.cur_model_output
        stage = s.counter % 4
        if stage == 0:
            acc = (1 / 6 * e) if acc is None else acc + 1 / 6 * e
            ets = ets + (e,)
            cur_sample = sample
        elif stage in (1, 2):
            acc = (1 / 3 * e) if acc is None else acc + 1 / 3 * e
        else:
            e = (1 / 6 * e) if acc is None else acc + 1 / 6 * e
            acc = None
        start = cur_sample if cur_sample is not None else sample
        prev = self._prev_sample(start, t, prev_t, e)
        return prev, PNDMState(s.counter + 1, ets, cur_sample, acc)

    def add_noise(self, schedule: Schedule, i: int, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return add_noise_vp(self.alphas_cumprod[int(schedule.timesteps[i])], original, noise)
