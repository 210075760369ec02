"""Accuracy broken down by what the items are, and adaptive stages against static ones.

Each item's score comes from lmms-eval's per-item log (as in the accuracy table) and its description
from the side-car, where the task's documents carry one (:data:`v2drop_eval.plugin.sidecar.DOC_FIELDS`: the
demo benchmarks' ``subtask``, ``n_objects``, ``background``, ``object_scale``); both are keyed by ``doc_id``.

- :func:`breakdown_table`: per point and benchmark, the accuracy of each group of items (sub-task, or
  object-count bin / background / object scale) with its 95% bootstrap interval.
- :func:`adaptive_static_table`: each adaptive point (``layer:tT:MIN:MAX``, V2Drop's) against the
  static point of the same model and method (metric, options) whose mean kept tokens are closest: the
  paired difference on the same items with its interval and McNemar's p, and the correlation of the
  adaptive point's kept tokens with the object count (with its interval).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd

from v2drop_eval.methods import REGISTRY
from v2drop_eval.plugin.sidecar import DOC_FIELDS
from v2drop_eval.report import stats
from v2drop_eval.report.results import PointResult
from v2drop_eval.report.tables import (
    CI_HI,
    CI_LO,
    FRACTION_METRICS,
    KEY_COLS,
    TASK_LABELS,
    headline_score,
    item_scores,
    row_key,
    sort_rows,
)

__all__ = ["OBJECT_BINS", "BREAKDOWNS", "DIFF", "CORR", "object_bin", "item_frame", "breakdown_table",
           "adaptive_static_table", "focus_setting"]

# Object-count bins (inclusive); a count above the last bin gets "N+".
OBJECT_BINS = ((1, 3), (4, 9), (10, 19), (20, 40))
# Columns of the adaptive-vs-static table that carry an interval.
DIFF, CORR = "adaptive - static", "corr with objects"
# What an adaptive point and the static point it is compared with share.
_SAME = ("model", "method", "metric", "options")
# A breakdown's name -> the item columns it groups by, in column order.
BREAKDOWNS = {"subtask": ("subtask",), "complexity": ("objects", "background", "object_scale")}


def object_bin(n: float) -> str | None:
    """``4`` -> ``"4-9"``; None for a missing count."""
    if n is None or pd.isna(n):
        return None
    for lo, hi in OBJECT_BINS:
        if lo <= n <= hi:
            return f"{lo}-{hi}"
    return f"{OBJECT_BINS[-1][1] + 1}+" if n > OBJECT_BINS[-1][1] else f"<{OBJECT_BINS[0][0]}"


def _bin_order(label: str) -> float:
    digits = "".join(c if c.isdigit() else " " for c in label).split()
    return float(digits[0]) if digits else math.inf


def item_frame(p: PointResult, task: str, headline: Mapping[str, str] | None = None) -> pd.DataFrame | None:
    """Per ``doc_id``: ``score`` (the headline metric, on the table's scale), the side-car's item fields,
    ``objects`` (the object-count bin) and ``kept`` (layer-averaged vision tokens); None without per-item
    scores."""
    if task not in p.results:
        return None
    score, name = headline_score(task, p.results[task], headline)
    scores = item_scores(p, task, name, score) if score is not None else None
    if scores is None:
        return None
    frame = scores.rename("score").to_frame()
    frame["correct"] = scores / (100.0 if name in FRACTION_METRICS else 1.0)
    s = p.samples
    if not s.empty and "doc_id" in s.columns:
        mine = s[s["task"] == task] if "task" in s.columns else s
        mine = mine.drop_duplicates("doc_id", keep="last").set_index("doc_id")
        for col in (*DOC_FIELDS, "avg_vision_tokens"):
            if col in mine.columns:
                frame[col] = mine[col].reindex(frame.index)
    if "n_objects" in frame.columns:
        frame["n_objects"] = pd.to_numeric(frame["n_objects"], errors="coerce")
        frame["objects"] = frame["n_objects"].map(object_bin)
    if "avg_vision_tokens" in frame.columns:
        frame["kept"] = pd.to_numeric(frame.pop("avg_vision_tokens"), errors="coerce")
    return frame


def breakdown_table(points: Sequence[PointResult], by: str, headline: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per point and benchmark whose items carry the ``BREAKDOWNS[by]`` fields: the accuracy of each
    group (a column per group, groups of the first field first) with ``CI_LO`` / ``CI_HI`` companions;
    ``items``: how many items the point has. Empty when no item carries them."""
    fields = BREAKDOWNS[by]
    rows, groups = [], {f: [] for f in fields}
    for p in points:
        for task in p.results:
            frame = item_frame(p, task, headline)
            if frame is None or not any(f in frame.columns and frame[f].notna().any() for f in fields):
                continue
            row = {**row_key(p), "task": TASK_LABELS.get(task, task), "items": len(frame)}
            for f in fields:
                if f not in frame.columns:
                    continue
                for value, g in frame.groupby(f, sort=False):
                    label = str(value)
                    if label not in groups[f]:
                        groups[f].append(label)
                    row[label], row[label + CI_LO], row[label + CI_HI] = stats.mean_interval(g["score"].to_numpy())
            rows.append(row)
    if not rows:
        return pd.DataFrame()
    if "objects" in groups:
        groups["objects"].sort(key=_bin_order)
    cols = [g for f in fields for g in groups[f]]
    df = pd.DataFrame(rows)
    ci = [c for g in cols for c in (g + CI_LO, g + CI_HI)]
    df = sort_rows(df[["point", *KEY_COLS, "task", "items", *cols, *ci]])
    df.attrs["groups"] = groups  # field -> its group columns, in order (the plots' panels)
    return df


def _mean_kept(frame: pd.DataFrame) -> float:
    return float(frame["kept"].mean()) if "kept" in frame.columns else math.nan


def adaptive_static_table(points: Sequence[PointResult], headline: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Each adaptive point against the static point (same model, method, metric, options and benchmark)
    with the closest mean kept tokens: accuracies, ``DIFF`` (adaptive - static, points) with its paired
    interval, McNemar's p, and ``CORR``: Pearson's r of the adaptive point's kept tokens with the object
    count. Only methods that take adaptive stages (``Method.adaptive``) have such points."""
    frames: dict[str, dict[str, pd.DataFrame]] = {}
    for p in points:
        method = REGISTRY.get(str(p.meta.get("method")))
        if method is None or not method.adaptive:
            continue
        for task in p.results:
            frame = item_frame(p, task, headline)
            if frame is not None and "kept" in frame.columns and frame["kept"].notna().any():
                frames.setdefault(p.point_id, {})[task] = frame
    by_id = {p.point_id: p for p in points}
    rows = []
    for pid, tasks in frames.items():
        key = row_key(by_id[pid])
        if ":t" not in key["setting"]:
            continue
        for task, ada in tasks.items():
            statics = [(sid, st[task]) for sid, st in frames.items() if task in st
                       and ":t" not in row_key(by_id[sid])["setting"]
                       and {k: row_key(by_id[sid])[k] for k in _SAME} == {k: key[k] for k in _SAME}]
            if not statics:
                continue
            sid, sta = min(statics, key=lambda s: abs(_mean_kept(s[1]) - _mean_kept(ada)))
            common = ada.index.intersection(sta.index)
            a, b = ada.loc[common, "score"].to_numpy(), sta.loc[common, "score"].to_numpy()
            diff, lo, hi = stats.paired_difference(a, b)
            p_value = stats.mcnemar_p(ada.loc[common, "correct"].to_numpy(), sta.loc[common, "correct"].to_numpy())
            row = {"model": key["model"], "method": key["method"], "task": TASK_LABELS.get(task, task),
                   "adaptive": key["setting"], "adaptive kept": _mean_kept(ada), "kept min": float(ada["kept"].min()),
                   "kept max": float(ada["kept"].max()), "static": row_key(by_id[sid])["setting"],
                   "static kept": _mean_kept(sta), "items": len(common), "adaptive %": float(a.mean()),
                   "static %": float(b.mean()), DIFF: diff, DIFF + CI_LO: lo, DIFF + CI_HI: hi,
                   "p": math.nan if p_value is None else p_value,
                   "verdict": "tie" if lo <= 0 <= hi else ("adaptive better" if diff > 0 else "static better")}
            if "n_objects" in ada.columns and ada["n_objects"].notna().sum() >= 3:
                ok = ada["n_objects"].notna() & ada["kept"].notna()
                r, rlo, rhi = stats.correlation_interval(ada.loc[ok, "n_objects"].to_numpy(), ada.loc[ok, "kept"].to_numpy())
                row.update({CORR: r, CORR + CI_LO: rlo, CORR + CI_HI: rhi})
            rows.append(row)
    return pd.DataFrame(rows)


def focus_setting(table: pd.DataFrame) -> str | None:
    """The fixed setting most pruned methods share (ties: the smallest last keep ratio), for plots that
    show one setting; None when there is none."""
    fixed = table[(table["method"] != "none") & ~table["setting"].astype(str).str.contains(":t")
                  & (table["setting"] != "full")]
    if fixed.empty:
        return None
    counts = fixed.groupby("setting")["method"].nunique()

    def ratio(setting: str) -> float:
        try:
            return float(str(setting).rsplit(":", 1)[-1])
        except ValueError:
            return math.inf

    return min(counts.index, key=lambda s: (-counts[s], ratio(s)))
