"""Compare a sweep's accuracy with a reference sweep's, point by point (``v2drop-eval compare``).

``make demo`` ends with this against the committed ``results/demo``: each point's headline score in
both, and whether it is the same (to 1e-9, or ``--tolerance``) or different, or missing from one side;
`v2drop-eval compare` exits 1 unless every score is the same, so the demo's check can fail.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pandas as pd

from v2drop_eval.report.results import load_sweep
from v2drop_eval.report.tables import CI_HI, CI_LO, KEY_COLS, accuracy_table

__all__ = ["compare_sweeps", "format_comparison", "SAME_TOLERANCE"]

SAME_TOLERANCE = 1e-9
VERDICTS = ("same", "different", "missing here", "not in reference")


def _scores(sweep_dir: Path) -> dict[tuple[str, str], float]:
    """``(point id, benchmark label) -> score`` of every point that passes the check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tables command names bad files; here only scores matter
        acc = accuracy_table(load_sweep(sweep_dir, excluded=[]))
    tasks = [c for c in acc.columns if c not in ("point", *KEY_COLS, "Average") and not c.endswith((CI_LO, CI_HI))]
    return {(r["point"], t): float(r[t]) for _, r in acc.iterrows() for t in tasks if not pd.isna(r[t])}


def compare_sweeps(results: str | Path, reference: str | Path, tolerance: float = SAME_TOLERANCE) -> pd.DataFrame:
    """One row per (point, benchmark) in either sweep: ``point, benchmark, reference, this_run, verdict``
    (``same``, ``different``, ``missing here``, ``not in reference``)."""
    new, ref = _scores(Path(results)), _scores(Path(reference))
    rows = []
    for key in sorted(set(new) | set(ref)):
        a, b = ref.get(key, math.nan), new.get(key, math.nan)
        if key not in new:
            verdict = "missing here"
        elif key not in ref:
            verdict = "not in reference"
        else:
            verdict = "same" if abs(a - b) <= tolerance else "different"
        rows.append({"point": key[0], "benchmark": key[1], "reference": a, "this_run": b, "verdict": verdict})
    return pd.DataFrame(rows, columns=["point", "benchmark", "reference", "this_run", "verdict"])


def format_comparison(df: pd.DataFrame, results: str | Path, reference: str | Path) -> str:
    """A short plain-text table and a one-line count of each verdict."""
    lines = [f"accuracy per point: {results} vs the reference {reference}"]
    width = max([len(p) for p in df["point"]] + [5])
    lines.append(f"{'point':<{width}}  {'benchmark':<10} {'reference':>9} {'this run':>9}  verdict")
    for _, r in df.iterrows():
        ref = "-" if pd.isna(r["reference"]) else f"{r['reference']:.2f}"
        new = "-" if pd.isna(r["this_run"]) else f"{r['this_run']:.2f}"
        lines.append(f"{r['point']:<{width}}  {r['benchmark']:<10} {ref:>9} {new:>9}  {r['verdict']}")
    counts = df["verdict"].value_counts()
    lines.append(f"{len(df)} scores: " + (", ".join(f"{counts[v]} {v}" for v in VERDICTS if v in counts)
                                          or "none to compare"))
    return "\n".join(lines)
