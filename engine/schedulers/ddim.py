"""DDIM: denoising diffusion implicit models (Song, Meng & Ermon 2020, arXiv 2010.02502).

A non-Markovian process with the same marginals as DDPM, so a model trained for DDPM can skip timesteps.
Each step predicts x0 from the model output and moves to the previous timestep's marginal (eq. 12):

    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s_t^2) eps + s_t z,
    s_t = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)            (eq. 16)

eta = 0 (the default) is the deterministic DDIM sampler; eta = 1 is DDPM's ancestral sampler, and then
`step` needs `noise` (z). Matches diffusers' DDIMScheduler (without dynamic thresholding).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Schedule, Scheduler, SchedulerConfig, add_noise_vp, alphas_cumprod_for


class DDIM(Scheduler):
    name = "ddim"
    a1111_name = "DDIM"

    def __init__(self, config: SchedulerConfig | None = None, eta: float = 0.0):
        super().__init__(config)
        self.eta = float(eta)
        self.stochastic = self.eta > 0
        self.alphas_cumprod = alphas_cumprod_for(self.config)
        # diffusers' DDIM defaults differ from PNDM's: set_alpha_to_one True and clip_sample True.
        one = self.config.get("set_alpha_to_one", True)
        self.final_alpha_cumprod = np.float32(1.0) if one else self.alphas_cumprod[0]
        self.clip_sample = self.config.get("clip_sample", True)
        self.clip_sample_range = self.config.get("clip_sample_range", 1.0)
        self.spacing = self.config.get("timestep_spacing", "leading")
        self.steps_offset = self.config.get("steps_offset", 0)

    def schedule(self, num_inference_steps: int) -> Schedule:
        n, N = num_inference_steps, self.num_train_timesteps
        if n > N:
            raise ValueError(f"ddim: {n} steps is more than the {N} training timesteps")
        # Descending training timesteps (arXiv 2305.08891, table 2).
        if self.spacing == "linspace":
            timesteps = np.linspace(0, N - 1, n).round()[::-1].astype(np.int64)
        elif self.spacing == "leading":
            timesteps = (np.arange(0, n) * (N // n)).round()[::-1].astype(np.int64) + self.steps_offset
        elif self.spacing == "trailing":
            timesteps = np.round(np.arange(N, 0, -N / n)).astype(np.int64) - 1
        else:
            raise ValueError(f"timestep_spacing {self.spacing!r} is not supported (leading, linspace or trailing)")
        return Schedule(num_inference_steps=n, timesteps=timesteps, init_noise_sigma=1.0, order=1)

    def step(self, schedule: Schedule, i: int, sample: np.ndarray, model_output: np.ndarray,
             state: Any = None, noise: np.ndarray | None = None) -> tuple[np.ndarray, None]:
        t = int(schedule.timesteps[i])
        # diffusers steps back a fixed N // n, whatever the spacing (so not always to timesteps[i + 1]).
        prev_t = t - self.num_train_timesteps // schedule.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t = 1 - a_t

        # x0 and eps from the model output (eq. 12's "predicted x0"; v as in Salimans & Ho 2022).
        if self.prediction_type == "epsilon":
            x0 = (sample - b_t**0.5 * model_output) / a_t**0.5
            eps = model_output
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (sample - a_t**0.5 * x0) / b_t**0.5
        else:  # v_prediction
            x0 = (a_t**0.5) * sample - (b_t**0.5) * model_output
            eps = (a_t**0.5) * model_output + (b_t**0.5) * sample
        if self.clip_sample:
            x0 = np.clip(x0, -self.clip_sample_range, self.clip_sample_range)

        variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)  # eq. 16 without eta
        std_dev = self.eta * variance**0.5
        direction = (1 - a_prev - std_dev**2) ** 0.5 * eps  # "direction pointing to x_t"
        prev = a_prev**0.5 * x0 + direction
        if self.eta > 0:
            if noise is None:
                raise ValueError("ddim with eta > 0 needs `noise` for every step")
            prev = prev + std_dev * noise
        return prev.astype(np.float32, copy=False), None

    def add_noise(self, schedule: Schedule, i: int, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return add_noise_vp(self.alphas_cumprod[int(schedule.timesteps[i])], original, noise)
