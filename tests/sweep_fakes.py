"""Fakes for sweep and table tests: lmms-eval-shaped result files, and a stand-in ``lmms_eval`` module."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

# Headline scores in lmms-eval's own units (fractions, except MME and MMBench's gpt_eval_score).
LLAVA_SCORES = {
    "none": {"gqa": 0.619, "scienceqa_img": 0.695, "textvqa_val": 0.582, "pope": 0.859,
             "mme": (1510.7, 351.3), "mmbench_en_dev": 64.6},
    "v2drop": {"gqa": 0.585, "scienceqa_img": 0.693, "textvqa_val": 0.556, "pope": 0.851,
               "mme": (1480.0, 346.0), "mmbench_en_dev": 63.7},
    "fastv": {"gqa": 0.52, "scienceqa_img": 0.67, "textvqa_val": 0.51, "pope": 0.64,
              "mme": (1300.0, 300.0), "mmbench_en_dev": 61.0},
}


def task_metrics(task: str, score: Any) -> dict[str, Any]:
    """One task's entry in ``results`` as lmms-eval 0.7.3 writes it."""
    if task == "mme":
        per, cog = score
        return {"alias": "mme", "mme_perception_score,none": per, "mme_perception_score_stderr,none": "N/A",
                "mme_cognition_score,none": cog, "mme_cognition_score_stderr,none": "N/A"}
    if task == "pope":
        return {"alias": "pope", "pope_accuracy,none": score + 0.01, "pope_accuracy_stderr,none": "N/A",
                "pope_precision,none": 0.9, "pope_recall,none": 0.8, "pope_f1_score,none": score,
                "pope_f1_score_stderr,none": "N/A"}
    if task.startswith("mmbench"):
        return {"alias": task, "gpt_eval_score,none": score, "gpt_eval_score_stderr,none": "N/A",
                "submission,none": None}
    return {"alias": task, "exact_match,none": score, "exact_match_stderr,none": 0.01}


def results_json(tasks_scores: dict[str, Any], model_args: str = "", model: str = "v2drop_llava") -> dict[str, Any]:
    return {
        "results": {t: task_metrics(t, s) for t, s in tasks_scores.items()},
        "group_subtasks": {t: [] for t in tasks_scores},
        "configs": {},
        "versions": {t: 0.0 for t in tasks_scores},
        "n-samples": {t: {"original": 10, "effective": 10} for t in tasks_scores},
        "config": {"model": model, "model_args": model_args, "batch_size": "1", "limit": 10},
        "throughput": {"avg_prefill_ms": 10.0},
        "date": "20250101_000000",
    }


def sidecar_rows(tasks: list[str], meta: dict[str, Any], n: int = 4, vision: int = 576, layers: int = 32,
                 per_layer: list[int] | None = None, prefill_ms: float = 100.0, batch_size: int = 1,
                 flops_per_token: float = 2.6e10, text_tokens: int = 60) -> list[dict[str, Any]]:
    per_layer = per_layer or [vision] * layers
    avg = sum(per_layer) / len(per_layer)
    rows = []
    for task in tasks:
        for i in range(n):
            rows.append({
                "task": task, "doc_id": i, "model": "llava-hf/llava-1.5-7b-hf", "family": "llava",
                "method": meta.get("method"), "schedule": meta.get("schedule"), "budget": meta.get("budget"),
                "metric": meta.get("metric"), "seed": meta.get("seed"), "attn_implementation": "sdpa",
                "batch_size": batch_size, "prefill_ms": prefill_ms * batch_size, "decode_ms": 40.0 * batch_size,
                "generated_tokens": 4, "total_ms": (prefill_ms + 40.0) * batch_size, "vision_tokens": vision,
                "vision_per_layer": per_layer, "avg_vision_tokens": avg,
                "tokens_per_layer": [v + text_tokens for v in per_layer],
                "prefill_flops": flops_per_token * (avg + text_tokens), "prefill_flops_convention": "2xMACs",
                "paper_macs": 3.82e12 * avg / 576, "kv_cache_bytes": int(2**20 * (avg + text_tokens) / 10),
                "peak_memory_bytes": None, "device": "cpu", "versions": {"torch": "2.14.1"},
            })
    return rows


def write_point(sweep_dir: Path, point_id: str, meta: dict[str, Any], scores: dict[str, Any],
                rows: list[dict[str, Any]] | None = None, with_point_json: bool = True,
                model_dir: str = "v2drop_llava") -> Path:
    """A finished point folder as the sweep leaves it (results JSON, side-car, point.json)."""
    point = sweep_dir / point_id
    run = point / model_dir
    run.mkdir(parents=True, exist_ok=True)
    margs = ",".join(f"{k}={v}" for k, v in meta.items() if k in ("pretrained", "method", "budget", "schedule",
                                                                  "metric", "seed") and v is not None)
    res = run / "20250101_000000_results.json"
    data = results_json(scores, margs)
    if rows is not None:  # lmms-eval's item counts match the side-car's records
        data["n-samples"] = {t: {"original": n, "effective": n} for t in scores
                             if (n := sum(r.get("task") == t for r in rows))}
    res.write_text(json.dumps(data, indent=2))
    if rows is not None:
        (run / "20250101_000000_v2drop_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if with_point_json:
        (point / "point.json").write_text(json.dumps({
            "id": point_id, "status": "ok", "results_files": [str(res.relative_to(point))], **meta}))
    return point


# A stand-in for ``python -m lmms_eval``: put its folder first on PYTHONPATH. It writes a results JSON
# for every task (2 items each) and the plugin's side-car under --output_path/<model>/, appends the
# point to $FAKE_LMMS_LOG, and obeys
# FAKE_LMMS_SLEEP (seconds, for points whose model args contain $FAKE_LMMS_SLOW) and
# FAKE_LMMS_FAIL (a substring of model args that makes the run fail like lmms-eval does: exit 0,
# no results file).
FAKE_MAIN = textwrap.dedent('''
    import argparse, json, os, sys, time
    from pathlib import Path

    p = argparse.ArgumentParser()
    for a in ("--model", "--model_args", "--tasks", "--batch_size", "--output_path", "--limit",
              "--include_path", "--verbosity"):
        p.add_argument(a)
    args, _ = p.parse_known_args()
    with open(os.environ["FAKE_LMMS_LOG"], "a") as f:
        f.write(args.model_args + "\\n")
    out = Path(args.output_path) / args.model
    out.mkdir(parents=True, exist_ok=True)
    (out / "partial.txt").write_text("started")
    slow = os.environ.get("FAKE_LMMS_SLOW")
    if slow and slow in args.model_args:
        time.sleep(float(os.environ.get("FAKE_LMMS_SLEEP", "60")))
    fail = os.environ.get("FAKE_LMMS_FAIL")
    if fail and fail in args.model_args:
        print("\\x1b[31mTraceback: boom\\x1b[0m", file=sys.stderr)
        sys.exit(0)
    tasks = args.tasks.split(",")
    results = {t: {"alias": t, "exact_match,none": 0.5} for t in tasks}
    (out / "20250101_000000_results.json").write_text(json.dumps(
        {"results": results, "n-samples": {t: {"original": 2, "effective": 2} for t in tasks},
         "config": {"model_args": args.model_args}}))
    (out / "20250101_000000_v2drop_samples.jsonl").write_text(
        "".join(json.dumps({"task": t, "doc_id": i}) + "\\n" for t in tasks for i in range(2)))
    print("\\x1b[32mdone\\x1b[0m")
''')


def install_fake_lmms_eval(root: Path) -> Path:
    """Write the fake ``lmms_eval`` package under ``root`` and return the folder to put on PYTHONPATH."""
    pkg = root / "fake_lmms" / "lmms_eval"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(FAKE_MAIN)
    return pkg.parent
