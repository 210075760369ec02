"""The scenes benchmark's canvas (``scenes.py``): the 448-pixel image, its 8x8 grid of cells, the objects and
signs that sit in them, and how they are drawn on a plain or textured background.

Every object sits centred in its own 56-pixel cell; a sign (a white card with a word on it) spans two
adjacent cells; a thin dark frame surrounds the image. Drawing takes its randomness (tint, pattern,
object sizes and jitter) from the caller's generator, so a scene is a function of the item's seed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["CANVAS", "LAYOUT", "CELL_PX", "FRAME_PX", "COLORS", "SHAPES", "PLURALS", "SIZES", "SIZE_PX", "Obj", "Sign",
           "draw_scene"]

CANVAS = 448
LAYOUT = 8  # cells per side
CELL_PX = CANVAS // LAYOUT  # 56
FRAME_PX = 4  # the dark frame: an absolute reference for position (Qwen2-VL's tower has no position embedding)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 205, 25),
    "purple": (135, 45, 180),
    "orange": (245, 135, 20),
    "pink": (245, 125, 200),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "cross": "crosses"}
SIZES = ("small", "large")
# Side of an object's bounding square in pixels of the 448 canvas (a cell is 56).
SIZE_PX = {"small": (22, 28), "large": (40, 48)}

@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    size: str
    row: int
    col: int

    @property
    def cell(self) -> int:
        return self.row * LAYOUT + self.col


@dataclass(frozen=True)
class Sign:
    """A white card with ``word`` on it, over cells ``(row, col)`` and ``(row, col + 1)``."""

    word: str
    row: int
    col: int

    @property
    def cells(self) -> tuple[int, int]:
        return (self.row * LAYOUT + self.col, self.row * LAYOUT + self.col + 1)


# -- drawing ----------------------------------------------------------------------------------------
_GRID = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32)  # y, x of every pixel


def _background(kind: str, rng: np.random.Generator) -> Image.Image:
    """A light tint, plain or with a low-contrast regular pattern (stripes, checks, dots), in a dark frame."""
    tint = rng.integers(195, 246, size=3)
    if kind == "plain":
        img = Image.new("RGB", (CANVAS, CANVAS), tuple(int(v) for v in tint))
    else:
        y, x = _GRID
        pattern = ("stripes", "checks", "dots")[int(rng.integers(3))]
        period = float(rng.integers(10, 23))
        if pattern == "stripes":
            angle = math.pi * int(rng.integers(4)) / 4
            mask = np.sin((2 * math.pi / period) * (x * math.cos(angle) + y * math.sin(angle))) > 0
        elif pattern == "checks":
            mask = ((x // period + y // period) % 2) > 0
        else:
            cx, cy = (x % period) - period / 2, (y % period) - period / 2
            mask = cx * cx + cy * cy < (period / 4) ** 2
        shade = rng.integers(25, 46) * (1 if rng.random() < 0.5 else -1)
        other = np.clip(tint + shade + rng.integers(-12, 13, size=3), 0, 255)
        colors = np.stack([tint, other]).astype(np.uint8)  # [2, 3]: a palette indexed by the mask
        img = Image.fromarray(colors[mask.astype(np.uint8)], "RGB")
    ImageDraw.Draw(img).rectangle((0, 0, CANVAS - 1, CANVAS - 1), outline=(60, 60, 60), width=FRAME_PX)
    return img


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def draw_scene(objects: list[Obj], sign: Sign | None, background: str, rng: np.random.Generator) -> Image.Image:
    """The scene's image: ``background``, then each object in its cell, then the sign."""
    img = _background(background, rng)
    draw = ImageDraw.Draw(img)
    for o in objects:
        lo, hi = SIZE_PX[o.size]
        side = int(rng.integers(lo, hi + 1))
        cx = o.col * CELL_PX + CELL_PX / 2 + int(rng.integers(-2, 3))
        cy = o.row * CELL_PX + CELL_PX / 2 + int(rng.integers(-2, 3))
        x0, y0, x1, y1 = cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2
        jitter = rng.integers(-15, 16, size=3)
        rgb = tuple(min(255, max(0, c + int(j))) for c, j in zip(COLORS[o.color], jitter, strict=True))
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=rgb)
        elif o.shape == "square":
            inset = side * 0.08
            draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=rgb)
        elif o.shape == "triangle":
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=rgb)
        elif o.shape == "diamond":
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=rgb)
        else:  # cross
            t = side / 3
            draw.rectangle((cx - t / 2, y0, cx + t / 2, y1), fill=rgb)
            draw.rectangle((x0, cy - t / 2, x1, cy + t / 2), fill=rgb)
    if sign is not None:
        x0, y0 = sign.col * CELL_PX + 4, sign.row * CELL_PX + 8
        x1, y1 = (sign.col + 2) * CELL_PX - 4, (sign.row + 1) * CELL_PX - 8
        paper = tuple(int(v) for v in rng.integers(240, 256, size=3))
        draw.rectangle((x0, y0, x1, y1), fill=paper, outline=(90, 90, 90), width=2)
        draw.text(((x0 + x1) / 2, (y0 + y1) / 2), sign.word, fill=(15, 15, 15), font=_font(34), anchor="mm")
    return img
