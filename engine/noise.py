"""Seeded noise, the same on every backend and every machine.

The noise is drawn by numpy's own generator (PCG64), never by a device, so a seed names one picture
whatever runs it. Each use has its own stream, keyed by (seed, purpose, step): the initial latents of
seed 42 are the same whether the run is txt2img or img2img, whichever scheduler draws per-step noise.
As in AUTOMATIC1111, image k of a batch uses seed + k, so any image of a batch can be made again alone.
"""

from __future__ import annotations

import numpy as np

INITIAL, POSTERIOR, STEP, MASKED_POSTERIOR = 0, 1, 2, 3  # stream purposes
MAX_SEED = 2**32 - 1  # AUTOMATIC1111's and ComfyUI's range


def standard_normal(seed: int, purpose: int, shape: tuple[int, ...], step: int = 0) -> np.ndarray:
    rng = np.random.default_rng([seed, purpose, step])
    return rng.standard_normal(shape, dtype=np.float32)


def batch_noise(seeds: list[int], purpose: int, shape: tuple[int, ...], step: int = 0) -> np.ndarray:
    """(len(seeds), *shape): one draw per image of the batch, each from its own seed."""
    return np.stack([standard_normal(s, purpose, shape, step) for s in seeds])


def random_seed() -> int:
    return int(np.random.default_rng().integers(0, MAX_SEED + 1))
