"""Tiled VAE decode and encode: large images through a small memory, in overlapping, blended tiles.

The VAE's activations grow with the image (a 512x512 decode holds several 512x512x128 fp32 tensors,
about 1.5 GB at its peak); in tiles they grow with the tile. Tiles overlap and are blended with linear
ramps where they meet, so the seams that plain tiling leaves (each tile's GroupNorm sees only itself)
fade out instead of showing as steps. A tile that touches the image border keeps full weight there.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis: every tile is `tile` long, neighbours share at least `overlap`, the
    last tile ends at the border."""
    if length <= tile:
        return [0]
    step = max(1, tile - overlap)
    origins = list(range(0, length - tile, step)) + [length - tile]
    return sorted(set(origins))


def _ramp(size: int, overlap: int, before: bool, after: bool) -> np.ndarray:
    """1-D blending weights of a tile: rising over `overlap` where a neighbour comes before, falling
    where one comes after; never exactly 0, so every pixel keeps some weight."""
    w = np.ones(size, dtype=np.float32)
    if overlap > 0:
        ramp = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        if before:
            w[:overlap] = np.minimum(w[:overlap], ramp)
        if after:
            w[-overlap:] = np.minimum(w[-overlap:], ramp[::-1])
    return w


def tiled(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, tile: int, overlap: int, scale: float) -> np.ndarray:
    """Apply `run` (a VAE decoder or encoder on one (1, C, h, w) array) tile by tile over x's last two
    axes and blend. `tile` and `overlap` are in x's units; the output is `scale` times x's size
    (8 for a decoder, 1/8 for an encoder)."""
    _, _, h, w = x.shape
    ys, xs = starts(h, tile, overlap), starts(w, tile, overlap)
    out = weight = None
    for y0 in ys:
        for x0 in xs:
            th, tw = min(tile, h), min(tile, w)
            part = run(np.ascontiguousarray(x[:, :, y0:y0 + th, x0:x0 + tw]))
            if out is None:
                out = np.zeros((x.shape[0], part.shape[1], round(h * scale), round(w * scale)), np.float32)
                weight = np.zeros((round(h * scale), round(w * scale)), np.float32)
            oy, ox, ov = round(y0 * scale), round(x0 * scale), round(overlap * scale)
            ph, pw = part.shape[2], part.shape[3]
            wy = _ramp(ph, ov, y0 > 0, y0 + th < h)
            wx = _ramp(pw, ov, x0 > 0, x0 + tw < w)
            mask = wy[:, None] * wx[None, :]
            out[:, :, oy:oy + ph, ox:ox + pw] += part * mask
            weight[oy:oy + ph, ox:ox + pw] += mask
    return out / weight
