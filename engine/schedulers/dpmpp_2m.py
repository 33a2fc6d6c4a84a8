"""DPM-Solver++(2M): the second-order multistep solver of the diffusion ODE in data-prediction form
(Lu et al. 2022, "DPM-Solver++: fast solver for guided sampling of diffusion probabilistic models",
arXiv 2211.01095, algorithm 2), with Karras et al. 2022's sigma schedule as an option.

In log-SNR time lambda = log(alpha / sigma) the ODE's linear part is solved exactly, leaving an integral
of the model's x0 prediction, which is extrapolated from the current and the previous x0 estimates:

    h = lambda_next - lambda_i,   r = (lambda_i - lambda_prev) / h,
    D = x0_i + (x0_i - x0_prev) / (2 r),
    x_next = (sigma_next / sigma_i) x_i - alpha_next (exp(-h) - 1) D.

The first step of a run (no previous estimate) and the last step (down to sigma 0) are first order
(DDIM, D = x0_i). The previous x0 estimate is the `state` passed between steps.

Matches diffusers' DPMSolverMultistepScheduler with algorithm_type "dpmsolver++", solver_order 2,
solver_type "midpoint", lower_order_final True, final_sigmas_type "zero", and use_karras_sigmas False
("DPM++ 2M") or True ("DPM++ 2M Karras").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import Schedule, Scheduler, SchedulerConfig, alphas_cumprod_for


@dataclass(frozen=True)
class DPMState:
    previous_x0: np.ndarray  # the x0 prediction of the step before
    lower_order_nums: int  # how many steps this run has taken, capped at the solver order (2)


def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    """The VP pair (alpha_t, sigma_t) with alpha_t^2 + sigma_t^2 = 1 for the sigma = sigma_t / alpha_t."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def _lambda(alpha: np.float32, sigma: np.float32) -> np.float32:
    """Half the log-SNR, log(alpha / sigma); +inf at sigma 0."""
    with np.errstate(divide="ignore"):
        return np.log(alpha) - np.log(sigma)


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep whose (log-linearly interpolated) sigma is `sigma`."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigma))


class DPMPP2M(Scheduler):
    name = "dpmpp_2m"
    a1111_name = "DPM++ 2M"
    karras = False

    def __init__(self, config: SchedulerConfig | None = None):
        super().__init__(config)
        self.alphas_cumprod = alphas_cumprod_for(self.config)
        if self.config.get("rescale_betas_zero_snr", False):
            self.alphas_cumprod[-1] = 2.0**-24  # as diffusers: keeps the first sigma finite
        self.spacing = self.config.get("timestep_spacing", "linspace")
        self.steps_offset = self.config.get("steps_offset", 0)

    def schedule(self, num_inference_steps: int) -> Schedule:
        n, N = num_inference_steps, self.num_train_timesteps
        # n + 1 points with the last (t = 0) dropped (arXiv 2305.08891, table 2).
        if self.spacing == "linspace":
            timesteps = np.linspace(0, N - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif self.spacing == "leading":
            ratio = N // (n + 1)
            timesteps = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + self.steps_offset
        elif self.spacing == "trailing":
            timesteps = np.arange(N, 0, -N / n).round().astype(np.int64) - 1
        else:
            raise ValueError(f"timestep_spacing {self.spacing!r} is not supported (leading, linspace or trailing)")

        train_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # float32
        if self.karras:
            # Karras et al. 2022 eq. 5: uniform in sigma^(1/rho), rho = 7, between the training extremes;
            # the UNet is then given the (rounded) timestep of each sigma.
            log_sigmas = np.log(train_sigmas)
            sigma_min, sigma_max = train_sigmas[0].item(), train_sigmas[-1].item()
            rho = 7.0
            ramp = np.linspace(0, 1, n)
            min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
            sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
            timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
            if self.config.get("beta_schedule", "linear") != "squaredcos_cap_v2":
                timesteps = timesteps.round()
            timesteps = timesteps.astype(np.int64)
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # final_sigmas_type "zero"
        return Schedule(num_inference_steps=len(timesteps), timesteps=timesteps, init_noise_sigma=1.0,
                        sigmas=sigmas, order=1)

    def _x0(self, sigma: np.float32, sample: np.ndarray, model_output: np.ndarray) -> np.ndarray:
        """DPM-Solver++ integrates the data prediction x0(x_t) (Lu et al. 2022, section 3)."""
        if self.prediction_type == "sample":
            return model_output
        alpha_t, sigma_t = _alpha_sigma(sigma)
        if self.prediction_type == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        return alpha_t * sample - sigma_t * model_output  # v_prediction

    def step(self, schedule: Schedule, i: int, sample: np.ndarray, model_output: np.ndarray,
             state: Any = None, noise: np.ndarray | None = None) -> tuple[np.ndarray, DPMState]:
        sigmas = schedule.sigmas
        x0 = self._x0(sigmas[i], sample, model_output).astype(np.float32, copy=False)
        sample = sample.astype(np.float32, copy=False)
        lower_order_nums = state.lower_order_nums if state is not None else 0
        # The last step goes to sigma 0 (lambda = +inf): only the first-order update is finite there.
        last = i == len(schedule.timesteps) - 1

        alpha_t, sigma_t = _alpha_sigma(sigmas[i + 1])
        alpha_s0, sigma_s0 = _alpha_sigma(sigmas[i])
        lambda_t, lambda_s0 = _lambda(alpha_t, sigma_t), _lambda(alpha_s0, sigma_s0)
        h = lambda_t - lambda_s0
        if lower_order_nums < 1 or last:
            # First order (= DDIM): x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) x0 (Lu et al. eq. 5).
            prev = (sigma_t / sigma_s0) * sample - (alpha_t * (np.exp(-h) - 1.0)) * x0
        else:
            alpha_s1, sigma_s1 = _alpha_sigma(sigmas[i - 1])
            lambda_s1 = _lambda(alpha_s1, sigma_s1)
            r0 = (lambda_s0 - lambda_s1) / h
            d0, d1 = x0, (1.0 / r0) * (x0 - state.previous_x0)
            # Multistep second order, midpoint form (Lu et al. algorithm 2; diffusers' "midpoint").
            prev = ((sigma_t / sigma_s0) * sample
                    - (alpha_t * (np.exp(-h) - 1.0)) * d0
                    - 0.5 * (alpha_t * (np.exp(-h) - 1.0)) * d1)
        new_state = DPMState(previous_x0=x0, lower_order_nums=min(lower_order_nums + 1, 2))
        return prev.astype(np.float32, copy=False), new_state

    def add_noise(self, schedule: Schedule, i: int, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
        alpha_t, sigma_t = _alpha_sigma(schedule.sigmas[i])
        return (alpha_t * original + sigma_t * noise).astype(np.float32, copy=False)


class DPMPP2MKarras(DPMPP2M):
    name = "dpmpp_2m_karras"
    a1111_name = "DPM++ 2M Karras"
    karras = True
