"""The synthetic VQA benchmark of the embedded demo: small shapes on a plain background.

Every image is 224x224 and divided into an 8x8 grid of 28-pixel cells. A few objects (1 to 5 coloured
shapes) sit each inside one cell, so 59 or more of the 64 cells are plain background. 28 pixels is both
the LLaVA demo model's patch and the Qwen2-VL demo model's merged 2x2 block of 14-pixel patches, so
one object falls in exactly one vision token in both models (and 224 is a multiple of 28, so Qwen's
``smart_resize`` leaves it alone whatever min/max pixels a harness passes). Every question is about
one object, so its answer lives in one of the 64 vision tokens: drop that token and the model can only
guess. Question types, all with single-word answers:

- ``color``: "what color is the triangle?" (the shape occurs once) -> a colour;
- ``shape``: "what shape is the red object?" (the colour occurs once) -> a shape;
- ``exists``: "is there a blue circle?" -> yes / no, balanced; most "no" items are adversarial in the
  style of POPE (the colour or the shape is in the image, on another object).

Everything is a function of ``(seed, split, index)`` through numpy's ``default_rng``, so a split is
the same on every machine. The test split is also shipped as parquet (``tasks/``) for lmms-eval.
"""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "IMAGE_SIZE",
    "GRID",
    "CELL",
    "COLORS",
    "SHAPES",
    "QTYPES",
    "ANSWERS",
    "POST_PROMPT",
    "Item",
    "make_item",
    "make_split",
    "extra_questions",
    "iter_items",
    "prompt_text",
    "write_test_split",
    "TEST_SEED",
    "TEST_SIZE",
]

IMAGE_SIZE = 224
GRID = 8
CELL = IMAGE_SIZE // GRID  # 28 pixels: one vision token in both demo models
# Saturated, well separated colours; each image jitters them a little so the models learn hues, not
# exact RGB triples.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 205, 25),
    "purple": (140, 50, 185),
    "orange": (245, 135, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
QTYPES = ("color", "shape", "exists")
ANSWERS = (*COLORS, *SHAPES, "yes", "no")
POST_PROMPT = "\nAnswer the question using a single word."
# Split ids mixed into the seed so train, val and test never share an item.
_SPLITS = {"train": 0, "val": 1, "test": 2}
TEST_SEED = 0
TEST_SIZE = 300
MAX_OBJECTS = 5


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    row: int
    col: int


@dataclass
class Item:
    """One benchmark item. ``target`` is the grid cell (row * GRID + col) the answer lives in, or -1."""

    id: str
    image: Image.Image
    question: str
    answer: str
    qtype: str
    objects: list[Obj]
    target: int

    def record(self) -> dict:
        """A flat dict for parquet: PNG bytes for the image, objects as JSON."""
        buf = io.BytesIO()
        self.image.save(buf, format="PNG", optimize=True)
        return {
            "id": self.id,
            "image": {"bytes": buf.getvalue(), "path": f"{self.id}.png"},
            "question": self.question,
            "answer": self.answer,
            "qtype": self.qtype,
            "n_objects": len(self.objects),
            "target": self.target,
            "objects": json.dumps([asdict(o) for o in self.objects]),
        }


def prompt_text(question: str) -> str:
    """The user text for a question: the same string the lmms-eval task's ``doc_to_text`` builds."""
    return f"{question}{POST_PROMPT}"


def _draw(objects: list[Obj], rng: np.random.Generator) -> Image.Image:
    # A light, plain background of a random tint: no texture, so background tokens carry no signal.
    bg = tuple(int(v) for v in rng.integers(200, 246, size=3))
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
    draw = ImageDraw.Draw(img)
    for o in objects:
        size = int(rng.integers(16, 25))  # 16..24 px inside a 28 px cell
        x0 = o.col * CELL + int(rng.integers(1, CELL - size))
        y0 = o.row * CELL + int(rng.integers(1, CELL - size))
        x1, y1 = x0 + size - 1, y0 + size - 1
        rgb = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLORS[o.color])
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=rgb)
        elif o.shape == "square":
            draw.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), fill=rgb)
        elif o.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=rgb)
        else:  # cross
            t = max(4, size // 3)
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            draw.rectangle((cx - t // 2, y0, cx - t // 2 + t - 1, y1), fill=rgb)
            draw.rectangle((x0, cy - t // 2, x1, cy - t // 2 + t - 1), fill=rgb)
    return img


def _pick(rng: np.random.Generator, seq: tuple[str, ...] | list[str]) -> str:
    return seq[int(rng.integers(len(seq)))]


def make_item(seed: int, split: str, index: int, n_objects: int | None = None, qtype: str | None = None) -> Item:
    """Item ``index`` of ``split``; ``n_objects`` / ``qtype`` fix those choices (training curriculum)."""
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    n = int(n_objects) if n_objects is not None else int(rng.integers(1, MAX_OBJECTS + 1))
    if qtype is None:
        # Held-out splits cycle through the types so every slice of them is balanced.
        qtype = _pick(rng, QTYPES) if split == "train" else QTYPES[index % len(QTYPES)]
    colors, shapes = list(COLORS), list(SHAPES)
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    target_color, target_shape = _pick(rng, colors), _pick(rng, shapes)
    answer_yes = bool(rng.integers(2))
    if split != "train":
        answer_yes = (index // len(QTYPES)) % 2 == 0  # exactly balanced yes / no
    # Distractors: constrained so the question has exactly one right answer.
    objs = [(target_color, target_shape)]
    while len(objs) < n:
        c, s = _pick(rng, colors), _pick(rng, shapes)
        if (c, s) in objs:
            continue
        if qtype == "color" and s == target_shape:
            continue
        if qtype == "shape" and c == target_color:
            continue
        objs.append((c, s))
    objects = [Obj(c, s, int(cell) // GRID, int(cell) % GRID) for (c, s), cell in zip(objs, cells, strict=True)]
    target = int(cells[0])
    if qtype != "exists":
        answer_yes = True
    if qtype == "color":
        question, answer = f"what color is the {target_shape}?", target_color
    elif qtype == "shape":
        question, answer = f"what shape is the {target_color} object?", target_shape
    else:
        if answer_yes:
            qc, qs = target_color, target_shape
        else:
            # A "no": mostly adversarial (one attribute present, on another object), sometimes random.
            present = set(objs)
            while True:
                mode = rng.random()
                if mode < 0.4:
                    qc, qs = _pick(rng, [c for c, _ in objs]), _pick(rng, shapes)
                elif mode < 0.8:
                    qc, qs = _pick(rng, colors), _pick(rng, [s for _, s in objs])
                else:
                    qc, qs = _pick(rng, colors), _pick(rng, shapes)
                if (qc, qs) not in present:
                    break
            target = -1
        question, answer = f"is there a {qc} {qs}?", "yes" if answer_yes else "no"
    # Shuffle the object list so the target is not always first in the metadata.
    order = rng.permutation(n)
    objects = [objects[i] for i in order]
    return Item(
        id=f"{split}-{seed}-{index}",
        image=_draw(objects, rng),
        question=question,
        answer=answer,
        qtype=qtype,
        objects=objects,
        target=target,
    )


def extra_questions(item: Item, k: int, seed: int = 0) -> list[tuple[str, str]]:
    """``k`` more (question, answer) pairs about ``item``'s image, each with one right answer.

    Training puts several question turns on one image: the 64 image tokens dominate the cost of a
    sequence, so each extra turn is nearly free supervision.
    """
    rng = np.random.default_rng([seed, 7, zlib.crc32(item.id.encode())])
    pairs = {(o.color, o.shape) for o in item.objects}
    shape_count = {s: sum(o.shape == s for o in item.objects) for s in SHAPES}
    color_count = {c: sum(o.color == c for o in item.objects) for c in COLORS}
    out: list[tuple[str, str]] = []
    while len(out) < k:
        o = item.objects[int(rng.integers(len(item.objects)))]
        qtype = _pick(rng, QTYPES)
        if qtype == "color" and shape_count[o.shape] == 1:
            out.append((f"what color is the {o.shape}?", o.color))
        elif qtype == "shape" and color_count[o.color] == 1:
            out.append((f"what shape is the {o.color} object?", o.shape))
        elif qtype == "exists":
            if rng.random() < 0.5:
                out.append((f"is there a {o.color} {o.shape}?", "yes"))
            else:
                c = o.color if rng.random() < 0.5 else _pick(rng, list(COLORS))
                s = _pick(rng, SHAPES) if c == o.color else o.shape
                if (c, s) not in pairs:
                    out.append((f"is there a {c} {s}?", "no"))
    return out


def make_split(split: str, size: int, seed: int = TEST_SEED) -> list[Item]:
    """``size`` items of ``split``; for val/test the question types cycle so they are balanced."""
    return [make_item(seed, split, i) for i in range(size)]


def iter_items(seed: int, split: str = "train", start: int = 0, max_objects: int | None = None) -> Iterator[Item]:
    """An endless stream of items; ``max_objects`` caps the object count (a curriculum can raise it)."""
    index = start
    while True:
        n = None
        if max_objects is not None:
            n = 1 + int(np.random.default_rng([seed, 9, index]).integers(max_objects))
        yield make_item(seed, split, index, n_objects=n)
        index += 1


def write_test_split(path: str | Path, size: int = TEST_SIZE, seed: int = TEST_SEED) -> Path:
    """Write the test split as parquet with a ``datasets`` Image column (lmms-eval reads PIL images)."""
    import datasets

    rows = [it.record() for it in make_split("test", size, seed)]
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "qtype": datasets.Value("string"),
            "n_objects": datasets.Value("int32"),
            "target": datasets.Value("int32"),
            "objects": datasets.Value("string"),
        }
    )
    ds = datasets.Dataset.from_list(rows, features=features)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))
    return path
