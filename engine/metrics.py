"""How close two results are: pictures (the tests, the benchmarks) and tensors (the export's parity gates).

Two PSNRs, because a picture and a tensor have different peaks: an 8-bit image's is 255 whatever it shows,
while a model output has no fixed range, so the export measures against the reference's own largest
magnitude, as Apple's torch2coreml does. Both are `_psnr` of a mean squared error.
"""

from __future__ import annotations

import numpy as np


def psnr(a, b, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB between two images (PIL images or arrays of equal shape);
    infinite when they are equal. 40 dB on 8-bit images is a mean error of about 2.5 levels in 255."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} and {y.shape}")
    return _psnr(float(np.mean((x - y) ** 2)), peak)


def tensor_psnr(got: np.ndarray, want: np.ndarray) -> tuple[float | None, float]:
    """(PSNR in dB, max abs diff) of a model's output against its reference, the peak being the
    reference's largest magnitude. None when the two are identical; -inf when `got` is not finite."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if not np.isfinite(got).all():
        return float("-inf"), float("inf")
    diff = got - want
    mse = float(np.mean(diff ** 2))
    return (None if mse == 0 else _psnr(mse, max(float(np.abs(want).max()), 1e-12))), float(np.abs(diff).max())


def relative_error(got, want) -> float:
    """The largest ‖got - want‖ / ‖want‖ over a model's outputs (an array, or a tuple of them; torch
    tensors on the CPU are read as arrays), in float64."""
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    return max(float(np.linalg.norm(np.asarray(g, dtype=np.float64) - np.asarray(w, dtype=np.float64))
                     / max(float(np.linalg.norm(np.asarray(w, dtype=np.float64))), 1e-12))
               for g, w in zip(got, want))


def _psnr(mse: float, peak: float) -> float:
    return float("inf") if mse == 0 else float(10.0 * np.log10(peak ** 2 / mse))
