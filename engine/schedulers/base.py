"""What every scheduler shares: the training noise schedule, the config it is read from, and the protocol.

A scheduler here holds no counter. `schedule(n)` returns a frozen `Schedule` (timesteps, sigmas, ...),
and `step(schedule, i, sample, model_output, state, noise)` depends only on its arguments: the multistep
solvers (PLMS, DPM++ 2M) carry their history in the `state` value that `step` returns and that the
caller passes back in. So the same call always gives the same answer, a run can start at any index
(img2img starts part-way), and two runs never share anything.

The maths follows Hugging Face diffusers' schedulers of the same name step for step, in numpy, because
the images must match diffusers' (tests/test_schedulers.py compares every step to 1e-5 relative).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SchedulerConfig:
    """The keys of a model folder's `scheduler/scheduler_config.json` that the schedulers read.

    A key the file does not carry is None here, and each scheduler then uses its own default, exactly
    as diffusers' `SchedulerClass.from_config(config)` does (for example `timestep_spacing` defaults to
    "leading" for PNDM and DDIM but "linspace" for Euler and DPM++).
    """

    num_train_timesteps: int | None = None  # 1000 for every Stable Diffusion release
    beta_start: float | None = None  # 0.00085 for SD 1.x and 2.x
    beta_end: float | None = None  # 0.012 for SD 1.x and 2.x
    beta_schedule: str | None = None  # "scaled_linear" for SD (linear in sqrt(beta)), or "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str | None = None  # "epsilon" (SD 1.x, SD 2 base) or "v_prediction" (SD 2 768)
    steps_offset: int | None = None  # SD configs say 1: "leading" timesteps are shifted by this
    timestep_spacing: str | None = None  # "leading", "linspace" or "trailing" (arXiv 2305.08891, table 2)
    set_alpha_to_one: bool | None = None  # DDIM/PNDM: alpha of the step before t=0; SD says False
    clip_sample: bool | None = None
    clip_sample_range: float | None = None
    skip_prk_steps: bool | None = None  # PNDM: SD skips the Runge-Kutta warm-up (PLMS only)
    rescale_betas_zero_snr: bool | None = None
    original_inference_steps: int | None = None  # LCM: the distillation schedule length (50)
    timestep_scaling: float | None = None  # LCM boundary condition scale (10.0)
    extras: tuple[tuple[str, Any], ...] = field(default=())  # keys we do not read, kept for printing

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "SchedulerConfig":
        """The config of a scheduler_config.json; a value no scheduler could use raises ValueError naming
        the key (a damaged file must fail when it is read, in one line, not mid-generation)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extras"}
        known = {k: v for k, v in raw.items() if k in names}
        for key, value in known.items():
            if value is not None and not _valid(key, value):
                raise ValueError(f"{key} is {value!r}; {VALID_VALUES[key][1]}")
        if known.get("trained_betas") is not None:
            known["trained_betas"] = tuple(float(b) for b in known["trained_betas"])
        extras = tuple(sorted((k, v) for k, v in raw.items() if k not in names and not k.startswith("_")
                              and isinstance(v, (str, int, float, bool, type(None)))))
        return cls(**known, extras=extras)

    @classmethod
    def from_file(cls, path: str | Path) -> "SchedulerConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def get(self, key: str, default: Any) -> Any:
        """The config's value for `key`, or the scheduler's own `default` where the file has none."""
        value = getattr(self, key)
        return default if value is None else value


def _whole(lo: int, hi: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _real(lo: float, hi: float):
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi


def _one_of(*names: str):
    return lambda v: v in names


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
MAX_TRAIN_TIMESTEPS = 100_000  # SD trains with 1000; a larger count is a damaged file, not a schedule
# key -> (test of a value, what the key takes): every value a scheduler here reads, checked once.
VALID_VALUES: dict[str, tuple[Any, str]] = {
    "num_train_timesteps": (_whole(1, MAX_TRAIN_TIMESTEPS), f"it takes a whole number from 1 to {MAX_TRAIN_TIMESTEPS}"),
    "beta_start": (_real(0.0, 1.0), "it takes a number between 0 and 1 (SD: 0.00085)"),
    "beta_end": (_real(0.0, 1.0), "it takes a number between 0 and 1 (SD: 0.012)"),
    "beta_schedule": (_one_of(*BETA_SCHEDULES), f"it takes one of {', '.join(BETA_SCHEDULES)}"),
    "trained_betas": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_real(0.0, 1.0)(b) for b in v),
                      "it takes a list of numbers between 0 and 1"),
    "prediction_type": (_one_of(*PREDICTION_TYPES), f"it takes one of {', '.join(PREDICTION_TYPES)}"),
    "steps_offset": (_whole(0, MAX_TRAIN_TIMESTEPS), "it takes a whole number (SD: 1)"),
    "timestep_spacing": (_one_of(*TIMESTEP_SPACINGS), f"it takes one of {', '.join(TIMESTEP_SPACINGS)}"),
    "set_alpha_to_one": (lambda v: isinstance(v, bool), "it takes true or false"),
    "clip_sample": (lambda v: isinstance(v, bool), "it takes true or false"),
    "clip_sample_range": (_real(1e-6, 1e6), "it takes a positive number (1.0)"),
    "skip_prk_steps": (lambda v: isinstance(v, bool), "it takes true or false"),
    "rescale_betas_zero_snr": (lambda v: isinstance(v, bool), "it takes true or false"),
    "original_inference_steps": (_whole(1, MAX_TRAIN_TIMESTEPS), "it takes a whole number (LCM: 50)"),
    "timestep_scaling": (_real(1e-6, 1e6), "it takes a positive number (LCM: 10.0)"),
}


def _valid(key: str, value: Any) -> bool:
    return bool(VALID_VALUES[key][0](value))


def betas_for(config: SchedulerConfig, *, beta_start: float = 0.0001, beta_end: float = 0.02,
              beta_schedule: str = "linear", zero_snr_supported: bool = True) -> np.ndarray:
    """The training betas (float32, as diffusers keeps them) for the config's beta schedule.

    The keyword arguments are the calling scheduler's own defaults for keys the config lacks (diffusers'
    LCMScheduler defaults to SD's scaled_linear 0.00085..0.012, the others to linear 0.0001..0.02).
    `zero_snr_supported=False` ignores `rescale_betas_zero_snr`, as diffusers' PNDMScheduler does (it has
    no such argument, so `from_config` drops the key).
    """
    n = config.get("num_train_timesteps", 1000)
    start, end = config.get("beta_start", beta_start), config.get("beta_end", beta_end)
    kind = config.get("beta_schedule", beta_schedule)
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, dtype=np.float32)
    elif kind == "linear":
        betas = _torch_linspace32(start, end, n)
    elif kind == "scaled_linear":
        # Stable Diffusion's schedule: linear in sqrt(beta), computed in float32 by diffusers.
        betas = _torch_linspace32(start**0.5, end**0.5, n) ** 2
    elif kind == "squaredcos_cap_v2":
        # Glide cosine schedule (Nichol & Dhariwal 2021, eq. 17), max beta 0.999.
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                         dtype=np.float32)
    else:
        raise ValueError(f"beta_schedule {kind!r} is not supported (use linear, scaled_linear or "
                         "squaredcos_cap_v2)")
    if zero_snr_supported and config.get("rescale_betas_zero_snr", False):
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _torch_linspace32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=torch.float32) on CPU, bit for bit.

    numpy's float32 linspace (computed in float64, then rounded) differs from torch's in ~15% of the
    entries by an ulp. torch's CPU kernel works in float32: step = (end - start) / (n - 1), the first
    half start + step * i, the second half end - step * (n - 1 - i), each a fused multiply-add (its
    AVX2/AVX512 builds contract it), i.e. one rounding of the exact value, which float64 reproduces.
    """
    s, e = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([s], dtype=np.float32)
    step = np.float64((e - s) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    first = np.float64(s) + step * i
    second = np.float64(e) - step * (n - 1 - i)
    return np.where(i < n // 2, first, second).astype(np.float32)


def _cumprod32(x: np.ndarray) -> np.ndarray:
    """torch.cumprod of a float32 CPU tensor: the running product is accumulated in float64 and each
    entry rounded to float32 (a plain float32 numpy cumprod drifts ~1e-6 away by t=999)."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (Lin et al. 2023, arXiv 2305.08891, algorithm 1)."""
    alphas_bar_sqrt = np.sqrt(_cumprod32(1.0 - betas))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))  # diffusers' operation order
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(np.float32)


def alphas_cumprod_for(config: SchedulerConfig, **defaults: Any) -> np.ndarray:
    """Cumulative product of (1 - beta): the signal fraction at each training timestep (float32).
    `defaults` are passed to `betas_for` (the scheduler's own defaults)."""
    return _cumprod32(1.0 - betas_for(config, **defaults))


def add_noise_vp(alpha_cumprod_t: np.float32, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """The DDPM forward process q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I) (Ho et al. 2020, eq. 4), in
    float32 like diffusers' DDPM-style `add_noise` (PNDM, DDIM, LCM)."""
    a = np.float32(alpha_cumprod_t)
    return (a**0.5 * original + (1 - a) ** 0.5 * noise).astype(np.float32, copy=False)


@dataclass(frozen=True)
class Schedule:
    """One run's schedule, computed once by `Scheduler.schedule(n)` and never changed.

    `timesteps[i]` is what the UNet is given at step i; `sigmas` (for the sigma-based solvers) has one
    more entry than there are steps, the last being the final noise level (usually 0). `data` holds
    whatever else a scheduler precomputes (read only).
    """

    num_inference_steps: int
    timesteps: np.ndarray  # (n_steps,) int64, or float32 for the Euler ones (as diffusers)
    init_noise_sigma: float
    sigmas: np.ndarray | None = None  # (n_steps + 1,) for Euler, Euler a, DPM++; None otherwise
    order: int = 1  # diffusers' `order`: img2img skips `t_start * order` entries of `timesteps`
    data: tuple[tuple[str, Any], ...] = ()

    def extra(self, key: str) -> Any:
        return dict(self.data)[key]

    def __len__(self) -> int:
        return len(self.timesteps)


class Scheduler:
    """The protocol every scheduler implements. `name` is the API/CLI name, `a1111_name` the sampler
    name AUTOMATIC1111 writes in PNG metadata, `stochastic` whether `step` needs fresh `noise`."""

    name: str = ""
    a1111_name: str = ""
    stochastic: bool = False

    def __init__(self, config: SchedulerConfig | None = None):
        self.config = config or SchedulerConfig()
        self.prediction_type = self.config.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported")
        self.num_train_timesteps = self.config.get("num_train_timesteps", 1000)

    def schedule(self, num_inference_steps: int) -> Schedule:
        raise NotImplementedError("need schedule")

    def sigma(self, schedule: Schedule, i: int) -> float:
        """Step i's noise level as a sigma, sqrt((1 - a_t) / a_t): the sigma-based solvers' own, else that
        of the step's timestep on the training schedule. Guidance intervals are given on this scale, as
        in Kynkaanniemi et al. 2024 (arXiv 2404.07724), whatever the solver."""
        if schedule.sigmas is not None:
            return float(schedule.sigmas[i])
        alphas = getattr(self, "alphas_cumprod", None)
        alphas = alphas_cumprod_for(self.config) if alphas is None else alphas
        t = min(max(int(round(float(schedule.timesteps[i]))), 0), len(alphas) - 1)
        return float(np.sqrt((1 - alphas[t]) / alphas[t]))

    def scale_model_input(self, schedule: Schedule, i: int, sample: np.ndarray) -> np.ndarray:
        """The UNet's input at step i (sigma-based solvers divide by sqrt(sigma^2 + 1))."""
        return sample

    def step(self, schedule: Schedule, i: int, sample: np.ndarray, model_output: np.ndarray,
             state: Any = None, noise: np.ndarray | None = None) -> tuple[np.ndarray, Any]:
        """One denoising step from index i to i + 1. Returns (previous sample, new state).

        `state` is None on the first step of a run and afterwards whatever the last step returned.
        `noise` is a standard normal array of `sample`'s shape, required when `stochastic` is True.
        """
        raise NotImplementedError("need step")

    def add_noise(self, schedule: Schedule, i: int, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """`original` noised to the level of step i (img2img and inpainting start there)."""
        raise NotImplementedError("need add_noise")

    def start_index(self, schedule: Schedule, strength: float) -> int:
        """Where an img2img run of the given strength starts in `schedule.timesteps`: diffusers'
        `get_timesteps` keeps the last int(n * strength) steps."""
        n = schedule.num_inference_steps
        init_steps = min(int(n * strength), n)
        return max(n - init_steps, 0) * schedule.order

    def partial_schedule(self, num_inference_steps: int, strength: float) -> tuple[Schedule, int]:
        """The schedule of an img2img run and the index it starts at. Most schedulers skip the first
        steps of the full schedule; LCM instead spreads its steps over the lower timesteps."""
        schedule = self.schedule(num_inference_steps)
        return schedule, self.start_index(schedule, strength)
