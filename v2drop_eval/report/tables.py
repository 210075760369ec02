"""Tables for the paper from a sweep directory: accuracy (paper layout) and efficiency.

Accuracy: a row per model x method x budget/schedule (x metric, seed), a column per benchmark with
the task's headline metric in % (MME: perception + cognition, out of 2800), and "Average": the mean
over benchmarks of the score relative to the same model's ``none`` run, in %.
Efficiency: per-item means from the plugin's side-car (timings of a batch are shared by its items).
Each table is written as Markdown, CSV and LaTeX (booktabs) by :mod:`v2drop_eval.report.render`;
:func:`v2drop_eval.report.build.write_tables` writes them all, with the plots of :mod:`v2drop_eval.report.plots`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from v2drop_eval.methods import BASELINE, DEFAULT_METHOD, REGISTRY
from v2drop_eval.report import stats
from v2drop_eval.report.results import PointResult, adaptive_points, complexity

__all__ = [
    "HEADLINE",
    "TASK_LABELS",
    "accuracy_table",
    "complexity_table",
    "efficiency_table",
    "headline_score",
    "comparison_table",
    "row_key",
    "sort_rows",
    "item_scores",
    "FRACTION_METRICS",
    "KEY_COLS",
    "CI_LO",
    "CI_HI",
    "METHOD_LABELS",
    "EFFICIENCY_COLUMNS",
    "COMPARISON_COLUMNS",
    "ENCODER_SETTING",
    "ENCODER_ONLY_LABEL",
]

# task -> headline metric (the key before ",<filter>" in lmms-eval's results). MME is special-cased.
HEADLINE: dict[str, str] = {
    "gqa": "exact_match",
    "scienceqa_img": "exact_match",
    "scienceqa": "exact_match",
    "textvqa_val": "exact_match",
    "pope": "pope_f1_score",
    "mmbench_en_dev": "gpt_eval_score",
    "mmbench_en_dev_static": "gpt_eval_score",
    "ai2d": "exact_match",
    "mmstar": "average",
    "v2drop_demo_vqa": "accuracy",
    "v2drop_demo_scenes": "accuracy",
}
MME_PARTS = ("mme_perception_score", "mme_cognition_score")
# Metrics lmms-eval reports as a fraction in [0, 1]; shown x100. Others (MME, gpt_eval_score) as is.
FRACTION_METRICS = {"exact_match", "pope_accuracy", "pope_f1_score", "pope_precision", "pope_recall",
                    "average", "acc", "accuracy", "anls", "relaxed_overall"}
TASK_LABELS = {"gqa": "GQA", "scienceqa_img": "SQA-IMG", "scienceqa": "SQA", "textvqa_val": "TextVQA",
               "pope": "POPE", "mme": "MME", "mmbench_en_dev": "MMB", "mmbench_en_dev_static": "MMB",
               "ai2d": "AI2D", "mmstar": "MMStar", "v2drop_demo_vqa": "DemoVQA",
               "v2drop_demo_scenes": "DemoScenes"}
# From the method registry: the baseline first, then the methods in registry order.
METHOD_LABELS = {name: m.label for name, m in REGISTRY.items()}
METHOD_ORDER = {name: i for i, name in enumerate(REGISTRY)}
KEY_COLS = ["model", "method", "setting", "metric", "seed", "options"]
# A row of the baseline behind stages inside the vision encoder: its setting starts with ENCODER_SETTING.
ENCODER_SETTING = "encoder "
ENCODER_ONLY_LABEL = f"{REGISTRY[DEFAULT_METHOD].label} (encoder only)"
# Companion columns of a benchmark's score: its 95% interval from the per-item log (CSV keeps them as
# columns; Markdown and LaTeX show "score [low, high]" in one cell).
CI_LO, CI_HI = " 95% low", " 95% high"


def _metric_value(task_metrics: Mapping[str, Any], name: str) -> float | None:
    for key, value in task_metrics.items():
        if key.split(",")[0] == name and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def headline_score(task: str, task_metrics: Mapping[str, Any],
                   headline: Mapping[str, str] | None = None) -> tuple[float | None, str]:
    """``(score, metric name)`` for one task; MME is perception + cognition. ``None`` if absent."""
    parts = [_metric_value(task_metrics, p) for p in MME_PARTS]
    if all(p is not None for p in parts):
        return float(sum(parts)), "+".join(MME_PARTS)  # type: ignore[arg-type]
    name = (headline or {}).get(task) or HEADLINE.get(task)
    if name is None:  # fallback: the first numeric, non-stderr metric
        for key, value in task_metrics.items():
            base = key.split(",")[0]
            if "stderr" not in base and isinstance(value, (int, float)) and not isinstance(value, bool):
                name = base
                break
    if name is None:
        return None, ""
    value = _metric_value(task_metrics, name)
    if value is None:
        return None, name
    return (value * 100.0 if name in FRACTION_METRICS else value), name


def _setting(meta: Mapping[str, Any]) -> str:
    """``128``, ``3:0.5/17:0.3/22:0`` or ``full``; with V2Drop stages inside the vision encoder, followed by
    `` + encoder 12:0.5/18:0.5`` (``encoder 12:0.5/18:0.5`` alone for method none)."""
    if meta.get("budget") is not None:
        out = str(meta["budget"])
    elif meta.get("schedule"):
        out = str(meta["schedule"])
    else:
        out = "full"
    if meta.get("encoder_schedule"):
        encoder = f"{ENCODER_SETTING}{meta['encoder_schedule']}"
        return encoder if out == "full" else f"{out} + {encoder}"
    return out


def row_key(p: PointResult) -> dict[str, Any]:
    m = p.meta
    return {"model": m.get("model_name") or p.point_id.split("__")[0], "method": m["method"],
            "setting": _setting(m), "metric": m.get("metric") or "", "seed": "" if m.get("seed") is None else m["seed"],
            "options": variant_text(m), "point": p.point_id}


def variant_text(meta: dict[str, Any]) -> str:
    """The tables' Options cell: the method's named options and a ``positions=`` rule given to it."""
    given = f"positions={meta['positions']}" if meta.get("positions") else ""
    return "+".join(t for t in (meta.get("options") or "", given) if t)


def sort_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with the key columns in paper order: per model, the unpruned row, then per budget (largest
    first) each method."""
    def budget_rank(s: str) -> tuple[int, float, str]:
        if s == "full":
            return (0, 0.0, "")
        if s.lstrip("-").isdigit():
            return (1, -float(s), "")
        return (2, 0.0, s)
    order = df.apply(lambda r: (r["model"], budget_rank(str(r["setting"])), METHOD_ORDER.get(r["method"], 9),
                                str(r["metric"]), str(r["seed"]), str(r["options"])), axis=1)
    return df.iloc[sorted(range(len(df)), key=lambda i: order.iloc[i])].reset_index(drop=True)


def accuracy_table(points: Sequence[PointResult], headline: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per point; columns: key columns, one per benchmark (label), ``Average`` (% of none)."""
    rows, tasks = [], []
    for p in points:
        row = row_key(p)
        for task, metrics in p.results.items():
            score, name = headline_score(task, metrics, headline)
            if score is None:
                continue
            if task not in tasks:
                tasks.append(task)
            row[task] = score
            scores = item_scores(p, task, name, score)
            if scores is not None:
                _, row[task + CI_LO], row[task + CI_HI] = stats.mean_interval(scores.to_numpy())
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=[*KEY_COLS, "Average"])
    df = pd.DataFrame(rows)
    tasks = [t for t in _task_order(tasks) if t in df.columns]
    base = _baselines(df)
    averages = []
    for _, r in df.iterrows():
        rel = []
        if r["model"] in base.index:
            for t in tasks:
                ref = base.loc[r["model"], t] if t in base.columns else math.nan
                if not pd.isna(r.get(t)) and not pd.isna(ref) and ref:
                    rel.append(100.0 * r[t] / ref)
        averages.append(sum(rel) / len(rel) if rel else math.nan)
    df["Average"] = averages
    ci = [c for t in tasks for c in (t + CI_LO, t + CI_HI) if c in df.columns]
    df = sort_rows(df[["point", *KEY_COLS, *tasks, "Average", *ci]])
    labels = {t: TASK_LABELS.get(t, t) for t in tasks}
    return df.rename(columns={**labels, **{t + sfx: labels[t] + sfx for t in tasks for sfx in (CI_LO, CI_HI)}})


def _baselines(df: pd.DataFrame) -> pd.DataFrame:
    """Each model's unpruned row (the baseline method, setting full; any baseline row if it has no such one)."""
    none = df[df["method"] == BASELINE]
    none = pd.concat([none[none["setting"] == "full"], none[none["setting"] != "full"]])
    return none.drop_duplicates("model").set_index("model")


def item_scores(p: PointResult, task: str, metric: str, score: float) -> pd.Series | None:
    """Per-item values of ``metric`` (on the table's scale) from lmms-eval's sample log, by ``doc_id``;
    None without a log, or when the metric is not a mean of per-item numbers (MME, POPE F1): then the
    items' mean would not be the score in the table."""
    frame = p.items.get(task)
    if frame is None or metric not in frame.columns:
        return None
    values = pd.to_numeric(frame[metric], errors="coerce").dropna()
    if values.empty or len(values) != frame[metric].notna().sum():
        return None
    values = values * (100.0 if metric in FRACTION_METRICS else 1.0)
    if not math.isclose(float(values.mean()), score, rel_tol=1e-6, abs_tol=1e-6):
        return None
    return values


def comparison_table(points: Sequence[PointResult], headline: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Paired comparisons of the pruned methods at the same model and setting, per benchmark, on the
    items both answered: the difference in points with its 95% paired bootstrap interval, the exact
    McNemar p-value for 0/1 scores, and a verdict ("tie" when the interval spans 0)."""
    by_setting: dict[tuple[str, str], list[PointResult]] = {}
    for p in points:
        k = row_key(p)
        if k["method"] != BASELINE:
            by_setting.setdefault((k["model"], k["setting"]), []).append(p)
    rows = []
    for (model, setting), group in by_setting.items():
        group = sorted(group, key=lambda p: (METHOD_ORDER.get(p.meta["method"], 9), p.point_id))
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                for task in a.results:
                    if task not in b.results:
                        continue
                    sa, name = headline_score(task, a.results[task], headline)
                    sb, _ = headline_score(task, b.results[task], headline)
                    xa = item_scores(a, task, name, sa) if sa is not None else None
                    xb = item_scores(b, task, name, sb) if sb is not None else None
                    if xa is None or xb is None:
                        continue
                    common = xa.index.intersection(xb.index)
                    if common.empty:
                        continue
                    diff, lo, hi = stats.paired_difference(xa[common].to_numpy(), xb[common].to_numpy())
                    scale = 100.0 if name in FRACTION_METRICS else 1.0
                    p_value = stats.mcnemar_p(xa[common].to_numpy() / scale, xb[common].to_numpy() / scale)
                    la, lb = _label(a), _label(b)
                    verdict = "tie" if lo <= 0 <= hi else (f"{la} better" if diff > 0 else f"{lb} better")
                    rows.append({"model": model, "setting": setting, "task": TASK_LABELS.get(task, task),
                                 "a": la, "b": lb, "items": len(common), "score_a": float(xa[common].mean()),
                                 "score_b": float(xb[common].mean()), "diff": diff, "diff" + CI_LO: lo, "diff" + CI_HI: hi,
                                 "p": math.nan if p_value is None else p_value, "verdict": verdict})
    return pd.DataFrame(rows)


def _label(p: PointResult) -> str:
    """A method's name in a comparison: its label, with its metric or seed where it has one."""
    k = row_key(p)
    extra = [e for e in (k["metric"], f"seed {k['seed']}" if k["seed"] != "" else "", k["options"]) if e]
    return METHOD_LABELS.get(k["method"], k["method"]) + (f" ({', '.join(extra)})" if extra else "")


def _task_order(tasks: list[str]) -> list[str]:
    known = list(TASK_LABELS)
    return sorted(tasks, key=lambda t: (known.index(t) if t in known else len(known), tasks.index(t)))


def _num(df: pd.DataFrame, col: str) -> pd.Series:
    if col not in df.columns:
        return pd.Series([math.nan] * len(df), index=df.index, dtype=float)
    return pd.to_numeric(df[col], errors="coerce")


def _efficiency_row(p: PointResult) -> dict[str, Any]:
    s = p.samples
    row: dict[str, Any] = {"items": len(s)}
    if s.empty:
        tp = p.throughput
        row.update({"items": math.nan, "prefill_ms": math.nan, "decode_ms_per_token": math.nan,
                    "total_ms": _first(tp, "avg_total_ms", "avg_e2e_latency", "avg_latency") })
        return row
    bs = _num(s, "batch_size").fillna(1).clip(lower=1)
    # A line carries its batch's time: divide by the batch size to share it among the batch's items.
    prefill, decode, total = (_num(s, c) / bs for c in ("prefill_ms", "decode_ms", "total_ms"))
    tokens = _num(s, "generated_tokens")
    n = len(s)
    row["prefill_ms"] = prefill.sum() / n if prefill.notna().any() else math.nan
    row["decode_ms_per_token"] = decode.sum() / tokens.sum() if tokens.sum() > 0 else math.nan
    row["total_ms"] = total.sum() / n if total.notna().any() else math.nan
    row["throughput_items_s"] = 1000.0 * n / total.sum() if total.sum() > 0 else math.nan
    avg_tokens = _num(s, "avg_vision_tokens")
    row["vision_tokens_avg"] = avg_tokens.mean()
    # Adaptive schedules (and images of different sizes) give each item its own count: show the spread.
    row["vision_tokens_min"] = avg_tokens.min()
    row["vision_tokens_max"] = avg_tokens.max()
    row["vision_tokens_input"] = _num(s, "vision_tokens").mean()
    row["prefill_tflops"] = _num(s, "prefill_flops").mean() / 1e12
    row["vision_tflops"] = _num(s, "vision_flops").mean() / 1e12
    row["vision_ms"] = (_num(s, "vision_ms") / bs).sum() / n if "vision_ms" in s.columns else math.nan
    row["paper_tmacs"] = _num(s, "paper_macs").mean() / 1e12
    row["kv_cache_mb"] = _num(s, "kv_cache_bytes").mean() / 2**20
    row["peak_memory_mb"] = _num(s, "peak_memory_bytes").max() / 2**20
    device = s["device"].dropna().astype(str).unique() if "device" in s.columns else []
    row["device"] = ", ".join(device)
    return row


def _first(d: Mapping[str, Any], *keys: str) -> float:
    for k in keys:
        if isinstance(d.get(k), (int, float)):
            return float(d[k])
    return math.nan


COMPARISON_COLUMNS = {"task": "Benchmark", "a": "Method A", "b": "Method B", "score_a": "A", "score_b": "B",
                      "diff": "A - B [95%]", "p": "McNemar p", "verdict": "Verdict"}
EFFICIENCY_COLUMNS = {
    "items": "Items",
    "prefill_ms": "Prefill (ms)",
    "decode_ms_per_token": "Decode (ms/token)",
    "total_ms": "Total (ms)",
    "speedup": "Speed-up",
    "throughput_items_s": "Throughput (items/s)",
    "vision_tokens_avg": "Vision tokens (layer avg)",
    "vision_tokens_min": "min",
    "vision_tokens_max": "max",
    "prefill_tflops": "Prefill TFLOPs",
    "flops_reduction": "FLOPs reduction (%)",
    "vision_tflops": "Vision TFLOPs",
    "vision_ms": "Vision encoder (ms)",
    "paper_tmacs": "Paper TFLOPs (vision MACs)",
    "kv_cache_mb": "KV cache (MB)",
    "peak_memory_mb": "Peak memory (MB)",
    "device": "Device",
}


def efficiency_table(points: Sequence[PointResult]) -> pd.DataFrame:
    """One row per point: per-item timings, speed-up and FLOPs reduction vs the model's ``none`` run."""
    rows = [{**row_key(p), **_efficiency_row(p)} for p in points]
    if not rows:
        return pd.DataFrame(columns=[*KEY_COLS, *EFFICIENCY_COLUMNS])
    df = pd.DataFrame(rows)
    for col in EFFICIENCY_COLUMNS:
        if col not in df.columns:
            df[col] = math.nan
    base = _baselines(df)
    ref_total = df["model"].map(base["total_ms"]) if len(base) else math.nan
    ref_flops = df["model"].map(base["prefill_tflops"]) if len(base) else math.nan
    df["speedup"] = ref_total / df["total_ms"]
    df["flops_reduction"] = 100.0 * (1.0 - df["prefill_tflops"] / ref_flops)
    df = sort_rows(df[["point", *KEY_COLS, *EFFICIENCY_COLUMNS]])
    return df


def complexity_table(points: Sequence[PointResult]) -> pd.DataFrame:
    """Adaptive points: layer-averaged kept vision tokens against image complexity.

    One row per point with an adaptive stage: the Pearson correlation of each item's kept tokens with
    its complexity (the task's object count where the documents have one, else the side-car's
    ``image_edge_density``; positive = busy images keep more) and the mean kept tokens per object count.
    """
    rows = []
    for p in adaptive_points(points):
        measured = complexity(p.samples)
        if measured is None:
            continue
        kind, x = measured
        y = pd.to_numeric(p.samples["avg_vision_tokens"], errors="coerce")
        key = {k: v for k, v in row_key(p).items() if k in ("point", "model", "method", "setting")}
        row = {**key, "complexity": kind, "corr": y.corr(x),
               "kept_mean": y.mean(), "kept_min": y.min(), "kept_max": y.max()}
        if kind == "objects":
            row.update({f"kept@{int(n)}": v for n, v in y.groupby(x).mean().items()})
        rows.append(row)
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    kept = sorted((c for c in df.columns if c.startswith("kept@")), key=lambda c: int(c[5:]))
    return df[["point", "model", "method", "setting", "complexity", "corr", "kept_mean", "kept_min", "kept_max", *kept]]
