"""`v2drop-eval bench` and the GPU suite's dry run in tiny configurations: well-formed rows, paired
figures with intervals, verdicts and files (no timing assertions)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from v2drop_eval import DropSchedule
from v2drop_eval.bench.report import targets, verdict
from v2drop_eval.bench.run import main, rotated, scaled_schedule
from v2drop_eval.methods import METHODS, get_method

REQUIRED = {"method", "budget", "attn", "batch_size", "prefill_ms", "decode_ms_per_token", "speedup",
            "flops_speedup", "efficiency", "kv_cache_bytes", "llm_prefill_ms", "generate_ms", "peak_memory_bytes",
            "schedule", "avg_vision_tokens", "repeats", "samples", "llm_speedup_ci", "generate_change"}


def test_scaled_schedules():
    assert scaled_schedule("llava", 128, "v2drop", 32) == DropSchedule.preset("llava", 128)
    assert scaled_schedule("qwen2_vl", 192, "fastv", 28) == DropSchedule.preset("qwen2_vl", 192, method="fastv")
    v2 = scaled_schedule("llava", 128, "v2drop", 16)
    assert v2.layers == (2, 8, 11) and [r for _, r in v2.stages] == [0.28, 0.25, 0.0]
    fastv = scaled_schedule("llava", 128, "fastv", 16)
    assert len(fastv.stages) == 1
    assert abs(fastv.average_tokens(576, 16, "fastv") - v2.average_tokens(576, 16)) < 1
    assert fastv == scaled_schedule("llava", 128, "fastv_attn", 16)
    dart = scaled_schedule("llava", 128, "dart", 16)  # DART's count moves in steps of 8: within 4 tokens
    assert dart.layers == fastv.layers and abs(dart.average_tokens(576, 16, "dart") - v2.average_tokens(576, 16)) <= 4
    assert scaled_schedule("llava", 64, "pdrop", 32) == DropSchedule.parse("2:0.32/4:0.32/6:0.32")


def test_rotated_order_shifts_each_repeat():
    assert [rotated("abcd", r) for r in range(5)] == [list("abcd"), list("bcda"), list("cdab"), list("dabc"),
                                                       list("abcd")]


def test_bench_tiny_writes_outputs(tmp_path):
    rc = main(["--shape", "tiny", "--attn", "sdpa", "--batch-sizes", "1,2", "--methods",
               "none,v2drop,random,fastv,fastv_attn", "--budgets", "128", "--repeats", "3", "--warmup", "0",
               "--new-tokens", "2", "--threads", "1", "--output", str(tmp_path)])
    assert rc == 0
    payload = json.loads((tmp_path / "cpu-tiny.json").read_text())
    info = payload["machine"]
    assert info["torch"] and info["transformers"] and info["threads_pinned"] == 1 and info["torch_threads"] == 1
    assert info["OMP_NUM_THREADS"] == "1" and len(info["loadavg"]) == 3 and len(info["loadavg_end"]) == 3
    rows = payload["rows"]
    # plain, none, v2drop, random, fastv, fastv_attn, v2drop at fastv's schedule, v2drop keep1.0 per batch size
    assert len(rows) == 16
    for row in rows:
        assert REQUIRED <= row.keys(), REQUIRED - row.keys()
        assert row["prefill_ms"] > 0 and row["kv_cache_bytes"] > 0 and row["repeats"] == 3
        assert len(row["samples"]["llm_prefill_ms"]) == 3
        lo, hi = row["llm_speedup_ci"]
        assert lo <= row["llm_speedup"] <= hi
        if row["method"] != "plain":  # the dropper's own time, measured inside its hooks
            assert row["dropper_ms"] > 0 and 0 < row["dropper_share"] < 1
            assert row["dropper_share_ci"][0] <= row["dropper_share"] <= row["dropper_share_ci"][1]
    by = {(r["batch_size"], r["method"], r["budget"]): r for r in rows}
    none, v2 = by[(1, "none", "-")], by[(1, "v2drop", "128")]
    assert none["llm_speedup"] == 1.0 and none["flops_speedup"] == 1.0 and none["generate_change"] == 0.0
    assert v2["flops_speedup"] > 1 and v2["kv_cache_bytes"] < none["kv_cache_bytes"]
    assert v2["dropper_score_ms"] > 0 and v2["dropper_gather_ms"] > 0
    assert v2["overhead_vs_random"] is not None and none["over_plain"] is not None
    assert by[(2, "none", "-")]["kv_cache_bytes"] == 2 * none["kv_cache_bytes"]
    assert by[(1, "v2drop", "keep1.0")]["flops_speedup"] == 1.0
    same = by[(1, "v2drop", "128@fastv")]
    for method in ("fastv", "fastv_attn"):
        assert same["schedule"] == by[(1, method, "128")]["schedule"]
        assert by[(1, method, "128")]["over_v2drop"] is not None
    got = {(t["group"], t["target"].split(",")[0], t["rule"]) for t in payload["targets"]}
    for bs in (1, 2):
        assert (f"sdpa, batch {bs}", "dropper share of the LLM prefill", "<=") in got
        assert (f"sdpa, batch {bs}", "prefill efficiency (LLM speed-up / FLOPs speed-up)", ">=") in got
    assert len(payload["targets"]) == 8 and {t["verdict"] for t in payload["targets"]} <= {"met", "missed", "undecided"}
    md = (tmp_path / "cpu-tiny.md").read_text()
    assert "| attn | batch_size | method |" in md and "transformers" in md and "loadavg" in md
    assert md.count("\n| sdpa |") == 16
    assert md.count("\n- sdpa, batch ") >= 8 and "## Cross-checks" in md


def test_bench_other_methods_spend_the_same_budget(tmp_path):
    main(["--shape", "tiny", "--attn", "sdpa", "--batch-sizes", "1", "--methods", ",".join(METHODS), "--budgets",
          "128", "--repeats", "1", "--warmup", "0", "--new-tokens", "1", "--extras", "no", "--output", str(tmp_path)])
    rows = json.loads((tmp_path / "cpu-tiny.json").read_text())["rows"]
    by = {(r["method"], r["budget"]): r for r in rows}
    assert ("plain", "-") not in by and ("v2drop", "keep1.0") not in by
    v2 = by[("v2drop", "128")]
    for method in METHODS:
        if get_method(method).pre_llm:  # VisionZip: the authors' counts, 108 + 20 at every layer
            assert by[(method, "128")]["avg_vision_tokens"] == 128
        elif method != "none":  # layer-averaged vision tokens within 1.5 of v2drop's (DART's count steps by 8: 4)
            within = 4 if method == "dart" else 1.5
            assert abs(by[(method, "128")]["avg_vision_tokens"] - v2["avg_vision_tokens"]) <= within, method


def test_bench_gives_each_method_the_options_it_takes(tmp_path):
    main(["--shape", "tiny", "--attn", "sdpa", "--batch-sizes", "1", "--methods", "none,v2drop,pdrop", "--budgets",
          "128", "--repeats", "1", "--warmup", "0", "--new-tokens", "1", "--extras", "no", "--output", str(tmp_path),
          "--options", "float32_scores+exact_counts"])
    rows = json.loads((tmp_path / "cpu-tiny.json").read_text())["rows"]
    by = {(r["method"], r["budget"]): r for r in rows}
    assert by[("pdrop", "128")]["options"] == "float32_scores+exact_counts"
    assert by[("v2drop", "128")]["options"] == "float32_scores+exact_counts" and by[("none", "-")]["options"] is None
    with pytest.raises(ValueError, match="unknown option 'fast'"):
        main(["--shape", "tiny", "--options", "fast"])
    with pytest.raises(ValueError, match=r"option pivots_in_order applies to dart only; none of the benched methods "
                                         r"\(none, v2drop\) takes it"):
        main(["--shape", "tiny", "--methods", "none,v2drop", "--options", "pivots_in_order"])


def test_verdicts_read_the_interval():
    assert verdict([0.001, 0.004], 0.005, "<=", 10) == "met"
    assert verdict([0.006, 0.009], 0.005, "<=", 10) == "missed"
    assert verdict([0.004, 0.006], 0.005, "<=", 10) == "undecided"  # spans the bound: the data cannot tell
    assert verdict([0.96, 0.99], 0.95, ">=", 10) == "met"
    assert verdict([0.90, 0.94], 0.95, ">=", 10) == "missed"
    assert verdict([0.03, 0.2], 0.0, ">", 10) == "met"
    assert verdict([-0.03, 0.2], 0.0, ">", 10) == "undecided"
    assert verdict([-0.2, -0.03], 0.0, ">", 10) == "missed"
    assert verdict([0.006, 0.009], 0.005, "<=", 2) == "undecided"  # too few repeats
    with pytest.raises(ValueError, match="unknown rule '<'; allowed: <=, >=, >"):
        verdict([0, 1], 0, "<", 10)
    row = {"attn": "sdpa", "batch_size": 1, "device": "cpu", "method": "v2drop", "budget": "128", "repeats": 5,
           "dropper_share": 0.001, "dropper_share_ci": [0.0008, 0.0012], "efficiency": 0.93,
           "efficiency_ci": [0.91, 0.97]}
    (share, eff) = targets([row])
    assert share["verdict"] == "met" and share["bound"] == 0.005
    assert eff["verdict"] == "undecided"


def test_bench_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown shape 'gpt'; allowed: llava-1.5-7b, qwen2-vl-7b, 7b-slice, small"):
        main(["--shape", "gpt"])
    with pytest.raises(ValueError, match="unknown method 'sparse'"):
        main(["--shape", "tiny", "--methods", "none,sparse"])
    with pytest.raises(ValueError, match="--threads 0 is not allowed; give a number >= 1"):
        main(["--shape", "tiny", "--threads", "0"])
    cores = os.cpu_count()
    with pytest.raises(ValueError, match=f"--threads 999 is more than this machine's {cores} CPU core"):
        main(["--shape", "tiny", "--threads", "999"])
    for dtype in ("fp16", "int8"):
        with pytest.raises(ValueError, match=f"--dtype '{dtype}' is not allowed; allowed: float32, float16, bfloat16"):
            main(["--shape", "tiny", "--dtype", dtype])
    with pytest.raises(ValueError, match="--batch-sizes '0': '0' is not allowed; give integers >= 1"):
        main(["--shape", "tiny", "--batch-sizes", "0"])
    with pytest.raises(ValueError, match="--batch-sizes '1,,2': an empty item"):
        main(["--shape", "tiny", "--batch-sizes", "1,,2"])
    with pytest.raises(ValueError, match="--attn 'sdpa,flash': unknown attention 'flash'"):
        main(["--shape", "tiny", "--attn", "sdpa,flash"])
    for flag, value in (("--repeats", "0"), ("--new-tokens", "0"), ("--warmup", "-1"), ("--time-budget", "0")):
        with pytest.raises(ValueError, match=f"{flag} {value} is not allowed"):
            main(["--shape", "tiny", flag, value])


def test_bench_output_checked_before_timing(tmp_path, monkeypatch, capsys):
    """A folder that cannot be written is refused before any model is built (bench and the GPU suite)."""
    import v2drop_eval.bench.run as bench_run
    from v2drop_eval.bench.gpu import main as gpu_main
    from v2drop_eval.cli import main as cli_main

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(bench_run, "build_model", lambda *a, **k: pytest.fail("measured before the check"))
    assert cli_main(["bench", "--shape", "tiny", "--output", str(blocker / "out")]) == 2
    assert f"--output {blocker / 'out'}: cannot write there" in capsys.readouterr().err
    assert gpu_main(["--dry-run", "--output", str(blocker / "out")]) == 2
    assert "cannot write there" in capsys.readouterr().err


def test_bench_write_failure_keeps_the_measurements(tmp_path):
    from v2drop_eval.bench.report import write_outputs

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match="the measurements are saved in (.+\\.json)") as info:
        write_outputs([], {"utc": "x"}, "tiny", "cpu", blocker / "out")
    saved = Path(str(info.value).rsplit(" ", 1)[1])
    assert json.loads(saved.read_text())["shape"] == "tiny"
    saved.unlink()


def test_gpu_suite_dry_run(tmp_path):
    """`make bench-gpu`'s code path on the CPU at tiny shapes: both shapes' files, every method at budget
    128, every figure the GPU run reports, and the paper's Table 5 beside them."""
    from v2drop_eval.bench.gpu import main as gpu_main

    assert gpu_main(["--dry-run", "--output", str(tmp_path)]) == 0
    for shape in ("tiny", "tiny-qwen"):
        payload = json.loads((tmp_path / f"cpu-{shape}.json").read_text())
        assert payload["machine"]["dry_run"] is True
        rows = payload["rows"]
        zip_ = {("visionzip", "128")} if shape == "tiny" else set()
        assert {(r["method"], r["budget"]) for r in rows} == {("none", "-"), ("v2drop", "128@fastv")} | {
            (m, "128") for m in METHODS if m not in ("none", "visionzip")} | zip_ | {
            ("none", "e1:0.5"), ("v2drop", "128+e1:0.5"), ("v2drop", "128@fastv+e1:0.5")}
        encoded = [r for r in rows if r.get("encoder_schedule")]
        full = {r["batch_size"]: r["vision_flops"] for r in rows if (r["method"], r["budget"]) == ("none", "-")}
        assert encoded and all(r["vision_flops"] < full[r["batch_size"]] for r in encoded)
        assert all(r["vision_ms"] > 0 and 0 < r["vision_share"] < 1 for r in rows)
        assert {r["batch_size"] for r in rows} == {1, 2} and {r["attn"] for r in rows} == {"sdpa"}
        for r in rows:
            for key in ("prefill_ms", "llm_prefill_ms", "decode_ms_per_token", "generate_ms", "dropper_share",
                        "kv_cache_bytes", "peak_memory_bytes", "generate_change"):
                assert key in r, key
        # one repeat: every verdict must be undecided, never met or missed
        assert payload["targets"] and {t["verdict"] for t in payload["targets"]} == {"undecided"}
        md = (tmp_path / f"cpu-{shape}.md").read_text()
        assert "## Targets at budget 128" in md and "## The paper's Table 5" in md
    assert payload["paper_table5"] is None
    llava = (tmp_path / "cpu-tiny.md").read_text()
    assert "| LLM generation latency, V2Drop vs vanilla | -30.5% (400 s -> 274 s) |" in llava


def test_gpu_suite_needs_no_lmms_eval():
    code = ("import sys, v2drop_eval.bench.gpu, v2drop_eval.bench.run, v2drop_eval.engine.hooks; "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'lmms_eval']; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
