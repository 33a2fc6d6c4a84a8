"""Image comparison used by the export parity checks, the tests and the benchmarks."""

from __future__ import annotations

import numpy as np


def psnr(a, b, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB between two images (PIL images or arrays of equal shape);
    infinite when they are equal. 40 dB on 8-bit images is a mean error of about 2.5 levels in 255."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} and {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak**2 / mse)
