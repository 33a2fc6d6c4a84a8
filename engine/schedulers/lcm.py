"""LCM: multistep latent consistency sampling (Luo et al. 2023, "Latent consistency models",
arXiv 2310.04378, algorithm 3).

A consistency model maps any x_t straight to an estimate of x0 through the boundary-condition
parametrisation of Song et al. 2023 (consistency models, eq. 7):

    f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t),
    c_skip = s^2 / ((10 t)^2 + s^2),  c_out = 10 t / sqrt((10 t)^2 + s^2),  s = sigma_data = 0.5,

(timestep_scaling 10 makes c_skip ~ 0 except at t ~ 0). Between steps the estimate is re-noised to the
next timestep with fresh noise (DDPM forward process), so the sampler is stochastic; the last step
returns the estimate itself. Timesteps are taken evenly from the distillation schedule
[k - 1, 2k - 1, ..., N - 1], k = N // original_inference_steps (50), which ignores timestep_spacing.

Matches diffusers' LCMScheduler (whose beta defaults are SD's scaled_linear 0.00085..0.012).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Schedule, Scheduler, SchedulerConfig, add_noise_vp, alphas_cumprod_for

SIGMA_DATA = 0.5


class LCM(Scheduler):
    name = "lcm"
    a1111_name = "LCM"
    stochastic = True

    def __init__(self, config: SchedulerConfig | None = None):
        super().__init__(config)
        self.alphas_cumprod = alphas_cumprod_for(self.config, beta_start=0.00085, beta_end=0.012,
                                                 beta_schedule="scaled_linear")
        one = self.config.get("set_alpha_to_one", True)
        self.final_alpha_cumprod = np.float32(1.0) if one else self.alphas_cumprod[0]
        self.original_steps = self.config.get("original_inference_steps", 50)
        self.timestep_scaling = self.config.get("timestep_scaling", 10.0)
        self.clip_sample = self.config.get("clip_sample", False)
        self.clip_sample_range = self.config.get("clip_sample_range", 1.0)

    def schedule(self, num_inference_steps: int, strength: float = 1.0) -> Schedule:
        """`strength` < 1 is diffusers' LCM img2img schedule: n steps spread over only the lowest
        int(50 * strength) distillation timesteps (LatentConsistencyModelImg2ImgPipeline runs all of them,
        it does not skip steps; so start_index of such a schedule should be 0)."""
        n, N, orig = num_inference_steps, self.num_train_timesteps, self.original_steps
        if orig > N:
            raise ValueError(f"lcm: original_inference_steps {orig} is more than the {N} training timesteps")
        if n > N:
            raise ValueError(f"lcm: {n} steps is more than the {N} training timesteps")
        k = N // orig
        origin = np.asarray(list(range(1, int(orig * strength) + 1))) * k - 1
        if len(origin) // n < 1:
            raise ValueError(f"lcm: {n} steps is more than the {len(origin)} distillation timesteps "
                             f"(original_inference_steps {orig} x strength {strength})")
        if n > orig:
            raise ValueError(f"lcm: {n} steps is more than original_inference_steps ({orig})")
        origin = origin[::-1].copy()
        indices = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        timesteps = origin[indices].astype(np.int64)
        return Schedule(num_inference_steps=n, timesteps=timesteps, init_noise_sigma=1.0, order=1)

    def _boundary_scalings(self, t: int) -> tuple[np.float32, np.float32]:
        """c_skip(t), c_out(t) (float32, as diffusers computes them from a tensor timestep)."""
        scaled = np.float32(t) * np.float32(self.timestep_scaling)
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
        return c_skip, c_out

    def step(self, schedule: Schedule, i: int, sample: np.ndarray, model_output: np.ndarray,
             state: Any = None, noise: np.ndarray | None = None) -> tuple[np.ndarray, None]:
        t = int(schedule.timesteps[i])
        last = i == schedule.num_inference_steps - 1
        prev_t = int(schedule.timesteps[i + 1]) if i + 1 < len(schedule.timesteps) else t
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t, b_prev = 1 - a_t, 1 - a_prev
        c_skip, c_out = self._boundary_scalings(t)

        if self.prediction_type == "epsilon":
            x0 = (sample - np.sqrt(b_t) * model_output) / np.sqrt(a_t)
        elif self.prediction_type == "sample":
            x0 = model_output
        else:  # v_prediction (Salimans & Ho 2022)
            x0 = np.sqrt(a_t) * sample - np.sqrt(b_t) * model_output
        if self.clip_sample:
            x0 = np.clip(x0, -self.clip_sample_range, self.clip_sample_range)

        denoised = c_out * x0 + c_skip * sample  # the consistency function f(x_t, t)
        if last:
            prev = denoised
        else:
            if noise is None:
                raise ValueError("lcm needs `noise` (a standard normal array) for every step but the last")
            # Re-noise the estimate to the next timestep: q(x_prev | x0) (Luo et al. algorithm 3, line 5).
            prev = np.sqrt(a_prev) * denoised + np.sqrt(b_prev) * noise
        return prev.astype(np.float32, copy=False), None

    def add_noise(self, schedule: Schedule, i: int, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return add_noise_vp(self.alphas_cumprod[int(schedule.timesteps[i])], original, noise)

    def partial_schedule(self, num_inference_steps: int, strength: float) -> tuple[Schedule, int]:
        # diffusers' LCM img2img pipeline runs all n steps over the lowest int(50 * strength) timesteps.
        return self.schedule(num_inference_steps, strength), 0
