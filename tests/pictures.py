"""Deterministic pictures for img2img and inpainting tests."""

import numpy as np
from PIL import Image


def scene(width: int = 64, height: int = 64) -> Image.Image:
    """A deterministic picture to start img2img and inpainting from: a gradient with a square."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 96)], axis=-1).astype(np.uint8)
    rgb[height // 4: height // 2, width // 4: width // 2] = (230, 40, 40)
    return Image.fromarray(rgb)


def centre_mask(width: int = 64, height: int = 64) -> Image.Image:
    """White (repaint) in the centre half, black (keep) around it."""
    m = np.zeros((height, width), dtype=np.uint8)
    m[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
    return Image.fromarray(m)
