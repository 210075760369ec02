"""`v2drop-eval bench` in a tiny configuration: well-formed rows and files (no timing assertions)."""

import json

import pytest

from v2drop_eval import DropSchedule
from v2drop_eval.bench import main, scaled_schedule

REQUIRED = {"method", "budget", "attn", "batch_size", "prefill_ms", "decode_ms_per_token", "speedup",
            "flops_speedup", "efficiency", "kv_cache_bytes", "llm_prefill_ms", "generate_ms", "peak_memory_bytes",
            "overhead_vs_random", "schedule", "avg_vision_tokens"}


def test_scaled_schedules():
    assert scaled_schedule("llava", 128, "v2drop", 32) == DropSchedule.preset("llava", 128)
    assert scaled_schedule("qwen2_vl", 192, "fastv", 28) == DropSchedule.preset("qwen2_vl", 192, method="fastv")
    v2 = scaled_schedule("llava", 128, "v2drop", 16)
    assert v2.layers == (2, 8, 11) and [r for _, r in v2.stages] == [0.28, 0.25, 0.0]
    fastv = scaled_schedule("llava", 128, "fastv", 16)
    assert len(fastv.stages) == 1
    assert abs(fastv.average_tokens(576, 16) - v2.average_tokens(576, 16)) < 1
    dart = scaled_schedule("llava", 128, "dart", 16)
    assert dart == fastv
    assert scaled_schedule("llava", 64, "pdrop", 32) == DropSchedule.parse("2:0.32/4:0.32/6:0.32")


def test_bench_tiny_writes_outputs(tmp_path, capsys):
    rc = main(["--shape", "tiny", "--attn", "sdpa", "--batch-sizes", "1,2", "--methods", "none,v2drop,random,fastv,pdrop,dart",
               "--budgets", "128", "--repeats", "1", "--warmup", "0", "--new-tokens", "3", "--output", str(tmp_path)])
    assert rc == 0
    payload = json.loads((tmp_path / "cpu-tiny.json").read_text())
    assert payload["machine"]["torch"] and payload["machine"]["transformers"]
    rows = payload["rows"]
    # plain, none, v2drop, random, fastv, pdrop, dart, v2drop at fastv's schedule, v2drop keep1.0 per batch size
    assert len(rows) == 18
    for row in rows:
        assert REQUIRED <= row.keys()
        assert row["prefill_ms"] > 0 and row["kv_cache_bytes"] > 0
    by = {(r["batch_size"], r["method"], r["budget"]): r for r in rows}
    none, v2 = by[(1, "none", "-")], by[(1, "v2drop", "128")]
    assert none["speedup"] == 1.0 and none["flops_speedup"] == 1.0
    assert v2["flops_speedup"] > 1 and v2["kv_cache_bytes"] < none["kv_cache_bytes"]
    assert v2["overhead_vs_random"] is not None
    assert by[(2, "none", "-")]["kv_cache_bytes"] == 2 * none["kv_cache_bytes"]
    assert by[(1, "v2drop", "keep1.0")]["flops_speedup"] == 1.0
    same = by[(1, "v2drop", "128@fastv")]
    assert same["schedule"] == by[(1, "fastv", "128")]["schedule"] and by[(1, "fastv", "128")]["fastv_over_v2drop"] is not None
    md = (tmp_path / "cpu-tiny.md").read_text()
    assert "| attn | batch_size | method |" in md and "transformers" in md
    assert md.count("\n| sdpa |") == 18
    # every method spends the same budget: layer-averaged vision tokens within one token of v2drop's
    for method in ("pdrop", "dart", "fastv", "random"):
        assert abs(by[(1, method, "128")]["avg_vision_tokens"] - v2["avg_vision_tokens"]) < 1.5, method
    # the target summary: one line per (attn, batch size), each target with a verdict
    summary = [line for line in md.splitlines() if line.startswith("- sdpa, batch ")]
    assert len(summary) == 2
    for line in summary:
        assert "efficiency at 128" in line and "v2drop over random" in line and "keep1.0 over plain" in line
        assert "FastV over v2drop" in line and "n/a" not in line


def test_bench_targets_verdicts():
    from v2drop_eval.bench import targets

    base = {"attn": "sdpa", "batch_size": 1, "overhead_vs_random": None, "fastv_over_v2drop": None}
    rows = [
        {**base, "method": "plain", "budget": "-", "llm_prefill_ms": 100.0},
        {**base, "method": "v2drop", "budget": "keep1.0", "llm_prefill_ms": 100.5},
        {**base, "method": "v2drop", "budget": "128", "efficiency": 0.8, "overhead_vs_random": 0.05},
        {**base, "method": "fastv", "budget": "128", "fastv_over_v2drop": 0.03},
    ]
    (line,) = targets(rows)
    assert "efficiency at 128 0.800 (>= 0.9: **missed**)" in line
    assert "v2drop over random +5.0% (<= 2%: **missed**)" in line
    assert "keep1.0 over plain +0.5% (<= 1%: met)" in line
    assert "FastV over v2drop +3.0% (> 0: met)" in line


def test_bench_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown shape 'gpt'; allowed: llava-1.5-7b, qwen2-vl-7b, small, tiny"):
        main(["--shape", "gpt"])
    with pytest.raises(ValueError, match="unknown method 'sparse'"):
        main(["--shape", "tiny", "--methods", "none,sparse"])
