"""Probes of the demo models: what the variation signal sees, and which adaptive criterion makes busy
images keep more tokens.

    python -m v2drop_eval.demo probe [--benchmark vqa|scenes] [--family llava] [--layer 2] [--items 150]
    python -m v2drop_eval.demo probe --ranks [--benchmark scenes] [--family qwen2_vl] [--layer 2]

``--ranks``: for each test item, one forward pass; the vision tokens are ranked by V2Drop's variation
entering ``LAYER`` (the change layer ``LAYER - 1`` made to them; rank 0 changed most and is kept first)
and the ranks of four kinds of token are averaged, as a percentile of the row's vision tokens (0 = top,
100 = bottom): ``answer`` (the tokens the answer is read from), ``object`` (every object's tokens),
``sign`` and ``background``. ``answer_kept``: the share of answer tokens a 12.5% / 25% keep at
``LAYER`` would keep. A model whose object tokens sit at the bottom hands V2Drop the wrong tokens: the
first demo's Qwen2-VL model (trained with its image features pulled towards word embeddings) did.

Default (the adaptive criteria): for each test item it runs the model once through the engine with
adaptive stages ``LAYER:tT:0:1`` for several thresholds T (the shipped criterion: keep the vision
tokens whose variation is >= T x the row's mean text-token variation) and reads the kept count from
``handle.last_stats``. For comparison it computes, from the same variations, the count of the other
obvious rule, "the smallest set of vision tokens holding X% of the vision variation mass". Prints
the mean kept count per object count for each rule, and the Pearson correlation of kept count with
object count: positive means busy images keep more.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from v2drop_eval.demo import model_path
from v2drop_eval.methods.api import attach
from v2drop_eval.methods.v2drop import variation

__all__ = ["probe", "variation_ranks", "BENCHMARKS"]

BENCHMARKS = ("vqa", "scenes")
KEEP_SHARES = (0.125, 0.25)


def _load(family: str, path: str | None = None) -> tuple[Any, Any]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration

    cls = LlavaForConditionalGeneration if family == "llava" else Qwen2VLForConditionalGeneration
    return cls.from_pretrained(path, dtype=torch.float32).eval(), AutoProcessor.from_pretrained(path)


class _Bench:
    """One benchmark's test items, prompts and per-token roles, behind one interface."""

    def __init__(self, benchmark: str, family: str, items: int):
        if benchmark not in BENCHMARKS:
            raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {benchmark!r}")
        self.benchmark, self.family = benchmark, family
        if benchmark == "vqa":
            from v2drop_eval.demo.data import GRID, TEST_SEED, make_split

            self.items = make_split("test", items, seed=TEST_SEED)
            self.cells = torch.arange(GRID * GRID)
        else:
            from v2drop_eval.demo.scenes import TEST_SEED, make_split
            from v2drop_eval.demo.train_scenes import token_cells

            self.items = make_split("test", items, seed=TEST_SEED)
            self.cells = token_cells(family)

    def default_model(self) -> str:
        return str(model_path(self.family, self.benchmark))

    def messages(self, item: Any) -> list[dict]:
        if self.benchmark == "vqa":
            from v2drop_eval.demo.train import chat_messages

            return chat_messages(item, answer=False)
        from v2drop_eval.demo.train_scenes import chat_messages

        return chat_messages(item.question)

    def n_objects(self, item: Any) -> int:
        return len(item.objects)

    def kind(self, item: Any) -> str:
        return item.qtype if self.benchmark == "vqa" else item.subtask

    def roles(self, item: Any) -> dict[str, torch.Tensor]:
        """[T] bool masks over the vision tokens: answer, object, sign, background."""
        objects = {o.row * 8 + o.col for o in item.objects}
        if self.benchmark == "vqa":
            answer, sign = {item.target} - {-1}, set()
        else:
            answer = set(item.primary) | set(item.secondary)
            sign = set(item.sign.cells) if item.sign else set()

        def mask(cells: set[int]) -> torch.Tensor:
            return torch.isin(self.cells, torch.tensor(sorted(cells), dtype=torch.long))

        out = {"answer": mask(answer), "object": mask(objects), "sign": mask(sign)}
        out["background"] = ~(out["object"] | out["sign"])
        return out

    def inputs(self, processor: Any, item: Any) -> dict:
        text = processor.apply_chat_template(self.messages(item), tokenize=False, add_generation_prompt=True)
        return processor(text=[text], images=[item.image], return_tensors="pt")


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
def variation_ranks(family: str = "qwen2_vl", benchmark: str = "scenes", layer: int = 2, items: int = 100,
                    path: str | None = None) -> dict[str, Any]:
    """Where each kind of vision token ranks by V2Drop's variation entering ``layer`` (see the module doc)."""
    bench = _Bench(benchmark, family, items)
    model, processor = _load(family, path or bench.default_model())
    image_id = model.config.image_token_id
    ranks: dict[str, list[float]] = {k: [] for k in ("answer", "object", "sign", "background")}
    kept: dict[float, list[float]] = {s: [] for s in KEEP_SHARES}
    for it in bench.items:
        inputs = bench.inputs(processor, it)
        hs = model(**inputs, output_hidden_states=True).hidden_states
        v = variation(hs[layer], hs[layer - 1])[0][inputs["input_ids"][0] == image_id]
        n = len(v)
        rank = torch.empty(n)
        rank[v.argsort(descending=True)] = torch.arange(n, dtype=torch.float)
        pct = 100.0 * rank / (n - 1)
        for role, m in bench.roles(it).items():
            if m.any():
                ranks[role].append(float(pct[m].mean()))
        answer = bench.roles(it)["answer"]
        if answer.any():
            for share in KEEP_SHARES:
                kept[share].append(float((rank[answer] < max(1, int(n * share))).float().mean()))
    return {
        "family": family, "benchmark": benchmark, "layer": layer, "items": len(bench.items),
        "mean_rank_percentile": {k: round(sum(v) / len(v), 1) for k, v in ranks.items() if v},
        "answer_kept": {f"{int(s * 1000) / 10:g}%": round(sum(v) / len(v), 3) for s, v in kept.items() if v},
    }


@torch.no_grad()
def probe(family: str = "llava", layer: int = 2, items: int = 150, thresholds: Sequence[float] = (0.5, 1, 1.5, 2, 3),
          shares: Sequence[float] = (0.5, 0.8), path: str | None = None, benchmark: str = "vqa") -> dict[str, Any]:
    """The adaptive criteria against the object count (see the module doc)."""
    bench = _Bench(benchmark, family, items)
    model, processor = _load(family, path or bench.default_model())
    image_id = model.config.image_token_id
    kept: dict[str, list[float]] = {f"text-mean t{t:g}": [] for t in thresholds}
    kept.update({f"mass {int(s * 100)}%": [] for s in shares})
    objects, kinds = [], []
    inputs = {}
    for it in bench.items:
        inputs = bench.inputs(processor, it)
        objects.append(bench.n_objects(it))
        kinds.append(bench.kind(it))
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
    by_kind = {rule: _mean_by(ks, kinds) for rule, ks in kept.items()}
    within = {}
    for rule, ks in kept.items():
        per_kind = [_corr([float(o) for o, t in zip(objects, kinds, strict=True) if t == q],
                          [float(k) for k, t in zip(ks, kinds, strict=True) if t == q]) for q in sorted(set(kinds))]
        within[rule] = round(sum(per_kind) / len(per_kind), 3)
    return {"family": family, "benchmark": benchmark, "layer": layer, "items": items,
            "vision_tokens": int((inputs["input_ids"] == image_id).sum()),
            "mean_kept_by_objects": table, "corr_with_objects": corr,
            "mean_kept_by_question_type": by_kind, "corr_with_objects_within_question_type": within,
            "mean_kept": {rule: round(sum(ks) / len(ks), 2) for rule, ks in kept.items()}}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m v2drop_eval.demo probe", description=__doc__.split("\n")[0])
    p.add_argument("--benchmark", choices=BENCHMARKS, default="vqa")
    p.add_argument("--family", choices=("llava", "qwen2_vl"), default="llava")
    p.add_argument("--model", default=None, help="model folder (default: the shipped demo model of the benchmark)")
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--items", type=int, default=150)
    p.add_argument("--ranks", action="store_true", help="rank token kinds by variation instead (see above)")
    p.add_argument("--thresholds", default="0.5,1,1.5,2,3", help="comma list of T for LAYER:tT:0:1")
    args = p.parse_args(argv)
    if args.ranks:
        out = variation_ranks(args.family, args.benchmark, args.layer, args.items, path=args.model)
    else:
        out = probe(args.family, args.layer, args.items, tuple(float(t) for t in args.thresholds.split(",")),
                    path=args.model, benchmark=args.benchmark)
    print(json.dumps(out, indent=1))
    return 0
