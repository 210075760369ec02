"""The demo's second synthetic benchmark, ``scenes``: five sub-tasks that mirror a real VLM suite, on
scenes that range from one object on a plain background to forty on a textured one.

Every image is 448x448, laid out as an 8x8 grid of 56-pixel cells inside a thin dark frame. Each
object sits centred in its own cell; a sign (a white card with a word on it) spans two adjacent cells.
The LLaVA-shaped demo model sees the image at 224 pixels with 28-pixel patches (one vision token per
cell, 64 tokens); the Qwen2-VL-shaped one at 448 pixels with 14-pixel patches merged 2x2 (four tokens
per cell, 256 tokens), so an object is one token for the first and four for the second. The canvas, its
objects and signs and their drawing are ``scene_canvas.py``'s; this module makes the items.

Sub-tasks (``SUBTASKS``) and their question types (``QTYPES``); every answer is one word:

- ``text`` (TextVQA-like): "what word is on the sign?" -> one of ``WORDS``, rendered in large glyphs;
- ``count``: "how many triangles are there?" -> 0 to ``MAX_COUNT``; the other objects are other shapes;
- ``relation`` (GQA-like): "is the red circle left or right of the blue square?" (or above / below)
  -> left / right / above / below; both named objects are unique in the scene and lie in different
  columns (rows);
- ``presence`` (POPE-like): "is there a green cross?" -> yes / no, balanced; most "no" questions are
  adversarial (the colour and the shape are both in the scene, on other objects);
- ``attribute``: "what color is the diamond?", "what shape is the pink object?", "what size is the red
  triangle?" -> a colour, shape or size of the one object that the question names.

Complexity (recorded per item): ``n_objects`` (1 to 40, log-uniform, so simple and busy scenes are both
common), ``background`` (``plain`` or ``textured``: stripes, checks or dots) and ``object_scale``
(``small``, ``large`` or ``mixed`` objects). Each item also records the cells its answer is read from
(``primary``; ``secondary`` is the relation's second object): the trainer's attention targets and the
probe's "answer tokens".

Everything is a function of ``(seed, split, index)`` through numpy's ``default_rng``, so a split is the
same on every machine; held-out splits cycle through the sub-tasks and balance their answers. The test
split ships as parquet for lmms-eval (``tasks/v2drop_demo_scenes*``).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from v2drop_eval.demo.scene_canvas import (
    CANVAS,
    CELL_PX,
    COLORS,
    LAYOUT,
    PLURALS,
    SHAPES,
    SIZES,
    Obj,
    Sign,
    draw_scene,
)

__all__ = ["CANVAS", "LAYOUT", "CELL_PX", "COLORS", "SHAPES", "PLURALS", "SIZES", "WORDS", "SUBTASKS", "QTYPES",
           "BACKGROUNDS", "SCALES", "MAX_OBJECTS", "MAX_COUNT", "ANSWERS", "QUESTION_WORDS", "POST_PROMPT", "TEST_SEED",
           "TEST_SIZE", "Obj", "Sign", "Item", "make_item", "make_split", "iter_items", "prompt_text",
           "write_test_split"]

# Short words in large glyphs on a sign: a small vocabulary a small model can learn to read.
WORDS = ("cat", "dog", "sun", "box", "cup", "hat", "key", "pen", "map", "bus")
SUBTASKS = ("text", "count", "relation", "presence", "attribute")
QTYPES: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "count": ("count",),
    "relation": ("left_right", "above_below"),
    "presence": ("presence",),
    "attribute": ("color", "shape", "size"),
}
BACKGROUNDS = ("plain", "textured")
SCALES = ("small", "large", "mixed")
MAX_OBJECTS = 40
MAX_COUNT = 5
NUMBERS = tuple(str(k) for k in range(MAX_COUNT + 1))
ANSWERS = (*WORDS, *NUMBERS, "left", "right", "above", "below", "yes", "no", *COLORS, *SHAPES, *SIZES)
QUESTION_WORDS = ("what word is on the sign how many are there the left or right of above below is a an color "
                  "shape object size " + " ".join(PLURALS.values()))
POST_PROMPT = "\nAnswer with one word."
SIGN_CHANCE = 0.25  # a sign also appears in this share of the other sub-tasks' scenes, as a distractor
ADVERSARIAL_NO = 0.8  # share of presence "no" questions whose colour and shape are both in the scene
_SPLITS = {"train": 0, "val": 1, "test": 2}
TEST_SEED = 0
TEST_SIZE = 500  # 100 per sub-task


@dataclass
class Item:
    """One benchmark item. ``primary`` / ``secondary``: the cells (row * 8 + col) its answer is read from.
    ``subtask``, ``qtype``, ``n_objects``, ``background``, ``object_scale``: what the item records about itself
    (parquet columns that the plugin copies into the side-car: ``v2drop_eval.plugin.sidecar.DOC_FIELDS``)."""

    id: str
    image: Image.Image
    question: str
    answer: str
    subtask: str
    qtype: str
    background: str
    object_scale: str
    objects: list[Obj]
    sign: Sign | None
    primary: tuple[int, ...]
    secondary: tuple[int, ...] = field(default_factory=tuple)

    @property
    def n_objects(self) -> int:
        return len(self.objects)

    def record(self) -> dict:
        """A flat dict for parquet: PNG bytes for the image, objects and sign as JSON."""
        buf = io.BytesIO()
        self.image.save(buf, format="PNG", optimize=True)
        return {
            "id": self.id,
            "image": {"bytes": buf.getvalue(), "path": f"{self.id}.png"},
            "question": self.question,
            "answer": self.answer,
            "subtask": self.subtask,
            "qtype": self.qtype,
            "n_objects": self.n_objects,
            "background": self.background,
            "object_scale": self.object_scale,
            "objects": json.dumps([asdict(o) for o in self.objects]),
            "sign": json.dumps(asdict(self.sign) if self.sign else None),
            "primary": json.dumps(list(self.primary)),
            "secondary": json.dumps(list(self.secondary)),
        }


def prompt_text(question: str) -> str:
    """The user text for a question: the same string the lmms-eval task's ``doc_to_text`` builds."""
    return f"{question}{POST_PROMPT}"


# -- scenes and questions ---------------------------------------------------------------------------
def _pick(rng: np.random.Generator, seq) -> str:
    seq = list(seq)
    return seq[int(rng.integers(len(seq)))]


def _object_count(rng: np.random.Generator, max_objects: int) -> int:
    """1..max_objects, log-uniform: as many scenes with 1-3 objects as with 4-12 or 13-40."""
    return min(max_objects, int(math.exp(rng.uniform(0.0, math.log(max_objects + 1)))))


def _size(rng: np.random.Generator, scale: str) -> str:
    return scale if scale in SIZES else _pick(rng, SIZES)


def _free_cells(rng: np.random.Generator, taken: set[int], n: int) -> list[int]:
    free = [c for c in range(LAYOUT * LAYOUT) if c not in taken]
    return [free[i] for i in rng.permutation(len(free))[:n]]


def _place_sign(rng: np.random.Generator, word: str) -> Sign:
    return Sign(word, int(rng.integers(LAYOUT)), int(rng.integers(LAYOUT - 1)))


def _fill(rng: np.random.Generator, cells: list[int], scale: str, allowed) -> list[Obj]:
    """Random objects in ``cells`` whose (colour, shape) ``allowed(color, shape)`` accepts."""
    out = []
    for cell in cells:
        while True:
            c, s = _pick(rng, COLORS), _pick(rng, SHAPES)
            if allowed(c, s):
                break
        out.append(Obj(c, s, _size(rng, scale), cell // LAYOUT, cell % LAYOUT))
    return out


def make_item(seed: int, split: str, index: int, subtask: str | None = None,
              max_objects: int = MAX_OBJECTS) -> Item:
    """Item ``index`` of ``split``; ``subtask`` fixes the sub-task and ``max_objects`` caps the object
    count (the trainer's curriculum). Held-out splits cycle through the sub-tasks and balance answers."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {tuple(_SPLITS)}, got {split!r}")
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in [1, {MAX_OBJECTS}], got {max_objects}")
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    held_out = split != "train"
    if subtask is None:
        subtask = SUBTASKS[index % len(SUBTASKS)] if held_out else _pick(rng, SUBTASKS)
    if subtask not in SUBTASKS:
        raise ValueError(f"subtask must be one of {SUBTASKS}, got {subtask!r}")
    # Held-out splits: a counter per sub-task drives the balanced choices (question type, answer).
    turn = index // len(SUBTASKS) if held_out else int(rng.integers(1 << 30))
    qtypes = QTYPES[subtask]
    qtype = qtypes[turn % len(qtypes)]
    background = _pick(rng, BACKGROUNDS)
    scale = "mixed" if qtype == "size" else _pick(rng, SCALES)
    n = _object_count(rng, max_objects)
    sign = None
    if subtask == "text" or rng.random() < SIGN_CHANCE:
        sign = _place_sign(rng, _pick(rng, WORDS))
    taken = set(sign.cells) if sign else set()
    secondary: tuple[int, ...] = ()

    if subtask == "text":
        cells = _free_cells(rng, taken, n)
        objects = _fill(rng, cells, scale, lambda c, s: True)
        question, answer, primary = "what word is on the sign?", sign.word, sign.cells
    elif subtask == "count":
        k = turn % (MAX_COUNT + 1) if held_out else int(rng.integers(MAX_COUNT + 1))
        k = min(k, max_objects)
        n = max(n, k)
        asked = _pick(rng, SHAPES)
        cells = _free_cells(rng, taken, n)
        objects = _fill(rng, cells[:k], scale, lambda c, s: s == asked)
        objects += _fill(rng, cells[k:], scale, lambda c, s: s != asked)
        question, answer = f"how many {PLURALS[asked]} are there?", str(k)
        primary = tuple(o.cell for o in objects if o.shape == asked)
    elif subtask == "relation":
        n = max(n, 2)
        horizontal = qtype == "left_right"
        first = (turn // len(qtypes)) % 2 == 0 if held_out else rng.random() < 0.5  # A left of (above) B
        a_combo = (_pick(rng, COLORS), _pick(rng, SHAPES))
        while (b_combo := (_pick(rng, COLORS), _pick(rng, SHAPES))) == a_combo:
            pass
        cells = _free_cells(rng, taken, LAYOUT * LAYOUT)
        axis = (lambda c: c % LAYOUT) if horizontal else (lambda c: c // LAYOUT)
        # A: the first free cell with room on the wanted side (so held-out answers stay balanced).
        for a_cell in cells:
            options = [c for c in cells if (axis(c) > axis(a_cell) if first else axis(c) < axis(a_cell))]
            if options:
                break
        b_cell = options[0]
        rest = [c for c in cells if c not in (a_cell, b_cell)][: n - 2]
        objects = [Obj(*a_combo, _size(rng, scale), a_cell // LAYOUT, a_cell % LAYOUT),
                   Obj(*b_combo, _size(rng, scale), b_cell // LAYOUT, b_cell % LAYOUT)]
        objects += _fill(rng, rest, scale, lambda c, s: (c, s) not in (a_combo, b_combo))
        words = ("left", "right") if horizontal else ("above", "below")
        link = " of" if horizontal else ""
        question = f"is the {' '.join(a_combo)} {words[0]} or {words[1]}{link} the {' '.join(b_combo)}?"
        answer = words[0] if first else words[1]
        primary, secondary = (a_cell,), (b_cell,)
    elif subtask == "presence":
        yes = turn % 2 == 0 if held_out else rng.random() < 0.5
        combo = (_pick(rng, COLORS), _pick(rng, SHAPES))
        cells = _free_cells(rng, taken, n)
        if yes:
            objects = [Obj(*combo, _size(rng, scale), cells[0] // LAYOUT, cells[0] % LAYOUT)]
            objects += _fill(rng, cells[1:], scale, lambda c, s: (c, s) != combo)
        else:
            objects = []
            if rng.random() < ADVERSARIAL_NO:
                # POPE's adversarial negatives: the colour and the shape are there, never together.
                lures = [(combo[0], s) for s in SHAPES if s != combo[1]], [(c, combo[1]) for c in COLORS if c != combo[0]]
                for lure, cell in zip(lures, cells[:2], strict=False):
                    c, s = lure[int(rng.integers(len(lure)))]
                    objects.append(Obj(c, s, _size(rng, scale), cell // LAYOUT, cell % LAYOUT))
            objects += _fill(rng, cells[len(objects):], scale, lambda c, s: (c, s) != combo)
        article = "an" if combo[0][0] in "aeiou" else "a"
        question, answer = f"is there {article} {combo[0]} {combo[1]}?", "yes" if yes else "no"
        primary = tuple(o.cell for o in objects if (o.color, o.shape) == combo)
    else:  # attribute
        cells = _free_cells(rng, taken, n)
        color, shape = _pick(rng, COLORS), _pick(rng, SHAPES)
        target = Obj(color, shape, _size(rng, scale), cells[0] // LAYOUT, cells[0] % LAYOUT)
        if qtype == "color":
            allowed, question, answer = (lambda c, s: s != shape), f"what color is the {shape}?", color
        elif qtype == "shape":
            allowed, question, answer = (lambda c, s: c != color), f"what shape is the {color} object?", shape
        else:
            allowed = lambda c, s: (c, s) != (color, shape)  # noqa: E731
            question, answer = f"what size is the {color} {shape}?", target.size
        objects = [target, *_fill(rng, cells[1:], scale, allowed)]
        primary = (target.cell,)
    order = rng.permutation(len(objects))  # the target is not always first in the metadata
    objects = [objects[i] for i in order]
    return Item(
        id=f"{split}-{seed}-{index}", image=draw_scene(objects, sign, background, rng), question=question,
        answer=answer, subtask=subtask, qtype=qtype, background=background, object_scale=scale,
        objects=objects, sign=sign, primary=tuple(primary), secondary=secondary,
    )


def make_split(split: str, size: int, seed: int = TEST_SEED, start: int = 0) -> list[Item]:
    """``size`` items of ``split`` from ``start``; held-out splits are balanced over sub-tasks and answers."""
    return [make_item(seed, split, i) for i in range(start, start + size)]


def iter_items(seed: int, split: str = "train", start: int = 0, max_objects: int = MAX_OBJECTS) -> Iterator[Item]:
    """An endless stream of items; ``max_objects`` caps the object count (a curriculum can raise it)."""
    index = start
    while True:
        yield make_item(seed, split, index, max_objects=max_objects)
        index += 1


def write_test_split(path: str | Path, size: int = TEST_SIZE, seed: int = TEST_SEED) -> Path:
    """Write the test split as parquet with a ``datasets`` Image column (lmms-eval reads PIL images)."""
    import datasets

    rows = [it.record() for it in make_split("test", size, seed)]
    text = datasets.Value("string")
    features = datasets.Features({
        "id": text, "image": datasets.Image(), "question": text, "answer": text, "subtask": text, "qtype": text,
        "n_objects": datasets.Value("int32"), "background": text, "object_scale": text, "objects": text,
        "sign": text, "primary": text, "secondary": text,
    })
    ds = datasets.Dataset.from_list(rows, features=features)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))
    return path
