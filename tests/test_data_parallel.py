"""Data-parallel ranks on CPU: a sweep point with ``num_processes: 2`` (accelerate --multi_gpu, which is
torch.distributed's launcher with the gloo backend on CPU) runs two ranks on disjoint shares of the
items, each writing its own side-car; the results count every item once and ``tables`` reads both.
Slow: one real lmms-eval run of the shipped demo model."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest

from v2drop_eval.demo import BENCHMARKS, paths
from v2drop_eval.report.build import write_tables
from v2drop_eval.report.results import load_sweep
from v2drop_eval.sweep.config import expand, parse_config
from v2drop_eval.sweep.layout import is_done
from v2drop_eval.sweep.runner import run_sweep

LIMIT = 6


@pytest.mark.slow
def test_two_ranks_split_the_items_and_tables_merge_their_sidecars(tmp_path):
    demo = paths()
    raw = {
        "name": "dp", "output": str(tmp_path / "dp"), "methods": ["none"], "tasks": [BENCHMARKS["vqa"]],
        "models": [{"name": "demo_llava", "family": "llava", "pretrained": demo["llava"],
                    "model_args": {"device": "cpu", "device_map": "cpu", "attn_implementation": "sdpa"}}],
        "include_path": demo["include_path"], "limit": LIMIT, "batch_size": 2, "num_processes": 2, "timeout": 500,
        "env": {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1"},
    }
    cfg = parse_config(raw, read_layers=False)
    (point,) = expand(cfg)
    log = io.StringIO()
    report = run_sweep(cfg, [point], log=log)
    folder = cfg.output / point.id
    assert report.ok, log.getvalue() + (folder.parent / "_failed" / point.id / "lmms_eval.log").read_text()[-3000:]
    assert is_done(folder)

    text = (folder / "lmms_eval.log").read_text()
    assert "Running on rank 0" in text and "Running on rank 1" in text
    sidecars = sorted(folder.rglob("*_v2drop_samples*.jsonl"))
    assert sorted(p.name.rsplit("_", 1)[-1] for p in sidecars) == ["rank0.jsonl", "rank1.jsonl"]
    shares = [[json.loads(line)["doc_id"] for line in p.read_text().splitlines()] for p in sidecars]
    assert all(shares) and not set(shares[0]) & set(shares[1])  # each rank its own items
    assert sorted(shares[0] + shares[1]) == list(range(LIMIT))  # together every item, once
    (results,) = folder.rglob("*_results.json")
    data = json.loads(results.read_text())
    assert data["n-samples"][BENCHMARKS["vqa"]]["effective"] == LIMIT

    (loaded,) = load_sweep(cfg.output)
    assert sorted(loaded.samples["doc_id"]) == list(range(LIMIT))
    write_tables(cfg.output)
    eff = pd.read_csv(cfg.output / "tables" / "efficiency.csv").set_index("point")
    rows = [json.loads(line) for p in sidecars for line in p.read_text().splitlines()]
    assert eff.loc[point.id, "vision_tokens_avg"] == pytest.approx(
        sum(r["avg_vision_tokens"] for r in rows) / len(rows))
