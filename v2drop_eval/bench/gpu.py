"""`make bench-gpu`: every GPU figure in one call of at most 6 minutes on one H200.

Needs only torch, transformers (the oldest that pyproject.toml admits, 5.0, included) and this
package's source on ``PYTHONPATH``: no lmms-eval, no downloads, nothing to build. Random-weight bf16
models of LLaVA-1.5-7B's and Qwen2-VL-7B's shapes; sdpa (and flash_attention_2 when ``flash_attn``
imports); batch 1 and 8; every registered method at budget 128 and V2Drop at FastV's schedule; 32
new tokens. Writes ``results/bench/cuda-<shape>.json`` and ``.md`` (the Markdown with the paper's
Table 5 beside the measured figures). A time guard shortens the repeats so the whole run stays within
``--time-budget``.

``--dry-run``: the same code path on a CPU at tiny shapes, in seconds (CI runs it).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from v2drop_eval.bench.report import RANDOM, V2DROP, check_writable, write_outputs
from v2drop_eval.bench.run import TimeGuard, machine_info, pin_threads, run_bench
from v2drop_eval.bench.shapes import SHAPES, runs_on
from v2drop_eval.methods import BASELINE, DEFAULT_METHOD, METHODS

__all__ = ["SUITE", "DRY_RUN", "GPU", "PAPER_TABLE5", "flash_available", "run_suite", "main"]

# (shape, the shape the dry run stands in with)
SUITE = {"llava-1.5-7b": "tiny", "qwen2-vl-7b": "tiny-qwen"}
# The dry run keeps every step and shrinks the counts (CI: seconds, not minutes).
DRY_RUN = dict(device="cpu", dtype="float32", new_tokens=2, repeats=1, warmup=0, batch_sizes=(1, 2))
GPU = dict(device="cuda", dtype="bfloat16", new_tokens=32, repeats=8, warmup=1, batch_sizes=(1, 8))
BUDGET = "128"
# V2Drop inside the vision encoder (each shape's own stages; the dry run's stand-ins at theirs), for these.
ENCODER_METHODS = (BASELINE, DEFAULT_METHOD)

# The V2Drop paper's Table 5 (LLaVA-1.5-7B, MMBench, 128 tokens, one A100; docs/bench.md): LLM
# generation latency over the benchmark (the paper states -30.5%; its rounded seconds give -31.5%),
# throughput, peak memory.
PAPER_TABLE5 = {
    "llava-1.5-7b": {
        "llm_generation_latency_change": -0.305,
        "vanilla": {"llm_generation_latency_s": 400, "throughput_items_per_s": 7.13, "peak_memory_mb": 15566},
        V2DROP: {"llm_generation_latency_s": 274, "throughput_items_per_s": 9.01, "peak_memory_mb": 15046},
        RANDOM: {"throughput_items_per_s": 9.08},
    },
}


def flash_available() -> bool:
    """Whether flash_attention_2 can run here (the package imports and transformers accepts it)."""
    try:
        from transformers.utils import is_flash_attn_2_available
    except ImportError:  # pragma: no cover - every 5.x has it
        return False
    return bool(is_flash_attn_2_available())


def _paper_md(shape: str, rows: list[dict]) -> str:
    paper = PAPER_TABLE5.get(shape)
    if paper is None:
        return ("## The paper's Table 5\n\nThe V2Drop paper publishes efficiency figures for LLaVA-1.5-7B only; "
                "none for this shape.")
    van, v2 = paper["vanilla"], paper[V2DROP]
    lat = paper["llm_generation_latency_change"]
    thr = v2["throughput_items_per_s"] / van["throughput_items_per_s"] - 1
    rnd = paper[RANDOM]["throughput_items_per_s"] / van["throughput_items_per_s"] - 1
    mem = v2["peak_memory_mb"] / van["peak_memory_mb"] - 1
    lines = ["## The paper's Table 5 beside this run", "",
             "Paper: LLaVA-1.5-7B, MMBench, 128 tokens, one A100, real images and prompts, the whole benchmark. "
             "Here: random weights, one synthetic prompt (576 vision + 60 text tokens), 32 new tokens, this GPU. "
             "Only the changes against the unpruned model compare.", "",
             "| figure | paper | " + " | ".join(f"this run, {a}, batch {b}" for a, b in _groups(rows)) + " |",
             "| --- | --- | " + " | ".join("---" for _ in _groups(rows)) + " |"]

    def cell(method: str, transform: Any) -> list[str]:
        out = []
        for attn, bs in _groups(rows):
            r = next((x for x in rows if (x["attn"], x["batch_size"], x["method"], x["budget"]) ==
                      (attn, bs, method, BUDGET)), None)
            base = next((x for x in rows if (x["attn"], x["batch_size"], x["method"]) == (attn, bs, BASELINE)), None)
            out.append("-" if r is None or base is None else transform(r, base))
        return out

    def change(key: str, ci_key: str | None = None) -> Any:
        def f(r: dict, base: dict) -> str:
            if ci_key and r.get(key) is not None:
                lo, hi = r[ci_key]
                return f"{r[key]:+.1%} [{lo:+.1%}, {hi:+.1%}]"
            return "-" if not r.get(key) or not base.get(key) else f"{r[key] / base[key] - 1:+.1%}"
        return f

    def throughput(r: dict, base: dict) -> str:
        if r.get("generate_change") is None:
            return "-"
        lo, hi = r["generate_change_ci"]
        return f"{1 / (1 + r['generate_change']) - 1:+.1%} [{1 / (1 + hi) - 1:+.1%}, {1 / (1 + lo) - 1:+.1%}]"

    lines.append(f"| LLM generation latency, V2Drop vs vanilla | {lat:+.1%} ({van['llm_generation_latency_s']} s -> "
                 f"{v2['llm_generation_latency_s']} s) | "
                 + " | ".join(cell(V2DROP, change("generate_change", "generate_change_ci"))) + " |")
    lines.append(f"| throughput, V2Drop vs vanilla | {thr:+.1%} | " + " | ".join(cell(V2DROP, throughput)) + " |")
    lines.append(f"| throughput, random vs vanilla | {rnd:+.1%} | " + " | ".join(cell(RANDOM, throughput)) + " |")
    lines.append(f"| peak memory, V2Drop vs vanilla | {mem:+.1%} | "
                 + " | ".join(cell(V2DROP, change("peak_memory_bytes"))) + " |")
    return "\n".join(lines)


def _groups(rows: list[dict]) -> list[tuple[str, int]]:
    return list(dict.fromkeys((r["attn"], r["batch_size"]) for r in rows))


def run_suite(out_dir: Path, dry_run: bool = False, time_budget_s: float = 330.0,
              log: Any = print) -> list[tuple[Path, Path]]:
    """Run every shape of the suite; returns the (json, md) paths written, one pair per shape."""
    setting = DRY_RUN if dry_run else GPU
    attns = ["sdpa"] + (["flash_attention_2"] if not dry_run and flash_available() else [])
    threads = pin_threads(None) if dry_run else None
    guard = TimeGuard(time_budget_s, len(SUITE) * len(attns) * len(setting["batch_sizes"]))
    written = []
    for shape, stand_in in SUITE.items():
        t0 = time.monotonic()
        info = machine_info(setting["device"])
        run = stand_in if dry_run else shape
        rows = run_bench(run, setting["device"], attns=attns, batch_sizes=setting["batch_sizes"],
                         methods=[m for m in METHODS if runs_on(m, SHAPES[run])], budgets=[BUDGET],
                         repeats=setting["repeats"], warmup=setting["warmup"], new_tokens=setting["new_tokens"],
                         dtype=setting["dtype"], extras=False, guard=guard, log=log,
                         encoder_schedules=[SHAPES[run].encoder_schedule], encoder_methods=ENCODER_METHODS)
        info.update(dry_run=dry_run, stands_in_for=shape if dry_run else None, dtype=setting["dtype"],
                    threads_pinned=threads, wall_s=round(time.monotonic() - t0, 1),
                    stopped_early=list(guard.stopped_early), attn_tried=attns,
                    flash_attention_2="available" if flash_available() else "not importable: not run")
        name = stand_in if dry_run else shape
        written.append(write_outputs(rows, info, name, setting["device"], out_dir, extra_md=_paper_md(shape, rows),
                                     extra_json={"paper_table5": PAPER_TABLE5.get(shape)}))
        log(f"[bench-gpu] wrote {written[-1][0]} and {written[-1][1]}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m v2drop_eval.bench.gpu", description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the same code path on the CPU at tiny shapes")
    p.add_argument("--output", default=None, help="output folder (default results/bench; dry run results/bench-dry-run)")
    p.add_argument("--time-budget", type=float, default=330.0, metavar="S",
                   help="seconds the timing may take in all (default 330: 6 minutes with model set-up)")
    args = p.parse_args(argv)
    if not args.time_budget > 0:
        p.error(f"--time-budget {args.time_budget:g} is not allowed; give a number of seconds > 0")
    out = Path(args.output or ("results/bench-dry-run" if args.dry_run else "results/bench"))
    try:
        check_writable(out)  # before the first timing: device time is scarce
        run_suite(out, dry_run=args.dry_run, time_budget_s=args.time_budget)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
