"""Images in and out: reading init images and masks, converting to and from the VAE's tensors, and
writing PNGs with their generation parameters in AUTOMATIC1111's format.

The conversions match diffusers' `VaeImageProcessor` (Lanczos resize, [-1, 1] range, masks binarized at
0.5), so edgediff and diffusers see the same tensors for the same picture.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from .errors import EdgediffError, EdgediffTypeError, first_line
from .files import partial_prefix, sweep_partials, umask


# The largest init image or mask edgediff reads: 64 megapixels (8192x8192), several times any model's
# training size. Checked from the file's header before any pixel is decoded, so a decompression bomb (a
# small PNG that inflates to gigabytes) costs nothing; PIL's own guard only warns below twice its limit.
MAX_INPUT_PIXELS = 8192 * 8192


def open_image(image, what: str) -> Image.Image:
    """A PIL image from a PIL image or a path; `what` names it in the error ("init image", "mask")."""
    if isinstance(image, Image.Image):
        _check_pixels(image.size, what, "")
        return image
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:  # reads the header only
                _check_pixels(im.size, what, f" {str(image)!r}")
                im.load()
                return im.copy()
        except Image.DecompressionBombError:  # PIL's own refusal, at twice its limit, as it opens
            raise EdgediffError(f"the {what} {str(image)!r} is larger than the {MAX_INPUT_PIXELS // 2**20} "
                                "megapixels edgediff reads; scale it down first") from None
        except (OSError, ValueError) as e:
            if isinstance(e, EdgediffError):
                raise
            raise EdgediffError(f"cannot read the {what} {str(image)!r}: {first_line(e)}") from None
    raise EdgediffTypeError(f"the {what} must be a PIL image or a path, not {type(image).__name__}")


def _check_pixels(size: tuple[int, int], what: str, name: str) -> None:
    width, height = size
    if width * height > MAX_INPUT_PIXELS:
        raise EdgediffError(f"the {what}{name} is {width}x{height} pixels, more than the {MAX_INPUT_PIXELS // 2**20} "
                            "megapixels edgediff reads; scale it down first")
    if width < 1 or height < 1:
        raise EdgediffError(f"the {what}{name} is empty ({width}x{height} pixels)")


def to_tensor(image: Image.Image, width: int, height: int) -> np.ndarray:
    """(1, 3, height, width) float32 in [-1, 1], resized with Lanczos where the size differs."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return (array.transpose(2, 0, 1)[None] * 2.0 - 1.0).astype(np.float32)


def mask_to_tensor(mask: Image.Image, width: int, height: int) -> np.ndarray:
    """(1, 1, height, width) float32 of 0 (keep) and 1 (repaint): grey, resized, binarized at 0.5."""
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(mask, dtype=np.float32) / 255.0
    return (array >= 0.5).astype(np.float32)[None, None]


def to_pil(decoded: np.ndarray) -> list[Image.Image]:
    """VAE output (B, 3, H, W) in [-1, 1] to PIL images, rounded as diffusers rounds."""
    array = np.clip(decoded / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


@dataclass(frozen=True)
class Parameters:
    """What made one image, written as AUTOMATIC1111's `parameters` PNG text chunk, which image
    browsers and metadata readers of the Stable Diffusion world parse."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str  # AUTOMATIC1111's sampler name, e.g. "Euler a"
    cfg_scale: float
    seed: int
    width: int
    height: int
    model: str
    denoising_strength: float | None = None  # img2img and inpainting only
    schedule_type: str | None = None  # AUTOMATIC1111's "Schedule type" when not the model's own ("SGM Uniform")
    # the LoRAs applied, ((name, AUTOMATIC1111's short hash), ...): its "Lora hashes" field
    loras: tuple[tuple[str, str], ...] = ()
    # (low, high) sigmas: the unconditional pass ran only for steps whose sigma lies in them
    guidance_interval: tuple[float, float] | None = None
    vae: str | None = None  # AUTOMATIC1111's "VAE" field: the decoder, when not the model's own
    cache_interval: int = 1  # feature caching: the full UNet ran every this many steps (1: every step)

    def a1111(self) -> str:
        fields = [("Steps", self.steps), ("Sampler", self.sampler)]
        if self.schedule_type:
            fields.append(("Schedule type", self.schedule_type))
        fields += [("CFG scale", _num(self.cfg_scale))]
        if self.guidance_interval:
            fields.append(("Guidance interval", "-".join(_num(v) for v in self.guidance_interval)))
        if self.cache_interval > 1:  # the name the sd-webui-deepcache extension's settings use
            fields.append(("DeepCache interval", self.cache_interval))
        fields += [("Seed", self.seed), ("Size", f"{self.width}x{self.height}"), ("Model", self.model)]
        if self.vae:
            fields.append(("VAE", self.vae))
        if self.denoising_strength is not None:
            fields.append(("Denoising strength", _num(self.denoising_strength)))
        if self.loras:  # A1111 drops its separators from the names
            fields.append(("Lora hashes", ", ".join(f"{name.translate(_SEPARATORS)}: {h}" for name, h in self.loras)))
        fields.append(("Version", "edgediff"))
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(f"{k}: {_field(v)}" for k, v in fields))
        return "\n".join(lines)


_SEPARATORS = str.maketrans("", "", ":,")


def _num(x: float) -> str:
    return f"{x:g}"


def _field(value) -> str:
    # A1111 quotes a value that holds its separators.
    text = str(value)
    return f'"{text}"' if any(c in text for c in ',:\n"') else text


def save_png(image: Image.Image, path: str | Path, parameters: str | None = None) -> Path:
    """Write a PNG to a temporary name beside `path`, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    sweep_partials(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=partial_prefix(path.name), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private (0600); a PNG is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def contact_sheet(images: list[Image.Image], captions: list[str], columns: int = 3, tile: int = 256) -> Image.Image:
    """A grid of the images, each enlarged to `tile` pixels (nearest neighbour: the pixels stay honest)
    with its caption underneath."""
    from PIL import ImageDraw

    rows = (len(images) + columns - 1) // columns
    caption_height = 34
    sheet = Image.new("RGB", (columns * tile, rows * (tile + caption_height)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (image, caption) in enumerate(zip(images, captions)):
        x, y = (k % columns) * tile, (k // columns) * (tile + caption_height)
        sheet.paste(image.resize((tile, tile), Image.Resampling.NEAREST), (x, y))
        words, lines = caption.split(), [""]
        for word in words:  # wrap to the tile's width, at most two lines
            trial = f"{lines[-1]} {word}".strip()
            if draw.textlength(trial) <= tile - 8 or not lines[-1]:
                lines[-1] = trial
            elif len(lines) < 2:
                lines.append(word)
            else:
                lines[-1] += "..."
                break
        for i, line in enumerate(lines):
            draw.text((x + 4, y + tile + 3 + 14 * i), line, fill=(0, 0, 0))
    return sheet
