"""lmms-eval hooks of the demo tasks ``v2drop_demo_vqa`` and ``v2drop_demo_scenes`` (loaded with
``--include_path`` on this folder).

Scoring: the first word of the answer, lower-cased and stripped of punctuation, must equal the target
(exact match). ``accuracy`` is over all items. ``v2drop_demo_vqa``: ``yes_no_accuracy`` over the yes/no
items (the MME / POPE style ``is there a ...?`` pairs) and ``open_accuracy`` over the colour / shape
questions. ``v2drop_demo_scenes``: ``<subtask>_accuracy`` over each sub-task's items.
"""

from __future__ import annotations

import re
from typing import Any

from v2drop_eval.demo.scenes import SUBTASKS

POST_PROMPT = "\nAnswer the question using a single word."


def doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    pre = kwargs.get("pre_prompt", "")
    post = kwargs.get("post_prompt", POST_PROMPT)
    return f"{pre}{doc['question']}{post}"


def normalize(text: str) -> str:
    """The first word of a prediction, lower case, without punctuation ('' if there is none)."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return words[0] if words else ""


def process_results(doc: dict, results: list) -> dict[str, Any]:
    pred = results[0]
    pred = getattr(pred, "text", pred)  # chat models may hand back a GenerationResult
    correct = float(normalize(str(pred)) == doc["answer"])
    yes_no = doc["qtype"] == "exists"
    # None marks "not in this subset"; the aggregations skip it, so --limit never divides by zero.
    return {
        "accuracy": correct,
        "yes_no_accuracy": correct if yes_no else None,
        "open_accuracy": None if yes_no else correct,
    }


def process_scenes(doc: dict, results: list) -> dict[str, Any]:
    pred = results[0]
    pred = getattr(pred, "text", pred)
    correct = float(normalize(str(pred)) == doc["answer"])
    out: dict[str, Any] = {"accuracy": correct}
    out.update({f"{s}_accuracy": correct if doc["subtask"] == s else None for s in SUBTASKS})
    return out


def aggregate_accuracy(values: list) -> float:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else float("nan")
