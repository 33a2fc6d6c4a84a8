"""Euler: the first-order solver of the probability-flow ODE in the sigma parametrisation of Karras et al.
2022 ("Elucidating the design space of diffusion-based generative models", arXiv 2206.00364, alg. 1
without the second-order correction).

With sigma = sqrt((1 - a_t) / a_t), x = x_0 + sigma eps is the sample the UNet sees scaled by
1 / sqrt(sigma^2 + 1) (so its input has the DDPM variance). The ODE is dx/dsigma = (x - x0(x)) / sigma,
and one Euler step goes from sigmas[i] to sigmas[i + 1] (the last one is 0).

Matches diffusers' EulerDiscreteScheduler with its default settings: linear interpolation of sigma
between training timesteps, discrete (float) timesteps, final sigma zero, no churn (s_churn = 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Schedule, Scheduler, SchedulerConfig, alphas_cumprod_for


def sigma_schedule(scheduler: Scheduler, alphas_cumprod: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps float32, sigmas float32 with a final 0) as diffusers' Euler schedulers compute them
    (default `timestep_spacing` "linspace"; arXiv 2305.08891, table 2)."""
    N = scheduler.num_train_timesteps
    spacing = scheduler.config.get("timestep_spacing", "linspace")
    if spacing == "linspace":
        timesteps = np.linspace(0, N - 1, n, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        timesteps = (np.arange(0, n) * (N // n)).round()[::-1].astype(np.float32)
        timesteps += scheduler.config.get("steps_offset", 0)
    elif spacing == "trailing":
        timesteps = np.arange(N, 0, -N / n).round().astype(np.float32) - 1
    else:
        raise ValueError(f"timestep_spacing {spacing!r} is not supported (leading, linspace or trailing)")
    train_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # float32, one per training timestep
    # Linear interpolation (in float64) between the training sigmas at fractional timesteps.
    sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return timesteps, sigmas


def euler_alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    alphas_cumprod = alphas_cumprod_for(config)
    if config.get("rescale_betas_zero_snr", False):
        # Zero terminal SNR gives an infinite first sigma; diffusers uses the smallest fp16 subnormal.
        alphas_cumprod[-1] = 2.0**-24
    return alphas_cumprod


def init_noise_sigma(scheduler: Scheduler, sigmas: np.ndarray) -> float:
    """The initial latent's std: sigma_max, or sqrt(sigma_max^2 + 1) for "leading" spacing, whose first
    timestep (e.g. 951) is below the last training one (diffusers' rule, computed in float32)."""
    max_sigma = sigmas.max()
    if scheduler.config.get("timestep_spacing", "linspace") in ("linspace", "trailing"):
        return float(max_sigma)
    return float((max_sigma**2 + 1) ** 0.5)


def predicted_x0(prediction_type: str, sigma: np.float32, sample: np.ndarray,
                 model_output: np.ndarray) -> np.ndarray:
    """The denoised estimate D(x; sigma) (Karras et al. table 1 with VP preconditioning)."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        # c_out = -sigma / sqrt(sigma^2 + 1), c_skip = 1 / (sigma^2 + 1) (Salimans & Ho 2022)
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
    return model_output  # "sample": the model predicts x0 directly


class Euler(Scheduler):
    name = "euler"
    a1111_name = "Euler"

    def __init__(self, config: SchedulerConfig | None = None):
        super().__init__(config)
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
        sigma = schedule.sigmas[i]  # s_churn = 0, so sigma_hat = sigma
        x0 = predicted_x0(self.prediction_type, sigma, sample, model_output)
        derivative = (sample - x0) / sigma  # dx/dsigma (Karras et al. eq. 1 for sigma(t) = t)
        dt = schedule.sigmas[i + 1] - sigma
        prev = sample + derivative * dt
        return prev.astype(np.float32, copy=False), None

    def add_noise(self, schedule: Schedule, i: int, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
        # The variance-exploding form: x = x0 + sigma eps (the UNet input is rescaled separately).
        return (original + noise * schedule.sigmas[i]).astype(np.float32, copy=False)
