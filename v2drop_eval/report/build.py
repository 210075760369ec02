"""``v2drop-eval tables``: every table (Markdown, CSV, LaTeX) and plot of a sweep folder, with the points
left out listed and why."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from v2drop_eval.methods import BASELINE
from v2drop_eval.report import breakdown, plots, stats
from v2drop_eval.report.render import write_table
from v2drop_eval.report.results import grid_settings, load_sweep, not_included, sweeps_inside
from v2drop_eval.report.tables import (
    accuracy_table,
    comparison_table,
    complexity_table,
    efficiency_table,
    row_key,
)

__all__ = ["TablesBuilt", "IncompleteSweep", "write_tables", "build_tables", "check_sweep_folder"]


class IncompleteSweep(RuntimeError):
    """Tables asked of a sweep with points missing (never run, failed, damaged, stale) or without
    results at all, without ``allow_missing``; the message lists them."""


def check_sweep_folder(folder: Path) -> None:
    """ValueError for a folder that holds sweeps rather than points (``results/`` for ``results/smoke``)."""
    inside = sweeps_inside(folder)
    if inside:
        raise ValueError(f"{folder} is a folder of sweeps ({', '.join(inside)}), not one sweep; give one of them, "
                         f"e.g. {folder / inside[0]}")

ACCURACY_CAPTION = ("Accuracy: headline metric per benchmark in % (MME: perception + cognition, of 2800); "
                    "[low, high]: 95% bootstrap interval over the items, where lmms-eval logged per-item scores of a "
                    "mean metric; Average: mean over benchmarks of the score relative to the unpruned model, in %.")
EFFICIENCY_CAPTION = ("Efficiency per item (batch timings shared among the batch's items). Prefill TFLOPs: "
                      "2 x MACs of the LLM decoder layers at prefill, every token counted; Paper TFLOPs: "
                      "MACs of the decoder layers counting vision tokens only (the papers' convention); Vision "
                      "TFLOPs: 2 x MACs of the vision encoder and its projector / merger, every block with the "
                      "tokens it ran; Vision encoder (ms): the encoder's forward.")

COMPARISON_CAPTION = ("Paired comparisons at the same model and setting, on the items both methods answered "
                      "(lmms-eval --log_samples): diff = A - B in points with its 95% paired bootstrap interval "
                      f"({stats.RESAMPLES} resamples); p: exact McNemar test (0/1 scores); tie when the interval spans 0.")
COMPLEXITY_CAPTION = ("Adaptive schedules: layer-averaged vision tokens kept per item against image complexity. "
                      "corr: Pearson correlation with the object count (or edge density); kept@N: mean over items "
                      "with N objects.")
BREAKDOWN_CAPTIONS = {
    "subtask": "Accuracy (%) per sub-task, with its 95% bootstrap interval over that sub-task's items.",
    "complexity": ("Accuracy (%) per group of items: object-count bins, background, object scale; each with its "
                   "95% bootstrap interval over the group's items."),
}
ADAPTIVE_CAPTION = ("Adaptive stages against the static point of the same model and method with the closest mean "
                    "kept tokens (layer average per item): accuracy (%), diff = adaptive - static in points with its "
                    "95% paired bootstrap interval, McNemar p; corr: Pearson r of the adaptive point's kept tokens "
                    "with the object count, with its 95% bootstrap interval.")


@dataclass
class TablesBuilt:
    """What :func:`write_tables` wrote, the points it left out ``(id, reason)``, and the models whose
    reference (the unpruned baseline) point is among them or absent (their speed-up and Average are blank)."""

    written: list[Path] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)
    no_reference: list[str] = field(default_factory=list)
    points: int = 0  # points in the tables


def write_tables(sweep_dir: str | Path, output: str | Path | None = None,
                 headline: Mapping[str, str] | None = None, allow_missing: bool = True) -> TablesBuilt:
    """Write accuracy/efficiency tables (md, csv, tex) and plots (png) under ``sweep_dir/tables``.

    A point that failed, is not run yet (the saved config's grid says which), was made with other
    settings than the sweep's config, or whose files do not pass the sweep's check is left out and listed
    under each table with the reason; other bad files are named in a printed warning. Without
    ``allow_missing``, any such point, a model without its reference point, or no point at all raises
    :class:`IncompleteSweep` before anything is written. A folder of sweeps raises ``ValueError``.
    """
    sweep_dir = Path(sweep_dir)
    check_sweep_folder(sweep_dir)
    out = Path(output) if output is not None else sweep_dir / "tables"
    built = TablesBuilt()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grid = grid_settings(sweep_dir)
        points = load_sweep(sweep_dir, built.missing, grid)
        built.missing += not_included(sweep_dir, [p.point_id for p in points] + [m for m, _ in built.missing],
                                      list(grid or ()))
        models = {row_key(p)["model"] for p in points} | {pid.split("__")[0] for pid, _ in built.missing}
        with_reference = {row_key(p)["model"] for p in points if p.meta.get("method") == BASELINE}
        built.no_reference = sorted(models - with_reference)
        built.points = len(points)
        if not allow_missing and (built.missing or built.no_reference or not points):
            raise IncompleteSweep(_incomplete(sweep_dir, points, built))
        out.mkdir(parents=True, exist_ok=True)
        acc = accuracy_table(points, headline)
        eff = efficiency_table(points)
        written = write_table(acc, out, "accuracy", ACCURACY_CAPTION, built.missing)
        written += write_table(eff, out, "efficiency", EFFICIENCY_CAPTION, built.missing)
        cmp = comparison_table(points, headline)
        if not cmp.empty:
            written += write_table(cmp, out, "comparisons", COMPARISON_CAPTION)
        written += plots.tradeoff_plot(acc, eff, out / "tradeoff.png")
        written += plots.vision_tokens_plot(points, out / "vision_tokens.png")
        written += plots.complexity_plot(points, out / "tokens_vs_complexity.png")
        cx = complexity_table(points)
        if not cx.empty:
            written += write_table(cx, out, "complexity", COMPLEXITY_CAPTION)
        written += _write_breakdowns(points, out, headline)
    for w in caught:
        if not issubclass(w.category, (DeprecationWarning, FutureWarning)):
            print(f"warning: {w.message}")
    built.written = written
    return built


def _write_breakdowns(points: list, out: Path, headline: Mapping[str, str] | None) -> list[Path]:
    """Accuracy by sub-task and by complexity (tables and plots) and adaptive vs static stages, where the
    items carry what they need (:mod:`v2drop_eval.report.breakdown`)."""
    written = []
    for by, caption in BREAKDOWN_CAPTIONS.items():
        table = breakdown.breakdown_table(points, by, headline)
        if table.empty:
            continue
        written += write_table(table, out, f"accuracy_by_{by}", caption)
        panels = [(name, table.attrs["groups"][name]) for name in breakdown.BREAKDOWNS[by]]
        written += plots.breakdown_plot(table, panels, breakdown.focus_setting(table), out / f"accuracy_by_{by}.png")
    ada = breakdown.adaptive_static_table(points, headline)
    if not ada.empty:
        written += write_table(ada, out, "adaptive_vs_static", ADAPTIVE_CAPTION)
    return written


def _incomplete(sweep_dir: Path, points: list, built: TablesBuilt) -> str:
    if not points and not built.missing:
        return f"no finished point in {sweep_dir} (nothing to tabulate); pass --allow-missing for empty tables"
    lines = [f"{sweep_dir}: {len(built.missing)} point(s) not included" + (f" of {len(points) + len(built.missing)}"
                                                                            if points else "")]
    lines += [f"  {pid}: {why}" for pid, why in built.missing]
    if built.no_reference:
        lines.append(f"  no reference ({BASELINE}) point for model(s) {', '.join(built.no_reference)}: their "
                     "speed-up and Average would be blank")
    lines.append("finish the sweep (v2drop-eval sweep CONFIG resumes it), or pass --allow-missing for tables "
                 "without them")
    return "\n".join(lines)


def build_tables(sweep_dir: str | Path, output: str | Path | None = None,
                 headline: Mapping[str, str] | None = None) -> list[Path]:
    """:func:`write_tables`, returning only the files written."""
    return write_tables(sweep_dir, output, headline).written
