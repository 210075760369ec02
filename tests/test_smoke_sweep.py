"""The real smoke sweep (configs/smoke.yaml) end to end: lmms-eval processes, resume, tables checked
against the raw result files. Slow: eight lmms-eval runs of tiny models, one point per method (the
runner's other paths are tested with a stand-in lmms-eval in test_sweep.py), on the session's assets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


# Every method once (both models' references for the tables; V2Drop fixed and adaptive).
POINTS = ("tiny_llava__none", "tiny_qwen2_vl__none", "tiny_llava__v2drop__s2-0.5_3-0__l2",
          "tiny_llava__v2drop__s2-t1-0.1-0.9__l2", "tiny_llava__random__s2-0.5_3-0", "tiny_qwen2_vl__fastv__b192",
          "tiny_llava__pdrop__b128", "tiny_qwen2_vl__dart__b128")


def _sweep(out: Path, assets: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "V2DROP_SMOKE_ASSETS": str(assets), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    only = [arg for pid in POINTS for arg in ("--only", pid)]
    return subprocess.run([sys.executable, "-m", "v2drop_eval.cli", "sweep", "configs/smoke.yaml",
                           "--output", str(out), *only], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tiny_assets) -> tuple[Path, Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("smoke_sweep") / "smoke"
    return out, tiny_assets["root"], _sweep(out, tiny_assets["root"])


def _one(path: Path, pattern: str) -> Path:
    (hit,) = path.rglob(pattern)
    return hit


@pytest.mark.slow
def test_smoke_sweep_runs_resumes_and_tabulates(smoke):
    out, assets, first = smoke
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    status = json.loads((out / "sweep.json").read_text())
    points = status["points"] if isinstance(status, dict) and "points" in status else status
    assert sorted(points) == sorted(POINTS)
    for pid in POINTS:
        assert (out / pid / "point.json").is_file()
        _one(out / pid, "*_results.json")
        _one(out / pid, "*_v2drop_samples.jsonl")

    second = _sweep(out, assets)
    assert second.returncode == 0
    log = second.stdout + second.stderr
    assert log.count("skip ") == len(POINTS) and f"{len(POINTS)} skipped" in log, log[-2000:]

    from v2drop_eval.cli import main

    # The test runs a subset of the grid (--only): tables name the rest as missing and refuse without
    # --allow-missing.
    assert main(["tables", str(out)]) == 1
    assert main(["tables", str(out), "--allow-missing"]) == 0
    tables = out / "tables"
    for name in ("accuracy", "efficiency"):
        for ext in ("md", "csv", "tex"):
            assert (tables / f"{name}.{ext}").stat().st_size > 0
    for png in ("tradeoff.png", "vision_tokens.png", "tokens_vs_complexity.png"):
        assert (tables / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A number of each table against the raw files.
    acc = pd.read_csv(tables / "accuracy.csv").set_index("point")
    pid = "tiny_llava__v2drop__s2-0.5_3-0__l2"
    raw = json.loads(_one(out / pid, "*_results.json").read_text())["results"]
    mme = raw["tiny_mme"]["mme_perception_score,none"] + raw["tiny_mme"].get("mme_cognition_score,none", 0)
    assert acc.loc[pid].filter(like="mme").iloc[0] == pytest.approx(mme)
    eff = pd.read_csv(tables / "efficiency.csv").set_index("point")
    for pid in ("tiny_llava__v2drop__s2-t1-0.1-0.9__l2", "tiny_llava__random__s2-0.5_3-0"):
        rows = [json.loads(line) for line in _one(out / pid, "*_v2drop_samples.jsonl").read_text().splitlines()]
        avgs = [r["avg_vision_tokens"] for r in rows]
        e = eff.loc[pid]
        assert e["vision_tokens_avg"] == pytest.approx(sum(avgs) / len(avgs))
        assert (e["vision_tokens_min"], e["vision_tokens_max"]) == (pytest.approx(min(avgs)), pytest.approx(max(avgs)))
        assert e["prefill_tflops"] == pytest.approx(sum(r["prefill_flops"] for r in rows) / len(rows) / 1e12)
    # Adaptive rows keep per-image counts within their clamps: [floor(n x 0.1), floor(n x 0.9)] at layer 2.
    rows = [json.loads(line) for line in
            _one(out / "tiny_llava__v2drop__s2-t1-0.1-0.9__l2", "*_v2drop_samples.jsonl").read_text().splitlines()]
    for r in rows:
        n, kept = r["vision_tokens"], r["vision_per_layer"][2]
        assert (n * 1) // 10 <= kept <= (n * 9) // 10 and r["vision_per_layer"][3] == kept
