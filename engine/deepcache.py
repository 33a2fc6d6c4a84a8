"""Feature caching across denoising steps (DeepCache, Ma et al. 2023, arXiv 2312.00858), training-free.

A UNet's deep features change slowly from one step to the next; its shallow path (conv_in, the first
down block's first layers, the last up block's last layers) is cheap and carries the detail. An export
with `--deep-cache` has a full UNet that also returns the feature entering the shallow path, and a shallow
UNet that takes it (engine/components.shallow_unet, export/wrappers.UnetShallow). With `cache_interval`
N, step n runs the full UNet when n is a multiple of N and the shallow one, on the feature the last full
step left, in between: about (N - 1) / N of the deep work saved. N = 1 runs the full UNet every step,
which is the plain UNet's computation.

The feature is per batch row, and classifier-free guidance splits rows into halves that may run apart
(one call after the other, or the conditional half alone outside a guidance interval): each half keeps
its own feature and the step it was made at, and a shallow step whose half has no feature from the last
full step runs the full UNet instead, so a cached step never uses a feature older than the interval.
"""

from __future__ import annotations

import numpy as np

HALVES = ("uncond", "cond")  # the order the pipeline batches classifier-free guidance's rows in


class FeatureCache:
    """The UNet stage's sessions behind one `run`: the full UNet, and the shallow one (None when the
    plan does not cache). `calls` counts each kind, for the tests and the timings."""

    def __init__(self, full, shallow=None, interval: int = 1):
        self.full, self.shallow, self.interval = full, shallow, interval
        self.features: dict[str, tuple[int, np.ndarray]] = {}  # half -> (step made at, its rows)
        self.calls = {"full": 0, "shallow": 0}

    def keep(self, name: str, value: np.ndarray) -> None:
        for session in (self.full, self.shallow):
            if session is not None:
                session.keep(name, value)

    def run(self, step: int, halves: tuple[str, ...], **inputs: np.ndarray) -> np.ndarray:
        """The noise prediction for `step` (counted from the first step run) of a call whose rows are
        `halves` in order (("uncond", "cond"), ("uncond",) or ("cond",)), equal parts of the batch."""
        if self.shallow is not None and step % self.interval:
            made = [self.features.get(h) for h in halves]
            if all(m is not None and step - m[0] < self.interval for m in made):
                self.calls["shallow"] += 1
                feature = np.concatenate([m[1] for m in made]) if len(made) > 1 else made[0][1]
                return self.shallow.run(**inputs, cache_feature=feature)["out_sample"]
        self.calls["full"] += 1
        out = self.full.run(**inputs)
        if self.shallow is not None:
            for half, rows in zip(halves, np.split(out["cache_feature"], len(halves))):
                self.features[half] = (step, rows)
        return out["out_sample"]
