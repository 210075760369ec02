"""Accuracy by sub-task and complexity, and adaptive vs static V2Drop, from fake scenes-benchmark points."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sweep_fakes import sidecar_rows, write_point

from v2drop_eval.report import breakdown
from v2drop_eval.report.build import build_tables

TASK = "v2drop_demo_scenes"
SUBTASKS = ("text", "count", "relation", "presence", "attribute")
N = 200
PNG = b"\x89PNG\r\n\x1a\n"


def _items():
    """Per item: sub-task, object count, background, object scale (deterministic)."""
    rng = np.random.default_rng(1)
    return [{"subtask": SUBTASKS[i % 5], "qtype": SUBTASKS[i % 5], "n_objects": int(rng.integers(1, 41)),
             "background": ("plain", "textured")[i % 2], "object_scale": ("small", "large", "mixed")[i % 3]}
            for i in range(N)]


def _point(sweep, pid, method, schedule, correct, kept, options=None):
    meta = {"model_name": "scenes_llava", "family": "llava", "method": method, "schedule": schedule,
            "budget": None, "metric": "l2" if method == "v2drop" else None,
            "seed": 0 if method == "random" else None, "options": options}
    rows = sidecar_rows([TASK], meta, n=N, vision=64, layers=8)
    for r, item, k in zip(rows, _items(), kept, strict=True):
        r.update(item, avg_vision_tokens=float(k))
    point = write_point(sweep, pid, meta, {TASK: 0.0}, rows=rows)
    res = next((point / "v2drop_llava").glob("*_results.json"))
    data = json.loads(res.read_text())
    data["results"][TASK] = {"alias": TASK, "accuracy,none": float(np.mean(correct))}
    res.write_text(json.dumps(data))
    (point / "v2drop_llava" / f"20250101_000000_samples_{TASK}.jsonl").write_text(
        "".join(json.dumps({"doc_id": i, "accuracy": float(c)}) + "\n" for i, c in enumerate(correct)))


@pytest.fixture
def scenes_sweep(tmp_path):
    rng = np.random.default_rng(0)
    items = _items()
    objects = np.array([it["n_objects"] for it in items])
    base = rng.random(N) < 0.95
    # Pruned points fail more on busy scenes and on counting, so the groups differ by construction.
    busy = objects / 40.0
    counting = np.array([it["subtask"] == "count" for it in items])
    v2drop = base & (rng.random(N) > 0.3 * busy + 0.2 * counting)
    random_ = base & (rng.random(N) > 0.7 * busy + 0.4 * counting)
    adaptive = v2drop | (base & (rng.random(N) < 0.5))
    _point(tmp_path, "scenes_llava__none", "none", None, base, [64.0] * N)
    _point(tmp_path, "scenes_llava__v2drop__s2-0.125__l2", "v2drop", "2:0.125", v2drop, [22.0] * N)
    _point(tmp_path, "scenes_llava__random__s2-0.125", "random", "2:0.125", random_, [22.0] * N)
    _point(tmp_path, "scenes_llava__v2drop__s2-0.25__l2", "v2drop", "2:0.25", v2drop, [28.0] * N)
    # with a named option: never the adaptive point's partner, though its mean kept count is the closest
    _point(tmp_path, "scenes_llava__v2drop__s2-0.23__l2__float32_scores", "v2drop", "2:0.23", v2drop,
           [float(np.mean(20.0 + 0.4 * objects))] * N, options="float32_scores")
    # adaptive: kept tokens grow with the object count, mean close to the 2:0.25 point's 28
    _point(tmp_path, "scenes_llava__v2drop__s2-t1-0.05-1__l2", "v2drop", "2:t1:0.05:1", adaptive,
           list(20.0 + 0.4 * objects))
    return tmp_path, {"base": base, "v2drop": v2drop, "random": random_, "adaptive": adaptive}, items


def test_object_bins():
    assert [breakdown.object_bin(n) for n in (1, 3, 4, 9, 10, 20, 40, 41)] == [
        "1-3", "1-3", "4-9", "4-9", "10-19", "20-40", "20-40", "41+"]
    assert breakdown.object_bin(float("nan")) is None


def test_breakdown_tables_and_plots(scenes_sweep):
    sweep, correct, items = scenes_sweep
    out = sweep / "tables"
    names = {p.name for p in build_tables(sweep, out)}
    assert {"accuracy_by_subtask.md", "accuracy_by_subtask.csv", "accuracy_by_subtask.tex",
            "accuracy_by_subtask.png", "accuracy_by_complexity.csv", "accuracy_by_complexity.png",
            "adaptive_vs_static.md", "adaptive_vs_static.csv"} <= names
    for png in ("accuracy_by_subtask.png", "accuracy_by_complexity.png"):
        assert (out / png).read_bytes()[:8] == PNG

    sub = pd.read_csv(out / "accuracy_by_subtask.csv")
    row = sub[sub["point"] == "scenes_llava__random__s2-0.125"].iloc[0]
    assert row["task"] == "DemoScenes" and row["items"] == N
    for s in SUBTASKS:
        mask = np.array([it["subtask"] == s for it in items])
        assert row[s] == pytest.approx(100 * correct["random"][mask].mean())
        assert row[f"{s} 95% low"] <= row[s] <= row[f"{s} 95% high"]
    first = list(sub.columns).index("items") + 1  # the group columns follow the key columns and "items"
    assert list(sub.columns[first:first + 5]) == list(SUBTASKS)  # in the items' own order
    md = (out / "accuracy_by_subtask.md").read_text()
    assert f"{row['count']:.1f} [{row['count 95% low']:.1f}, {row['count 95% high']:.1f}]" in md

    cx = pd.read_csv(out / "accuracy_by_complexity.csv")
    assert list(cx.columns[first:first + 9]) == ["1-3", "4-9", "10-19", "20-40", "plain", "textured", "small", "large", "mixed"]
    row = cx[cx["point"] == "scenes_llava__v2drop__s2-0.125__l2"].iloc[0]
    objects = np.array([it["n_objects"] for it in items])
    busy = objects >= 20
    assert row["20-40"] == pytest.approx(100 * correct["v2drop"][busy].mean())
    plain = np.array([it["background"] == "plain" for it in items])
    assert row["plain"] == pytest.approx(100 * correct["v2drop"][plain].mean())


def test_adaptive_against_the_closest_static_point(scenes_sweep):
    sweep, correct, items = scenes_sweep
    build_tables(sweep)
    ada = pd.read_csv(sweep / "tables" / "adaptive_vs_static.csv")
    assert len(ada) == 1
    r = ada.iloc[0]
    objects = np.array([it["n_objects"] for it in items])
    kept = 20.0 + 0.4 * objects
    # 28 tokens is closer than 22; the point with an option is another variant of the method
    assert r["adaptive"] == "2:t1:0.05:1" and r["static"] == "2:0.25" and r["method"] == "v2drop"
    assert r["adaptive kept"] == pytest.approx(kept.mean()) and r["static kept"] == pytest.approx(28.0)
    diff = r[breakdown.DIFF]
    assert diff == pytest.approx(100 * (correct["adaptive"].mean() - correct["v2drop"].mean()))
    assert r[breakdown.DIFF + " 95% low"] <= diff <= r[breakdown.DIFF + " 95% high"]
    assert r["verdict"] == "adaptive better" and r["p"] < 0.05
    assert r[breakdown.CORR] == pytest.approx(1.0) and r["items"] == N


def test_points_without_item_fields_give_no_breakdown(tmp_path):
    meta = {"model_name": "m", "family": "llava", "method": "none"}
    write_point(tmp_path, "m__none", meta, {"gqa": 0.6}, rows=sidecar_rows(["gqa"], meta))
    names = {p.name for p in build_tables(tmp_path)}
    assert not any(n.startswith(("accuracy_by_", "adaptive_vs_static")) for n in names)
