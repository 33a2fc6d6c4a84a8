"""Small captioned scenes drawn by code, and a judge that checks a picture against its caption.

The built-in model (issue 3) is trained on these: one shape in a named colour, size and position on a
coloured background, captioned in plain words ("a small yellow square in the top left corner on a
green background"). Everything is deterministic from a seed; nothing is downloaded.

The judge reads a picture the way a person would check it against the caption, with pixel statistics
only: each pixel is given the nearest colour of the palette; the named background colour must hold the
border, the named shape colour must cover a shape-sized part of the picture, and that part's centre of
mass must lie in the named position. It is the oracle of the semantic tests: it sees a wrong VAE
scale, a scheduler off by a step or a broken guidance sign, which parity on random weights cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# Far apart in RGB so that the nearest-colour reading is unambiguous (least distance between two: ~120).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 50),
    "blue": (35, 70, 225),
    "yellow": (245, 225, 40),
    "orange": (250, 140, 20),
    "purple": (135, 40, 175),
    "pink": (250, 140, 200),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "cyan": (40, 215, 230),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
SIZES = {"small": 0.14, "": 0.21, "large": 0.30}  # half-width of the shape, as a fraction of the side
# Where a shape's centre may be, as fractions of the side: (x range, y range).
POSITIONS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "": ((0.4, 0.6), (0.4, 0.6)),  # unnamed: near the middle
    "in the center": ((0.42, 0.58), (0.42, 0.58)),
    "in the top left corner": ((0.25, 0.33), (0.25, 0.33)),
    "in the top right corner": ((0.67, 0.75), (0.25, 0.33)),
    "in the bottom left corner": ((0.25, 0.33), (0.67, 0.75)),
    "in the bottom right corner": ((0.67, 0.75), (0.67, 0.75)),
    "at the top": ((0.42, 0.58), (0.25, 0.33)),
    "at the bottom": ((0.42, 0.58), (0.67, 0.75)),
    "on the left": ((0.25, 0.33), (0.42, 0.58)),
    "on the right": ((0.67, 0.75), (0.42, 0.58)),
}
BORDER = 0.08  # the frame the judge reads the background from, as a fraction of the side


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str = ""  # "", "small" or "large"
    position: str = ""  # a key of POSITIONS
    name_background: bool = True  # whether the caption says the background colour
    centre: tuple[float, float] = field(default=(0.5, 0.5))  # where it is drawn, fractions of the side

    def caption(self) -> str:
        words = ["a"]
        if self.size:
            words.append(self.size)
        words += [self.colour, self.shape]
        if self.position:
            words.append(self.position)
        if self.name_background:
            words.append(f"on a {self.background} background")
        return " ".join(words)


def random_scene(rng: np.random.Generator) -> Scene:
    colour, background = rng.choice(list(COLOURS), size=2, replace=False)
    position = str(rng.choice(list(POSITIONS)))
    (x0, x1), (y0, y1) = POSITIONS[position]
    return Scene(
        shape=str(rng.choice(SHAPES)),
        colour=str(colour),
        background=str(background),
        size=str(rng.choice(list(SIZES))),
        position=position,
        name_background=bool(rng.random() < 0.8),
        centre=(float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))),
    )


def scenes(seed: int, count: int) -> list[Scene]:
    """`count` scenes, the same for the same seed on every machine (numpy's PCG64)."""
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(count)]


def render(scene: Scene, side: int = 64, supersample: int = 4) -> Image.Image:
    """The scene as an RGB image, drawn at `supersample` times the size and reduced (anti-aliased)."""
    big = side * supersample
    image = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    cx, cy = scene.centre[0] * big, scene.centre[1] * big
    r = SIZES[scene.size] * big
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        s = r * 0.9  # same area as the circle, roughly
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif scene.shape == "diamond":
        draw.polygon([(cx, cy - r * 1.15), (cx + r, cy), (cx, cy + r * 1.15), (cx - r, cy)], fill=fill)
    elif scene.shape == "star":
        angles = np.arange(10) * np.pi / 5 - np.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, r * 1.15, r * 0.5)
        draw.polygon([(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles)], fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return image.resize((side, side), Image.Resampling.BOX)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: tuple[str, ...]  # what failed, in words; empty when passed


def nearest_colours(image: Image.Image) -> np.ndarray:
    """(H, W) index into COLOURS of each pixel's nearest palette colour."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    palette = np.asarray(list(COLOURS.values()), dtype=np.float32)
    distance = ((pixels[:, :, None, :] - palette[None, None]) ** 2).sum(-1)
    return distance.argmin(-1)


def judge(image: Image.Image, scene: Scene) -> Verdict:
    """Does `image` show what `scene.caption()` says? Only what the caption names is checked."""
    names = list(COLOURS)
    labels = nearest_colours(image)
    side_y, side_x = labels.shape
    reasons = []

    b = max(1, round(BORDER * min(side_x, side_y)))
    frame = np.concatenate([labels[:b].ravel(), labels[-b:].ravel(), labels[:, :b].ravel(), labels[:, -b:].ravel()])
    if scene.name_background:
        share = float(np.mean(frame == names.index(scene.background)))
        if share < 0.5:
            common = names[np.bincount(frame, minlength=len(names)).argmax()]
            reasons.append(f"background: {scene.background} holds {share:.0%} of the border (mostly {common})")

    shape = labels == names.index(scene.colour)
    area = float(shape.mean())
    expected = (2 * SIZES[scene.size]) ** 2 * 0.6  # a shape covers about 60% of its bounding square
    if not expected * 0.3 <= area <= expected * 2.5:
        reasons.append(f"shape: {scene.colour} covers {area:.1%} of the picture, expected about {expected:.0%}")
    elif scene.position:
        ys, xs = np.nonzero(shape)
        cx, cy = (xs.mean() + 0.5) / side_x, (ys.mean() + 0.5) / side_y
        (x0, x1), (y0, y1) = POSITIONS[scene.position]
        slack = 0.12  # the model need not hit the training range exactly, only the named region
        if not (x0 - slack <= cx <= x1 + slack and y0 - slack <= cy <= y1 + slack):
            reasons.append(f"position: the {scene.colour} part is centred at ({cx:.2f}, {cy:.2f}), "
                           f"not {scene.position}")
    return Verdict(not reasons, tuple(reasons))
