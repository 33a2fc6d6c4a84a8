"""The safety checker at run time: CLIP's image preprocessing in numpy and Pillow, so the runtime needs
neither torch nor transformers, and the exported classifier (diffusers' StableDiffusionSafetyChecker,
its `forward_onnx`) that blacks out the images it flags.

The preprocessing follows transformers' CLIPImageProcessor as Stable Diffusion's
feature_extractor/preprocessor_config.json configures it: the shortest side resized to 224 (bicubic,
from the 8-bit picture as diffusers hands it over), a centre crop, rescale to [0, 1], CLIP's mean and std.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipPreprocess:
    shortest_edge: int = 224
    crop: tuple[int, int] = (224, 224)  # (height, width)
    resample: int = Image.Resampling.BICUBIC
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    @classmethod
    def from_folder(cls, folder: Path) -> "ClipPreprocess":
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            return cls()
        c = json.loads(path.read_text())
        size = c.get("size", 224)
        edge = size.get("shortest_edge", 224) if isinstance(size, dict) else int(size)
        crop = c.get("crop_size", 224)
        crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
        return cls(edge, crop, int(c.get("resample", Image.Resampling.BICUBIC)),
                   tuple(c.get("image_mean", CLIP_MEAN)), tuple(c.get("image_std", CLIP_STD)))

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        """PIL images -> (B, 3, crop_h, crop_w) float32."""
        out = []
        for image in images:
            w, h = image.size
            scale = self.shortest_edge / min(w, h)
            # transformers rounds the long side the same way (get_resize_output_image_size)
            size = (self.shortest_edge, int(h * scale)) if w <= h else (int(w * scale), self.shortest_edge)
            resized = image.convert("RGB").resize(size, resample=self.resample)
            ch, cw = self.crop
            top, left = (resized.height - ch) // 2, (resized.width - cw) // 2
            a = np.asarray(resized, dtype=np.float32)[top:top + ch, left:left + cw] / 255.0
            out.append(((a - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)).transpose(2, 0, 1))
        return np.stack(out).astype(np.float32)
