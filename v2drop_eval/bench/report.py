"""The bench's figures from its paired repeats: rows, targets with verdicts, and the Markdown / JSON files.

Every repeat of a group (one attention kernel, one batch size) ran every configuration once, so a
configuration is compared with its reference *in the same repeat*: the figure is the median of the
per-repeat ratios, with its 95% bootstrap interval (``stats.median_interval``). A target's verdict
reads the interval: ``met`` when all of it is on the right side of the bound, ``missed`` when all of
it is on the wrong side, ``undecided`` when it spans the bound (or fewer than
:data:`MIN_REPEATS` repeats ran). So a verdict never says "missed" when the data cannot tell.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from v2drop_eval.engine import flops
from v2drop_eval.engine.atomic import write_text_atomic
from v2drop_eval.engine.clock import PREFILL_CATEGORIES
from v2drop_eval.engine.schedule import kept_count
from v2drop_eval.methods import BASELINE, options_text
from v2drop_eval.methods.fastv import METHOD as _FASTV
from v2drop_eval.methods.fastv_attn import METHOD as _FASTV_ATTN
from v2drop_eval.methods.random_drop import METHOD as _RANDOM
from v2drop_eval.methods.v2drop import METHOD as _V2DROP
from v2drop_eval.report import stats

__all__ = ["check_writable", "summarize", "targets", "cross_checks", "verdict", "to_markdown", "write_outputs", "MIN_REPEATS",
           "SHARE_BOUND", "EFFICIENCY_BOUND", "TARGET_BUDGET"]

# The methods the targets name (docs/bench.md): V2Drop, its random control, and FastV as published.
V2DROP, RANDOM, FASTV, FASTV_ATTN = _V2DROP.name, _RANDOM.name, _FASTV.name, _FASTV_ATTN.name
PLAIN = "plain"  # the model without any hooks: a configuration of the bench, not a method
KEEP_ALL = "keep1.0"  # the default method's hooks on every stage layer, nothing dropped (the machinery's cost)
MIN_REPEATS = 3  # below this an interval says nothing: every verdict is undecided
TARGET_BUDGET = "128"
SHARE_BOUND = {"cpu": 0.005, "cuda": 0.01}  # the dropper's share of the LLM prefill, v2drop and random
EFFICIENCY_BOUND = 0.95  # measured LLM prefill speed-up / FLOPs speed-up, v2drop
TIMES = ("prefill_ms", "llm_prefill_ms", "decode_ms_per_token", "generate_ms")


def _median_ci(values: Sequence[float], digits: int = 4) -> tuple[float | None, list[float] | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    med, lo, hi = stats.median_interval(np.array(vals))
    return round(med, digits), [round(lo, digits), round(hi, digits)]


def _paired(a: list[dict], b: list[dict], key: str) -> list[float]:
    """Per repeat: ``a``'s figure over ``b``'s (both ran in that repeat)."""
    return [x[key] / y[key] for x, y in zip(a, b, strict=False) if y[key]]


def _dropper_ms(run: dict) -> float | None:
    d = run.get("dropper")
    return None if d is None else sum(d.get(c, 0.0) for c in PREFILL_CATEGORIES)


def _after_encoder(tokens: int, encoder: Any) -> int:
    """Vision tokens an image keeps through encoder stages (``engine/encoder.py``: floor, at least one)."""
    for _, ratio in (encoder.stages if encoder is not None else ()):
        tokens = max(min(1, tokens), kept_count(tokens, ratio))
    return tokens


def summarize(shape: str, device: str, attn: str, batch_size: int, group: list[tuple], text_cfg: Any, layers: int,
              vision_tokens: int, text_tokens: int, scale: tuple[float, float] = (1.0, 1.0)) -> list[dict]:
    """The rows of one group: ``group`` holds (method, budget, schedule, per-repeat results, options[, encoder
    stages of the whole model, encoder stages run]) per configuration. ``scale``: (decoder, encoder) layers of
    the whole model over those of a slice; with either above 1 each row also has ``ttft_full_ms``, the time to
    first token extrapolated to the whole model, and the vision encoder's share of it (``vision_share``)."""
    rows, runs_of = [], {}
    for method, budget, schedule, runs, options, *encoder in group:
        if not runs:
            continue
        encoder_label, encoder_run = encoder if encoder else ("", None)
        drops = method not in (PLAIN, BASELINE)
        # The method's own counting (its authors' formula; SparseVLM's recycled tokens count as vision tokens),
        # of the tokens that reach the decoder.
        reaching = _after_encoder(vision_tokens, encoder_run)
        vision = schedule.tokens_per_layer(reaching, layers, method, options) if drops else [reaching] * layers
        if runs[0].get("vision_per_layer") is not None:  # the engine's own count must agree with the arithmetic
            assert runs[0]["vision_per_layer"] == vision, (method, budget, runs[0]["vision_per_layer"], vision)
        row: dict[str, Any] = {
            "shape": shape, "device": device, "attn": attn, "batch_size": batch_size, "method": method,
            "budget": budget, "schedule": str(schedule), "options": options_text(options) or None,
            "avg_vision_tokens": round(sum(vision) / len(vision), 2),
            "repeats": len(runs), **{k: round(statistics.median(r[k] for r in runs), 3) for k in TIMES},
            "prefill_flops": flops.prefill_flops(text_cfg, [text_tokens + v for v in vision]) * batch_size,
            "kv_cache_bytes": runs[0]["kv_cache_bytes"],
            "peak_memory_bytes": max((r["peak_memory_bytes"] or 0) for r in runs) or None,
            "llm_prefill_spread": round(_iqr([r["llm_prefill_ms"] for r in runs]) / statistics.median(
                r["llm_prefill_ms"] for r in runs), 4),
        }
        if runs[0].get("dropper") is not None:
            for cat in (*PREFILL_CATEGORIES, "decode"):
                row[f"dropper_{cat}_ms"] = round(statistics.median(r["dropper"].get(cat, 0.0) for r in runs), 4)
            row["dropper_ms"] = round(statistics.median(_dropper_ms(r) for r in runs), 4)
            row["dropper_share"], row["dropper_share_ci"] = _median_ci(
                [_dropper_ms(r) / r["llm_prefill_ms"] for r in runs], 6)
        if encoder_label:
            row["encoder_schedule"] = encoder_label
        if runs[0].get("vision_ms") is not None:
            row["vision_ms"] = round(statistics.median(r["vision_ms"] for r in runs), 3)
            row["vision_flops"] = runs[0]["vision_flops"]
            llm_scale, vision_scale = scale
            if llm_scale != 1.0 or vision_scale != 1.0:
                # the blocks of a kind have one shape: their time scales with their count (the rest stays)
                full = [r["prefill_ms"] + (vision_scale - 1) * r["vision_ms"] + (llm_scale - 1) * r["llm_prefill_ms"]
                        for r in runs]
                for r, f in zip(runs, full, strict=True):
                    r["ttft_full_ms"] = f
                row["ttft_full_ms"] = round(statistics.median(full), 1)
                row["vision_share"], row["vision_share_ci"] = _median_ci(
                    [vision_scale * r["vision_ms"] / f for r, f in zip(runs, full, strict=True)], 4)
            else:
                row["vision_share"], row["vision_share_ci"] = _median_ci(
                    [r["vision_ms"] / r["prefill_ms"] for r in runs], 4)
        row["samples"] = {k: [round(r[k], 4) for r in runs] for k in TIMES}
        row["samples"]["dropper_ms"] = [None if _dropper_ms(r) is None else round(_dropper_ms(r), 4) for r in runs]
        rows.append(row)
        runs_of[(method, budget)] = runs
    _compare(rows, runs_of)
    return rows


def _compare(rows: list[dict], runs_of: dict) -> None:
    """Paired comparisons of each row with its references in the same repeats."""
    none = runs_of.get((BASELINE, "-"))
    plain = runs_of.get((PLAIN, "-"))
    base_flops = next((r["prefill_flops"] for r in rows if r["method"] == BASELINE), None)
    for row in rows:
        runs = runs_of[(row["method"], row["budget"])]
        key = (row["method"], row["budget"])
        if none is not None and runs[0].get("ttft_full_ms") is not None:
            row["ttft_full_speedup"], row["ttft_full_speedup_ci"] = _median_ci(_paired(none, runs, "ttft_full_ms"), 3)
        if none is not None and base_flops:
            row["speedup"], row["speedup_ci"] = _median_ci(_paired(none, runs, "prefill_ms"), 3)
            row["llm_speedup"], row["llm_speedup_ci"] = _median_ci(_paired(none, runs, "llm_prefill_ms"), 3)
            change, ci = _median_ci(_paired(runs, none, "generate_ms"))
            row["generate_change"] = None if change is None else round(change - 1, 4)
            row["generate_change_ci"] = None if ci is None else [round(c - 1, 4) for c in ci]
            row["flops_speedup"] = round(base_flops / row["prefill_flops"], 3)
            if row["llm_speedup"] is not None:
                row["efficiency"] = round(row["llm_speedup"] / row["flops_speedup"], 3)
                row["efficiency_ci"] = [round(c / row["flops_speedup"], 3) for c in row["llm_speedup_ci"]]
        # cross-checks: differences of totals (the direct measurement is dropper_share)
        ref = None
        if row["method"] == V2DROP and (RANDOM, row["budget"]) in runs_of:
            ref, name = runs_of[(RANDOM, row["budget"])], "overhead_vs_random"
        elif row["method"] in (FASTV, FASTV_ATTN) and (V2DROP, f"{row['budget']}@{FASTV}") in runs_of:
            ref, name = runs_of[(V2DROP, f"{row['budget']}@{FASTV}")], "over_v2drop"
        elif plain is not None and key in ((BASELINE, "-"), (V2DROP, KEEP_ALL)):
            ref, name = plain, "over_plain"
        if ref is not None:
            value, ci = _median_ci(_paired(runs, ref, "llm_prefill_ms"))
            row[name] = None if value is None else round(value - 1, 4)
            row[f"{name}_ci"] = None if ci is None else [round(c - 1, 4) for c in ci]
            if name == "over_v2drop":
                g, gci = _median_ci(_paired(runs, ref, "generate_ms"))
                row["generate_over_v2drop"] = None if g is None else round(g - 1, 4)
                row["generate_over_v2drop_ci"] = None if gci is None else [round(c - 1, 4) for c in gci]


def _iqr(values: list[float]) -> float:
    v = sorted(values)
    if len(v) < 2:
        return 0.0
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[2] - q[0]


def verdict(ci: Sequence[float] | None, bound: float, rule: str, repeats: int) -> str:
    """``met`` / ``missed`` / ``undecided`` for the value whose 95% interval is ``ci`` against ``bound``
    (``rule``: ``<=``, ``>=`` or ``>``); undecided when the interval spans the bound or is too thin."""
    if ci is None or repeats < MIN_REPEATS or any(not math.isfinite(c) for c in ci):
        return "undecided"
    lo, hi = ci
    if rule == "<=":
        return "met" if hi <= bound else ("missed" if lo > bound else "undecided")
    if rule == ">=":
        return "met" if lo >= bound else ("missed" if hi < bound else "undecided")
    if rule == ">":
        return "met" if lo > bound else ("missed" if hi < bound else "undecided")
    raise ValueError(f"unknown rule {rule!r}; allowed: <=, >=, >")


def targets(rows: list[dict]) -> list[dict]:
    """The speed targets at budget 128, one entry per (target, group) with value, interval and verdict."""
    out = []
    for r in rows:
        group = f"{r['attn']}, batch {r['batch_size']}"
        if r["budget"] != TARGET_BUDGET:
            continue
        if r["method"] in (V2DROP, RANDOM) and r.get("dropper_share") is not None:
            bound = SHARE_BOUND.get(r["device"], SHARE_BOUND["cpu"])
            out.append(dict(target=f"dropper share of the LLM prefill, {r['method']}", group=group, rule="<=",
                            bound=bound, value=r["dropper_share"], ci=r["dropper_share_ci"], percent=True,
                            verdict=verdict(r["dropper_share_ci"], bound, "<=", r["repeats"])))
        if r["method"] == V2DROP and r.get("efficiency") is not None:
            out.append(dict(target="prefill efficiency (LLM speed-up / FLOPs speed-up), v2drop", group=group,
                            rule=">=", bound=EFFICIENCY_BOUND, value=r["efficiency"], ci=r["efficiency_ci"],
                            percent=False, verdict=verdict(r["efficiency_ci"], EFFICIENCY_BOUND, ">=", r["repeats"])))
        if r["method"] == FASTV_ATTN and r["attn"] != "eager" and r.get("over_v2drop") is not None:
            out.append(dict(target=f"V2Drop ({r['attn']}) faster than fastv_attn at FastV's schedule: fastv_attn's "
                                   "LLM prefill over V2Drop's", group=group, rule=">", bound=0.0,
                            value=r["over_v2drop"], ci=r["over_v2drop_ci"], percent=True, signed=True,
                            verdict=verdict(r["over_v2drop_ci"], 0.0, ">", r["repeats"])))
    return out


def cross_checks(rows: list[dict]) -> list[str]:
    """Differences of two totals, paired (no verdict: the direct measurement is the dropper share)."""
    out = []
    for r in rows:
        for name, what in (("overhead_vs_random", "v2drop's LLM prefill over random's"),
                           ("over_plain", "LLM prefill over the model without hooks (plain)"),
                           ("over_v2drop", "LLM prefill over V2Drop's at the same schedule"),
                           ("generate_over_v2drop", "generation latency over V2Drop's at the same schedule")):
            if r.get(name) is not None and not (name == "over_v2drop" and r["method"] == FASTV_ATTN):  # a target
                out.append(f"- {r['attn']}, batch {r['batch_size']}: {r['method']} {r['budget']}: {what} "
                           f"{_fmt(r[name], r[name + '_ci'], True, True)}")
    return out


def _fmt(value: float | None, ci: Sequence[float] | None, percent: bool, signed: bool = False) -> str:
    if value is None:
        return "-"
    f = (lambda v: f"{v:+.2%}" if signed else f"{v:.3%}") if percent else (lambda v: f"{v:.3f}")
    return f(value) + (f" [{f(ci[0])}, {f(ci[1])}]" if ci else "")


COLUMNS = ["attn", "batch_size", "method", "budget", "schedule", "avg_vision_tokens", "repeats", "prefill_ms",
           "llm_prefill_ms", "vision_ms", "decode_ms_per_token", "generate_ms", "dropper_ms", "dropper_share",
           "speedup", "llm_speedup", "flops_speedup", "efficiency", "generate_change", "over_v2drop", "vision_tflops",
           "vision_share", "ttft_full_ms", "ttft_full_speedup", "kv_cache_bytes", "peak_memory_bytes"]
_WITH_CI = {"dropper_share": (True, False), "llm_speedup": (False, False), "efficiency": (False, False),
            "generate_change": (True, True), "over_v2drop": (True, True), "speedup": (False, False),
            "vision_share": (True, False), "ttft_full_speedup": (False, False)}


def _cell(row: dict, col: str) -> str:
    if col == "vision_tflops":
        return "-" if row.get("vision_flops") is None else f"{row['vision_flops'] / 1e12:.4g}"
    v = row.get(col)
    if col in _WITH_CI:
        return _fmt(v, row.get(col + "_ci"), *_WITH_CI[col])
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def to_markdown(rows: list[dict], info: dict, shape: str, device: str, extra: str = "") -> str:
    lines = [f"# Bench: {shape} on {device}", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
             "Paired, interleaved repeats (every configuration once per repeat, the order rotated each repeat). "
             "Times: medians over the repeats. Figures with [low, high]: the median of per-repeat ratios with its "
             "95% bootstrap interval. `prefill_ms`: time to first token (`generate` entry to the end of its first "
             "forward, the vision encoder included); `llm_prefill_ms`: the LLM decoder's "
             "prefill alone; `dropper_ms`: the dropper's own work at the prefill, timed inside its hooks "
             "(scoring with its signal taps, top-k, gathers, masks, rotary and cache bookkeeping); "
             "`dropper_share` = dropper_ms / llm_prefill_ms per repeat; `llm_speedup`: `none` over the row, "
             "paired; `flops_speedup`: analytic (" + flops.CONVENTION + "); `efficiency` = llm_speedup / "
             "flops_speedup; `generate_change`: generation latency against `none`; `over_v2drop`: the row's LLM "
             "prefill over V2Drop's at FastV's schedule (budget `B@fastv`). `vision_ms`: the vision encoder's "
             "forward; `vision_tflops`: its FLOPs (" + flops.VISION_CONVENTION + "); budget `B+eS`: with "
             "V2Drop's stages S inside the vision encoder; `speedup`: `none`'s time to first token over the "
             "row's, paired; on a slice shape `ttft_full_ms` extrapolates the time to first token to the whole "
             "model (block time x block count) and `vision_share` is the encoder's share of it (else of "
             "`prefill_ms`).", "",
             "| " + " | ".join(COLUMNS) + " |", "| " + " | ".join("---" for _ in COLUMNS) + " |"]
    lines += ["| " + " | ".join(_cell(r, c) for c in COLUMNS) + " |" for r in rows]
    lines += ["", "## Targets at budget 128 (verdict from the 95% interval: met / missed / undecided)", ""]
    lines += [f"- {t['group']}: {t['target']} {_fmt(t['value'], t['ci'], t['percent'], t.get('signed', False))} "
              f"({t['rule']} {_fmt(t['bound'], None, t['percent'], t.get('signed', False))}: **{t['verdict']}**)"
              for t in targets(rows)] or ["- none of the target configurations was run"]
    checks = cross_checks(rows)
    if checks:
        lines += ["", "## Cross-checks (paired differences of totals; no verdict)", "", *checks]
    if extra:
        lines += ["", extra.rstrip()]
    return "\n".join(lines) + "\n"


def check_writable(out_dir: Path, option: str = "--output") -> None:
    """Create ``out_dir`` and write a probe file in it: a measurement never starts into a folder it
    cannot save to. ``ValueError`` naming the folder and ``option``."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-check-", delete=True)
        probe.close()
    except OSError as exc:
        raise ValueError(f"{option} {out_dir}: cannot write there ({exc.strerror or exc}); nothing was "
                         "measured, give a writable folder") from None


def write_outputs(rows: list[dict], info: dict, shape: str, device: str, out_dir: Path, extra_md: str = "",
                  extra_json: dict | None = None) -> tuple[Path, Path]:
    """``<out>/<device>-<shape>.json`` (machine, rows, targets) and the Markdown beside it, atomically.
    If the folder cannot be written (it was checked before timing; it may have gone since), the JSON is
    saved to a fallback file in the temporary folder and ``OSError`` names it: no measurement is lost."""
    stem = f"{device}-{shape}"
    payload = {"machine": info, "shape": shape, "device": device, "rows": rows, "targets": targets(rows),
               **(extra_json or {})}
    text = json.dumps(payload, indent=1)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path = write_text_atomic(out_dir / f"{stem}.json", text)
        md_path = write_text_atomic(out_dir / f"{stem}.md", to_markdown(rows, info, shape, device, extra_md))
    except OSError as exc:
        fd, fallback = tempfile.mkstemp(prefix=f"v2drop-bench-{stem}-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        raise OSError(f"cannot write the bench results to {out_dir} ({exc.strerror or exc}); the measurements "
                      f"are saved in {fallback}") from None
    return json_path, md_path
