"""Tiled VAE decode and encode: large images through a small memory.

The VAE's activations grow with the image (a 512x512 decode holds several 512x512x128 fp32 tensors,
about 1.5 GB at its peak); in tiles they grow with the tile. Two ways, best first:

- `shared_stats_decode`, for exports that have the decoder's head and tail (export/wrappers.py). Cut
  into tiles, a decoder goes wrong in two places: its convolutions see past a tile's edge, and its
  GroupNorms normalise each tile by that tile's own statistics, so the tiles disagree in colour and
  contrast. Here each tile is decoded with a margin as wide as the tail's receptive field (so its core
  is what the whole decode computes there), and every tile normalises with the same image-wide
  statistics. Those come from the image at half the size: decoded whole when that fits in a tile, else
  by this same procedure one level down, its tiles' statistics merged. Measured on the built-in VAE at
  512x512: 42-52 dB against the whole decode, where blended tiles give 12-14 dB (tests/test_plan.py);
  on SD 1.5's VAE with random weights 24 dB (blended: 20), the half-size statistics being the error
  there (python -m edgediff.bench.tiled_vae): given the whole image's, its tiles measured 91 dB.
- `tiled`: overlapping tiles of any decoder or encoder, blended with linear ramps where they meet, so
  the seams fade out instead of showing as steps. For folders without the split decoder (optimum's, older
  exports) and for the encoder, whose output is a latent and forgives more.
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


# tail(hidden, norm_stats, stats_mask, stats_mix) -> (image, tile_stats): the split decoder's tail
Tail = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def chunks(length: int, tile: int) -> list[tuple[int, int]]:
    """Split [0, length) into the fewest near-equal parts no longer than `tile`."""
    n = -(-length // tile)
    edges = [round(k * length / n) for k in range(n + 1)]
    return list(zip(edges, edges[1:]))


def shared_stats_decode(head: Callable[[np.ndarray], np.ndarray], tail: Tail, z: np.ndarray, tile: int,
                        margin: int, norms: int, groups: int) -> np.ndarray:
    """Decode latents z (1, C, h, w) through the split decoder: the head whole, the tail in tiles of
    `tile` hidden pixels (plus `margin` on each side) normalised with image-wide statistics."""
    hidden = head(z)
    stats = _image_stats(tail, hidden, tile, margin, norms, groups)
    image, _ = _tail_tiles(tail, hidden, stats, tile, margin)
    return image


def _image_stats(tail: Tail, x: np.ndarray, tile: int, margin: int, norms: int, groups: int) -> np.ndarray:
    if max(x.shape[2:]) <= tile + 2 * margin:  # whole, with its own statistics: exact for this x
        unused = np.zeros((norms, x.shape[0], groups, 2), np.float32)
        _, stats = tail(x, unused, np.ones((1, 1) + x.shape[2:], np.float32), np.zeros(1, np.float32))
        return stats
    coarse = _image_stats(tail, _halve(x), tile, margin, norms, groups)
    _, stats = _tail_tiles(tail, x, coarse, tile, margin)
    return stats


def _tail_tiles(tail: Tail, x: np.ndarray, stats: np.ndarray, tile: int, margin: int):
    """Run the tail over disjoint tiles of x with the given statistics; return the image and the
    statistics of x that the tiles measured, merged."""
    _, _, h, w = x.shape
    image, measured, counts = None, [], []
    for y0, y1 in chunks(h, tile):
        for x0, x1 in chunks(w, tile):
            a0, a1, b0, b1 = max(0, y0 - margin), min(h, y1 + margin), max(0, x0 - margin), min(w, x1 + margin)
            mask = np.zeros((1, 1, a1 - a0, b1 - b0), np.float32)
            mask[:, :, y0 - a0:y1 - a0, x0 - b0:x1 - b0] = 1
            part, part_stats = tail(np.ascontiguousarray(x[:, :, a0:a1, b0:b1]), stats, mask, np.ones(1, np.float32))
            s = part.shape[2] // (a1 - a0)  # image pixels per hidden pixel
            if image is None:
                image = np.empty((x.shape[0], part.shape[1], h * s, w * s), np.float32)
            image[:, :, y0 * s:y1 * s, x0 * s:x1 * s] = part[:, :, (y0 - a0) * s:(y1 - a0) * s, (x0 - b0) * s:(x1 - b0) * s]
            measured.append(part_stats)
            counts.append((y1 - y0) * (x1 - x0))
    return image, merge_stats(measured, counts)


def merge_stats(stats: list[np.ndarray], counts: list[int]) -> np.ndarray:
    """Merge per-region (mean, variance) pairs (..., 2) into those of the union, weighting by the
    regions' sizes (the parallel variance formula: no sums of squares, no cancellation)."""
    n = np.asarray(counts, np.float64).reshape(-1, *([1] * (stats[0].ndim - 1)))
    s = np.stack(stats).astype(np.float64)
    total = n.sum()
    mean = (n * s[..., 0]).sum(0) / total
    var = (n * (s[..., 1] + (s[..., 0] - mean) ** 2)).sum(0) / total
    return np.stack([mean, var], -1).astype(np.float32)


def _halve(x: np.ndarray) -> np.ndarray:
    """x at half the size (2x2 means; an odd last row or column is dropped)."""
    b, c, h, w = x.shape
    x = x[:, :, :h // 2 * 2, :w // 2 * 2]
    return x.reshape(b, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))
