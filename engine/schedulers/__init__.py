"""Stable Diffusion schedulers in numpy, matching Hugging Face diffusers step for step (see base.py)."""

from __future__ import annotations

from ..errors import EdgediffError
from .base import Schedule, Scheduler, SchedulerConfig
from .ddim import DDIM
from .dpmpp_2m import DPMPP2M, DPMPP2MKarras
from .euler import Euler
from .euler_ancestral import EulerAncestral
from .lcm import LCM
from .pndm import PNDM

SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.name: cls for cls in (PNDM, DDIM, Euler, EulerAncestral, DPMPP2M, DPMPP2MKarras, LCM)
}


def get_scheduler(name: str, config: SchedulerConfig) -> Scheduler:
    """The scheduler registered under `name`, built from the model's scheduler config."""
    try:
        cls = SCHEDULERS[name]
    except KeyError:
        raise EdgediffError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULERS)}") from None
    return cls(config)


__all__ = ["SCHEDULERS", "Schedule", "Scheduler", "SchedulerConfig", "get_scheduler"]
