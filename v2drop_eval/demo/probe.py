"""Which adaptive criterion makes busy images keep more tokens? Measured on the demo models.

    python -m v2drop_eval.demo probe [--family llava] [--layer 2] [--items 150]

For each test item (1-5 objects on a plain background) it runs the model once through the engine
with adaptive stages ``LAYER:tT:0:1`` for several thresholds T (the shipped criterion: keep the vision
tokens whose variation is >= T x the row's mean text-token variation) and reads the kept count from
``handle.last_stats``. For comparison it computes, from the same variations, the count of the other
obvious rule, "the smallest set of vision tokens holding X% of the vision variation mass". Prints
the mean kept count per object count for each rule, and the Pearson correlation of kept count with
object count: positive means busy images keep more.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from v2drop_eval.demo import model_path
from v2drop_eval.demo.data import TEST_SEED, make_split
from v2drop_eval.methods.api import attach
from v2drop_eval.methods.v2drop import variation

__all__ = ["probe"]


def _load(family: str, path: str | None = None) -> tuple[Any, Any]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration

    cls = LlavaForConditionalGeneration if family == "llava" else Qwen2VLForConditionalGeneration
    path = path or model_path(family)
    return cls.from_pretrained(path, dtype=torch.float32).eval(), AutoProcessor.from_pretrained(path)


def _mass_count(v: torch.Tensor, share: float) -> int:
    """Smallest number of tokens whose variations add up to ``share`` of the total."""
    s = v.sort(descending=True).values.cumsum(0)
    return int((s < share * s[-1]).sum()) + 1


def _corr(x: list[float], y: list[float]) -> float:
    t = torch.tensor([x, y], dtype=torch.float64)
    return float(torch.corrcoef(t)[0, 1]) if t[1].std() > 0 else float("nan")


def _mean_by(values: list[float], keys: list[Any]) -> dict[Any, float]:
    """Mean of ``values`` per distinct key, keys sorted."""
    return {g: round(sum(v for v, k in zip(values, keys, strict=True) if k == g) / keys.count(g), 1)
            for g in sorted(set(keys))}


@torch.no_grad()
def probe(family: str = "llava", layer: int = 2, items: int = 150, thresholds: tuple[float, ...] = (0.5, 1, 1.5, 2, 3),
          shares: tuple[float, ...] = (0.5, 0.8), path: str | None = None) -> dict[str, Any]:
    from v2drop_eval.demo.train import chat_messages

    model, processor = _load(family, path)
    image_id = model.config.image_token_id
    data = make_split("test", items, seed=TEST_SEED)
    kept: dict[str, list[float]] = {f"text-mean t{t:g}": [] for t in thresholds}
    kept.update({f"mass {int(s * 100)}%": [] for s in shares})
    objects, qtypes = [], []
    for it in data:
        text = processor.apply_chat_template(chat_messages(it, answer=False), tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=[it.image], return_tensors="pt")
        objects.append(len(it.objects))
        qtypes.append(it.qtype)
        for t in thresholds:
            with attach(model, f"{layer}:t{t:g}:0:1") as h:
                model(**inputs)
            kept[f"text-mean t{t:g}"].append(h.last_stats[0]["vision_per_layer"][layer])
        hs = model(**inputs, output_hidden_states=True).hidden_states
        v = variation(hs[layer], hs[layer - 1])[0][inputs["input_ids"][0] == image_id]
        for s in shares:
            kept[f"mass {int(s * 100)}%"].append(_mass_count(v, s))
    table = {rule: _mean_by(ks, objects) for rule, ks in kept.items()}
    corr = {rule: round(_corr([float(o) for o in objects], [float(k) for k in ks]), 3) for rule, ks in kept.items()}
    # The reference (the row's text tokens) changes with the question: the kept count by question type
    # shows how much of the spread is the question's rather than the image's.
    by_qtype = {rule: _mean_by(ks, qtypes) for rule, ks in kept.items()}
    within = {}
    for rule, ks in kept.items():
        per_type = [_corr([float(o) for o, t in zip(objects, qtypes, strict=True) if t == q],
                          [float(k) for k, t in zip(ks, qtypes, strict=True) if t == q]) for q in sorted(set(qtypes))]
        within[rule] = round(sum(per_type) / len(per_type), 3)
    return {"family": family, "layer": layer, "items": items, "vision_tokens": int((inputs["input_ids"] == image_id).sum()),
            "mean_kept_by_objects": table, "corr_with_objects": corr,
            "mean_kept_by_question_type": by_qtype, "corr_with_objects_within_question_type": within,
            "mean_kept": {rule: round(sum(ks) / len(ks), 2) for rule, ks in kept.items()}}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m v2drop_eval.demo probe", description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=("llava", "qwen2_vl"), default="llava")
    p.add_argument("--model", default=None, help="model folder (default: the shipped demo model of --family)")
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--items", type=int, default=150)
    p.add_argument("--thresholds", default="0.5,1,1.5,2,3", help="comma list of T for LAYER:tT:0:1")
    args = p.parse_args(argv)
    out = probe(args.family, args.layer, args.items, tuple(float(t) for t in args.thresholds.split(",")),
                path=args.model)
    print(json.dumps(out, indent=1))
    return 0
