"""Tables and plots from sweep results: realistic fake result files, bad files, and the real smoke sweep."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pandas as pd
import pytest
from sweep_fakes import LLAVA_SCORES, sidecar_rows, task_metrics, write_point

from v2drop_eval import DropSchedule
from v2drop_eval.cli import main
from v2drop_eval.report.build import build_tables
from v2drop_eval.report.results import load_sweep
from v2drop_eval.report.tables import accuracy_table, efficiency_table, headline_score

TASKS = ["gqa", "scienceqa_img", "textvqa_val", "pope", "mme", "mmbench_en_dev"]
PNG = b"\x89PNG\r\n\x1a\n"


def profile(budget: int) -> list[int]:
    return DropSchedule.preset("llava", budget).tokens_per_layer(576, 32)


def scaled(scores: dict, factor: float) -> dict:
    return {t: (tuple(x * factor for x in s) if isinstance(s, tuple) else s * factor) for t, s in scores.items()}


@pytest.fixture
def fake_sweep(tmp_path: Path) -> Path:
    sw = tmp_path / "llava15_7b"
    none = {"model_name": "llava15_7b", "family": "llava", "method": "none"}
    write_point(sw, "llava15_7b__none", none, LLAVA_SCORES["none"],
                sidecar_rows(TASKS, none, prefill_ms=100.0, batch_size=2))
    for budget, factor in ((192, 1.0), (128, 0.96), (64, 0.88)):
        meta = {**none, "method": "v2drop", "budget": budget, "metric": "l2"}
        write_point(sw, f"llava15_7b__v2drop__b{budget}__l2", meta, scaled(LLAVA_SCORES["v2drop"], factor),
                    sidecar_rows(TASKS, meta, per_layer=profile(budget), prefill_ms=50.0 * factor, batch_size=2))
    meta = {**none, "method": "fastv", "budget": 192}
    write_point(sw, "llava15_7b__fastv__b192", meta, LLAVA_SCORES["fastv"],
                sidecar_rows(TASKS, meta, per_layer=DropSchedule.parse("2:0.2882").tokens_per_layer(576, 32),
                             prefill_ms=45.0, batch_size=2))
    meta = {**none, "method": "random", "budget": 128, "seed": 0}
    write_point(sw, "llava15_7b__random__b128", meta, scaled(LLAVA_SCORES["fastv"], 1.02),
                sidecar_rows(TASKS, meta, per_layer=profile(128), prefill_ms=47.0, batch_size=2))
    # A schedule point without point.json: described from model_args and its side-car.
    meta = {"method": "v2drop", "schedule": "3:0.5/14:0.3/29:0", "metric": "l2",
            "pretrained": "llava-hf/llava-1.5-7b-hf"}
    write_point(sw, "llava15_7b__v2drop__s3-0.5_14-0.3_29-0__l2", meta, scaled(LLAVA_SCORES["v2drop"], 0.99),
                sidecar_rows(TASKS, meta, per_layer=DropSchedule.parse(meta["schedule"]).tokens_per_layer(576, 32)),
                with_point_json=False)
    return sw


def read_csv(sw: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(sw / "tables" / f"{name}.csv", keep_default_na=True)


def row(df: pd.DataFrame, point: str) -> pd.Series:
    hit = df[df["point"] == point]
    assert len(hit) == 1, point
    return hit.iloc[0]


def raw_results(sw: Path, point: str) -> dict:
    (path,) = (sw / point).rglob("*_results.json")
    return json.loads(path.read_text())["results"]


def test_headline_scores():
    assert headline_score("gqa", task_metrics("gqa", 0.619)) == (pytest.approx(61.9), "exact_match")
    assert headline_score("pope", task_metrics("pope", 0.859))[0] == pytest.approx(85.9)
    assert headline_score("mme", task_metrics("mme", (1510.7, 351.3)))[0] == pytest.approx(1862.0)
    assert headline_score("mmbench_en_dev", task_metrics("mmbench_en_dev", 64.6))[0] == pytest.approx(64.6)
    assert headline_score("mmstar", {"average,none": 0.3, "math,none": 0.1})[0] == pytest.approx(30.0)
    assert headline_score("my_task", {"alias": "x", "f1_stderr,none": 1, "f1,none": 0.7}) == (0.7, "f1")
    assert headline_score("gqa", {"alias": "gqa"}) == (None, "exact_match")


def test_tables_from_fake_results(fake_sweep: Path):
    written = build_tables(fake_sweep)
    names = sorted(p.name for p in written)
    assert names == ["accuracy.csv", "accuracy.md", "accuracy.tex", "efficiency.csv", "efficiency.md",
                     "efficiency.tex", "tradeoff.png", "vision_tokens.png"]
    for p in written:
        assert p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == PNG

    acc = read_csv(fake_sweep, "accuracy")
    # Paper order: unpruned, then per budget (largest first) each method, then explicit schedules.
    assert list(acc["point"]) == [
        "llava15_7b__none", "llava15_7b__v2drop__b192__l2", "llava15_7b__fastv__b192",
        "llava15_7b__v2drop__b128__l2", "llava15_7b__random__b128", "llava15_7b__v2drop__b64__l2",
        "llava15_7b__v2drop__s3-0.5_14-0.3_29-0__l2"]
    assert list(acc.columns[7:]) == ["GQA", "SQA-IMG", "TextVQA", "POPE", "MME", "MMB", "Average"]
    # Numbers checked against the raw result files.
    raw = raw_results(fake_sweep, "llava15_7b__v2drop__b128__l2")
    r = row(acc, "llava15_7b__v2drop__b128__l2")
    assert r["GQA"] == pytest.approx(100 * raw["gqa"]["exact_match,none"])
    assert r["POPE"] == pytest.approx(100 * raw["pope"]["pope_f1_score,none"])
    assert r["MME"] == pytest.approx(raw["mme"]["mme_perception_score,none"] + raw["mme"]["mme_cognition_score,none"])
    assert r["MMB"] == pytest.approx(raw["mmbench_en_dev"]["gpt_eval_score,none"])
    base = raw_results(fake_sweep, "llava15_7b__none")
    rel = [raw["gqa"]["exact_match,none"] / base["gqa"]["exact_match,none"],
           raw["scienceqa_img"]["exact_match,none"] / base["scienceqa_img"]["exact_match,none"],
           raw["textvqa_val"]["exact_match,none"] / base["textvqa_val"]["exact_match,none"],
           raw["pope"]["pope_f1_score,none"] / base["pope"]["pope_f1_score,none"],
           sum(raw["mme"][k] for k in ("mme_perception_score,none", "mme_cognition_score,none"))
           / sum(base["mme"][k] for k in ("mme_perception_score,none", "mme_cognition_score,none")),
           raw["mmbench_en_dev"]["gpt_eval_score,none"] / base["mmbench_en_dev"]["gpt_eval_score,none"]]
    assert r["Average"] == pytest.approx(100 * sum(rel) / len(rel))
    assert row(acc, "llava15_7b__none")["Average"] == pytest.approx(100.0)
    s = row(acc, "llava15_7b__v2drop__s3-0.5_14-0.3_29-0__l2")
    assert s["method"] == "v2drop" and s["setting"] == "3:0.5/14:0.3/29:0" and s["model"] == "llava15_7b"
    assert row(acc, "llava15_7b__random__b128")["seed"] == 0

    md = (fake_sweep / "tables" / "accuracy.md").read_text()
    assert "| Model | Method | Tokens / schedule | Metric | Seed | GQA |" in md
    assert f"| llava15_7b | V2Drop | 128 | l2 | - | {r['GQA']:.1f} |" in md
    tex = (fake_sweep / "tables" / "accuracy.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex and f"{r['MME']:.1f}" in tex

    eff = read_csv(fake_sweep, "efficiency")
    e, n = row(eff, "llava15_7b__v2drop__b128__l2"), row(eff, "llava15_7b__none")
    rows = [json.loads(line) for line in next((fake_sweep / "llava15_7b__v2drop__b128__l2").rglob("*.jsonl"))
            .read_text().splitlines()]
    assert e["items"] == len(rows) == 24
    assert e["prefill_ms"] == pytest.approx(sum(x["prefill_ms"] / x["batch_size"] for x in rows) / len(rows))
    assert e["prefill_ms"] == pytest.approx(48.0)  # the batch's 96 ms shared by its 2 items
    assert e["decode_ms_per_token"] == pytest.approx(40.0 / 4)
    assert e["speedup"] == pytest.approx(n["total_ms"] / e["total_ms"])
    assert e["throughput_items_s"] == pytest.approx(1000 / e["total_ms"])
    assert e["vision_tokens_avg"] == pytest.approx(sum(profile(128)) / 32)
    assert e["prefill_tflops"] == pytest.approx(rows[0]["prefill_flops"] / 1e12)
    assert e["flops_reduction"] == pytest.approx(100 * (1 - e["prefill_tflops"] / n["prefill_tflops"]))
    assert e["kv_cache_mb"] == pytest.approx(rows[0]["kv_cache_bytes"] / 2**20)
    assert math.isnan(e["peak_memory_mb"]) and e["device"] == "cpu"
    emd = (fake_sweep / "tables" / "efficiency.md").read_text()
    assert "Prefill (ms)" in emd and "Speed-up" in emd and f"| {e['speedup']:.2f} |" in emd


def test_bad_files_are_named_and_skipped(fake_sweep: Path, capsys):
    (fake_sweep / "llava15_7b__v2drop__b64__l2" / "v2drop_llava" / "20250101_000000_results.json").write_text("{oops")
    side = next((fake_sweep / "llava15_7b__fastv__b192").rglob("*.jsonl"))
    side.write_text(side.read_text() + "{truncated\n")
    (fake_sweep / "llava15_7b__none" / "point.json").write_text("not json")
    (fake_sweep / ".tmp-llava15_7b__x" / "m").mkdir(parents=True)
    (fake_sweep / ".tmp-llava15_7b__x" / "m" / "a_results.json").write_text("{}")
    (fake_sweep / "_failed" / "p" / "m").mkdir(parents=True)
    (fake_sweep / "_failed" / "p" / "m" / "a_results.json").write_text("{}")
    # without --allow-missing: refused, each point left out named, nothing written
    assert main(["tables", str(fake_sweep)]) == 1
    err = capsys.readouterr().err
    assert "2 point(s) not included of 7" in err and "--allow-missing" in err
    assert "llava15_7b__fastv__b192: side-car" in err and not (fake_sweep / "tables").exists()
    assert main(["tables", str(fake_sweep), "--allow-missing"]) == 0
    out = capsys.readouterr().out
    assert ("not included: llava15_7b__v2drop__b64__l2: 20250101_000000_results.json is not valid JSON"
            in out)
    # a half-written side-car line: the point is left out and named, not counted short
    assert f"not included: llava15_7b__fastv__b192: side-car {side.name} has 1 corrupt line(s)" in out
    assert "llava15_7b__none/point.json: not readable JSON" in out
    acc = read_csv(fake_sweep, "accuracy")
    assert {"llava15_7b__v2drop__b64__l2", "llava15_7b__fastv__b192"}.isdisjoint(acc["point"]) and len(acc) == 5
    assert row(acc, "llava15_7b__none")["method"] == "none"  # described from model_args instead
    for name in ("accuracy", "efficiency"):
        md = (fake_sweep / "tables" / f"{name}.md").read_text()
        assert "Not included (2):" in md and "- `llava15_7b__fastv__b192`: side-car" in md
        assert "% not included: llava15_7b__v2drop__b64__l2:" in (fake_sweep / "tables" / f"{name}.tex").read_text()


def test_missing_baseline_and_sidecar(tmp_path: Path):
    sw = tmp_path / "s"
    meta = {"model_name": "m", "family": "llava", "method": "v2drop", "budget": 128, "metric": "l2"}
    write_point(sw, "m__v2drop__b128__l2", meta, {"gqa": 0.5})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        points = load_sweep(sw)
        acc, eff = accuracy_table(points), efficiency_table(points)
    assert math.isnan(acc.iloc[0]["Average"]) and acc.iloc[0]["GQA"] == pytest.approx(50.0)
    assert math.isnan(eff.iloc[0]["speedup"])
    assert not caught or all("results" not in str(w.message) for w in caught)
    build_tables(sw)  # no side-car, no baseline: still writes every table
    assert (sw / "tables" / "efficiency.tex").exists()


def test_empty_directory(tmp_path: Path, capsys):
    assert main(["tables", str(tmp_path)]) == 1  # nothing to tabulate: refused, nothing written
    assert "error: no finished point in" in capsys.readouterr().err and not (tmp_path / "tables").exists()
    assert main(["tables", str(tmp_path), "--allow-missing"]) == 0
    captured = capsys.readouterr()
    assert "no readable *_results.json" in captured.out and "the tables are empty" in captured.err
    assert (tmp_path / "tables" / "accuracy.md").exists()
    assert main(["tables", str(tmp_path / "nope")]) == 2


def test_adaptive_spread_and_complexity_plot(fake_sweep: Path):
    """Adaptive points: per-item token counts differ; tables give mean/min/max, a plot shows them
    against the object count."""
    sched = "3:t1:0.1:0.6"
    meta = {"model_name": "llava15_7b", "family": "llava", "method": "v2drop", "schedule": sched, "metric": "l2"}
    rows = []
    for k, objects in enumerate((1, 2, 5, 5)):
        kept = [576] * 3 + [int(576 * (0.1 + 0.1 * objects))] * 29
        row_ = sidecar_rows(["gqa"], meta, n=1, per_layer=kept)[0]
        rows.append({**row_, "doc_id": k, "n_objects": objects, "image_edge_density": 0.01 * objects})
    point = "llava15_7b__v2drop__s3-t1-0.1-0.6__l2"
    write_point(fake_sweep, point, meta, {"gqa": 0.6}, rows)
    written = build_tables(fake_sweep)
    assert "tokens_vs_complexity.png" in {p.name for p in written}
    assert (fake_sweep / "tables" / "tokens_vs_complexity.png").read_bytes()[:8] == PNG
    e = row(read_csv(fake_sweep, "efficiency"), point)
    avgs = [r["avg_vision_tokens"] for r in rows]
    assert (e["vision_tokens_min"], e["vision_tokens_max"]) == (pytest.approx(min(avgs)), pytest.approx(max(avgs)))
    assert e["vision_tokens_avg"] == pytest.approx(sum(avgs) / len(avgs))
    assert e["prefill_tflops"] == pytest.approx(sum(r["prefill_flops"] for r in rows) / len(rows) / 1e12)
    # the complexity table: kept tokens rise with the object count here, by construction
    c = row(read_csv(fake_sweep, "complexity"), point)
    assert c["complexity"] == "objects" and c["corr"] > 0.9
    by_count = {n: [r["avg_vision_tokens"] for r, o in zip(rows, (1, 2, 5, 5), strict=True) if o == n] for n in (1, 2, 5)}
    for n, vals in by_count.items():
        assert c[f"kept@{n}"] == pytest.approx(sum(vals) / len(vals))
    assert "kept@3" not in c


def test_failed_and_pending_points_are_listed(fake_sweep: Path, capsys):
    failed = fake_sweep / "_failed" / "llava15_7b__fastv__b128"
    failed.mkdir(parents=True)
    (failed / "error.json").write_text(json.dumps({"error": "lmms-eval exited with status 1"}))
    (fake_sweep / "sweep.json").write_text(json.dumps({"points": {
        "llava15_7b__none": {"status": "done"}, "llava15_7b__fastv__b64": {"status": "pending"}}}))
    assert main(["tables", str(fake_sweep)]) == 1
    assert "  llava15_7b__fastv__b64: not run yet" in capsys.readouterr().err
    assert main(["tables", str(fake_sweep), "--allow-missing"]) == 0
    out = capsys.readouterr().out
    assert "not included: llava15_7b__fastv__b128: failed: lmms-eval exited with status 1" in out
    assert "not included: llava15_7b__fastv__b64: not run yet" in out
    md = (fake_sweep / "tables" / "accuracy.md").read_text()
    assert "Not included (2):" in md and "`llava15_7b__fastv__b128`: failed:" in md


def test_missing_reference_point_fails_unless_allowed(fake_sweep: Path, capsys):
    results = next((fake_sweep / "llava15_7b__none").rglob("*_results.json"))
    results.write_text(results.read_text()[:100])  # truncated: the reference row is gone
    assert main(["tables", str(fake_sweep)]) == 1
    captured = capsys.readouterr()
    assert "  llava15_7b__none:" in captured.err
    assert "no reference (none) point for model(s) llava15_7b" in captured.err and "--allow-missing" in captured.err
    assert main(["tables", str(fake_sweep), "--allow-missing"]) == 0
    assert "warning: no reference (none) point" in capsys.readouterr().err
    assert (fake_sweep / "tables" / "accuracy.md").exists()


def test_encoder_schedule_setting_and_vision_columns():
    """A point with stages inside the vision encoder is its own row ('+ encoder ...'); the unpruned row
    stays the baseline; the efficiency table carries the vision encoder's FLOPs and time."""
    from v2drop_eval.report.results import PointResult
    from v2drop_eval.report.tables import accuracy_table, efficiency_table

    def point(pid, method, encoder=None, budget=None, flops_=2e12, ms=30.0, score=0.5):
        samples = pd.DataFrame([{"batch_size": 2, "prefill_ms": 100.0, "decode_ms": 50.0, "total_ms": 150.0,
                                 "generated_tokens": 5, "avg_vision_tokens": 576, "vision_tokens": 576,
                                 "prefill_flops": 8e12, "paper_macs": 3.8e12, "kv_cache_bytes": 1,
                                 "vision_flops": flops_, "vision_ms": ms}] * 2)
        meta = {"model_name": "m", "family": "llava", "method": method, "budget": budget, "schedule": None,
                "metric": None, "seed": None, "encoder_schedule": encoder}
        return PointResult(pid, Path(pid), meta, {"gqa": {"exact_match,none": score}}, {}, samples, [], {})

    points = [point("m__none", "none"), point("m__none__e1", "none", "12:0.5/18:0.5", flops_=1e12, score=0.45),
              point("m__v2drop__b128__e1", "v2drop", "12:0.5", budget=128, flops_=1.5e12, score=0.4)]
    acc = accuracy_table(points)
    assert set(acc["setting"]) == {"full", "encoder 12:0.5/18:0.5", "128 + encoder 12:0.5"}
    assert acc.set_index("point").loc["m__none", "Average"] == pytest.approx(100.0)
    assert acc.set_index("point").loc["m__none__e1", "Average"] == pytest.approx(90.0)
    from v2drop_eval.report.render import to_markdown

    assert "| m | V2Drop (encoder only) | encoder 12:0.5/18:0.5 |" in to_markdown(acc)
    eff = efficiency_table(points).set_index("point")
    assert eff.loc["m__none__e1", "vision_tflops"] == pytest.approx(1.0)
    assert eff.loc["m__none", "vision_ms"] == pytest.approx(15.0)  # a batch of 2 shares its 30 ms
