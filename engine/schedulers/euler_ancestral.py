"""Euler ancestral ("Euler a"): an Euler step of the probability-flow ODE down to sigma_down, then fresh
noise of std sigma_up, so that sigma_down^2 + sigma_up^2 = sigma_next^2 (Karras et al. 2022, arXiv
2206.00364, section 4 "stochastic sampling"; k-diffusion's sample_euler_ancestral with eta = 1).

sigma_up is the std of DDPM's ancestral step from sigma to sigma_next (Ho et al. 2020, eq. 7, in the
sigma parametrisation). The final step has sigma_next = 0, so it adds no noise. Each step needs a fresh
standard normal `noise`, so the sampler is stochastic.

Matches diffusers' EulerAncestralDiscreteScheduler; the sigma schedule is Euler's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Schedule, Scheduler, SchedulerConfig
from .euler import euler_alphas_cumprod, init_noise_sigma, predicted_x0, sigma_schedule


class EulerAncestral(Scheduler):
    name = "euler_a"
    a1111_name = "Euler a"
    stochastic = True

    def __init__(self, config: SchedulerConfig | None = None):
        super().__init__(config)
        if self.prediction_type == "sample":
            # diffusers raises NotImplementedError for it at the first step.
            raise ValueError("euler_a supports prediction_type epsilon or v_prediction, not 'sample'")
        self.alphas_cumprod = euler_alphas_cumprod(self.config)

    def schedule(self, num_inference_steps: int) -> Schedule:
        timesteps, sigmas = sigma_schedule(self, self.alphas_cumprod, num_inference_steps)
        return Schedule(num_inference_steps=num_inference_steps, timesteps=timesteps,
                        init_noise_sigma=init_noise_sigma(self, sigmas), sigmas=sigmas, order=1)

    def scale_model_input(self, schedule: Schedule, i: int, sample: np.ndarray) -> np.ndarray:
        sigma = schedule.sigmas[i]
        return (sample / ((sigma**2 + 1) ** 0.5)).astype(np.float32, copy=False)

    def step(self, schedule: Schedule, i: int, sample: np.ndarray, model_output: np.ndarray,
             state: Any = None, noise: np.ndarray | None = None) -> tuple[np.ndarray, None]:
        sample = sample.astype(np.float32, copy=False)
        sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
        x0 = predicted_x0(self.prediction_type, sigma, sample, model_output)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        derivative = (sample - x0) / sigma
        prev = sample + derivative * (sigma_down - sigma)
        if noise is None:
            if sigma_up != 0:
                raise ValueError("euler_a needs `noise` (a standard normal array) for every step but the last")
        else:
            prev = prev + noise * sigma_up
        return prev.astype(np.float32, copy=False), None

    def add_noise(self, schedule: Schedule, i: int, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return (original + noise * schedule.sigmas[i]).astype(np.float32, copy=False)
