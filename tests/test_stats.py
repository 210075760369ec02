"""Intervals and paired comparisons from per-item scores, and how the tables show them."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sweep_fakes import sidecar_rows, write_point

from v2drop_eval.report import stats
from v2drop_eval.report.build import build_tables


def test_mean_interval_matches_the_binomial_error():
    x = np.array([1.0] * 270 + [0.0] * 30)  # 90% of 300: standard error 1.73 points
    mean, lo, hi = stats.mean_interval(x)
    assert mean == pytest.approx(0.9)
    assert lo < 0.9 < hi
    assert (hi - lo) / 2 == pytest.approx(1.96 * math.sqrt(0.9 * 0.1 / 300), rel=0.15)
    assert stats.mean_interval(x) == (mean, lo, hi)  # seeded: tables rebuild identically
    assert all(math.isnan(v) for v in stats.mean_interval(np.array([])))


def test_median_interval_resists_an_outlier():
    x = np.array([1.00, 1.01, 0.99, 1.02, 0.98, 1.00, 1.01, 5.0])  # one repeat hit by the machine
    med, lo, hi = stats.median_interval(x)
    assert med == pytest.approx(1.005)
    assert 0.98 <= lo <= med <= hi <= 1.02
    assert stats.mean_interval(x)[2] > 1.5  # the mean would be dragged off
    assert all(math.isnan(v) for v in stats.median_interval(np.array([])))


def test_paired_difference_cancels_shared_item_difficulty():
    rng = np.random.default_rng(1)
    hard = rng.random(300) < 0.3
    a = (~hard).astype(float)
    b = a.copy()
    b[np.flatnonzero(a)[:6]] = 0.0  # b loses 6 of a's correct items
    diff, lo, hi = stats.paired_difference(a, b)
    assert diff == pytest.approx(6 / 300)
    assert 0 < lo <= diff <= hi  # paired: 6 discordant items are a real difference
    assert stats.paired_difference(a, a) == (0.0, 0.0, 0.0)


def test_mcnemar_exact():
    a = np.array([1.0] * 10 + [0.0] * 2 + [1.0] * 50)
    b = np.array([0.0] * 10 + [1.0] * 2 + [1.0] * 50)
    assert stats.mcnemar_p(a, b) == pytest.approx(2 * (1 + 12 + 66) / 2**12)
    assert stats.mcnemar_p(a, a) == 1.0
    assert stats.mcnemar_p(a * 0.5, b) is None  # not 0/1 scores


def _point(sweep, pid, method, schedule, correct):
    """A finished point of the demo task whose lmms-eval sample log holds ``correct`` (0/1 per item)."""
    meta = {"model_name": "demo", "family": "llava", "method": method, "schedule": schedule, "budget": None,
            "metric": "l2" if method == "v2drop" else None, "seed": 0 if method == "random" else None,
            "pretrained": "x"}
    task, n = "v2drop_demo_vqa", len(correct)
    point = write_point(sweep, pid, meta, {task: 0.0}, rows=sidecar_rows([task], meta, n=n), with_point_json=False)
    res = next((point / "v2drop_llava").glob("*_results.json"))
    data = json.loads(res.read_text())
    data["results"][task] = {"alias": task, "accuracy,none": float(np.mean(correct))}
    res.write_text(json.dumps(data))
    log = point / "v2drop_llava" / f"20250101_000000_samples_{task}.jsonl"
    log.write_text("".join(json.dumps({"doc_id": i, "accuracy": float(c), "yes_no_accuracy": None}) + "\n"
                           for i, c in enumerate(correct)))


def test_tables_show_intervals_and_paired_comparisons(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.random(300) < 0.9
    v2drop = base & (rng.random(300) < 0.97)
    random_ = base & (rng.random(300) < 0.80)
    fastv = v2drop.copy()
    fastv[np.flatnonzero(fastv)[:1]] = False  # one item apart from v2drop: a tie
    _point(tmp_path, "demo__none", "none", None, base)
    _point(tmp_path, "demo__v2drop__s2-0.25__l2", "v2drop", "2:0.25", v2drop)
    _point(tmp_path, "demo__random__s2-0.25", "random", "2:0.25", random_)
    _point(tmp_path, "demo__fastv__s2-0.25", "fastv", "2:0.25", fastv)
    out = tmp_path / "tables"
    names = {p.name for p in build_tables(tmp_path, out)}
    assert {"comparisons.md", "comparisons.csv", "comparisons.tex"} <= names

    acc = pd.read_csv(out / "accuracy.csv")
    row = acc[acc["point"] == "demo__v2drop__s2-0.25__l2"].iloc[0]
    assert row["DemoVQA 95% low"] < row["DemoVQA"] < row["DemoVQA 95% high"]
    md = (out / "accuracy.md").read_text()
    assert f"{row['DemoVQA']:.1f} [{row['DemoVQA 95% low']:.1f}, {row['DemoVQA 95% high']:.1f}]" in md

    cmp = pd.read_csv(out / "comparisons.csv")
    assert len(cmp) == 3  # V2Drop-Random, V2Drop-FastV, Random-FastV at 2:0.25
    pair = cmp[(cmp["a"] == "V2Drop (l2)") & (cmp["b"] == "Random (seed 0)")].iloc[0]
    assert pair["items"] == 300
    assert pair["diff"] == pytest.approx(100 * (v2drop.mean() - random_.mean()))
    assert pair["verdict"] == "V2Drop (l2) better" and pair["p"] < 0.05
    tie = cmp[(cmp["a"] == "V2Drop (l2)") & (cmp["b"] == "FastV")].iloc[0]
    assert tie["verdict"] == "tie" and tie["diff 95% low"] <= 0 <= tie["diff 95% high"]
