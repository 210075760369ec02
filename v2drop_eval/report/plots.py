"""Plots for a sweep (matplotlib, Agg backend): accuracy/FLOPs trade-off, vision tokens per layer, and
kept tokens against image complexity for adaptive schedules."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from v2drop_eval.engine.method import Method  # noqa: E402
from v2drop_eval.methods import BASELINE, REGISTRY  # noqa: E402
from v2drop_eval.report.results import PointResult, adaptive_points, complexity  # noqa: E402

__all__ = ["tradeoff_plot", "vision_tokens_plot", "complexity_plot"]

def _style(method: str) -> tuple[str, str]:
    """The method's own colour and marker (``Method.style``; a method no longer registered: the default)."""
    return REGISTRY[method].style if method in REGISTRY else Method.style


def _grid(n: int) -> tuple[plt.Figure, list[plt.Axes]]:
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.6), squeeze=False)
    return fig, list(axes[0])


def _legend_below(ax: plt.Axes, n: int) -> None:
    """Outside the data area, so it never covers a point."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2 if n > 3 else 1,
                  frameon=False)


def _save(fig: plt.Figure, path: Path) -> list[Path]:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return [path]


def tradeoff_plot(accuracy: pd.DataFrame, efficiency: pd.DataFrame, path: Path) -> list[Path]:
    """Average accuracy (% of unpruned) against prefill FLOPs (% of unpruned), one panel per model and
    one line per method through its fixed schedules; adaptive schedules as separate markers; the
    unpruned point starred at (100, 100). Without an unpruned point the x-axis is absolute TFLOPs."""
    if accuracy.empty or efficiency.empty:
        warnings.warn(f"no points to plot; {path.name} not written", stacklevel=2)
        return []
    df = accuracy[["point", "model", "method", "setting", "metric", "seed", "options", "Average"]].merge(
        efficiency[["point", "prefill_tflops"]], on="point", how="left")
    df["prefill_tflops"] = pd.to_numeric(df["prefill_tflops"], errors="coerce")
    models = list(dict.fromkeys(df["model"]))
    fig, axes = _grid(len(models))
    for ax, model in zip(axes, models, strict=True):
        sub = df[df["model"] == model].dropna(subset=["prefill_tflops", "Average"])
        ref = sub.loc[sub["method"] == BASELINE, "prefill_tflops"]
        relative = not ref.empty and float(ref.iloc[0]) > 0
        sub = sub.assign(x=sub["prefill_tflops"] / float(ref.iloc[0]) * 100 if relative else sub["prefill_tflops"],
                         kind=sub["setting"].map(_kind))
        n_lines = 0
        for (method, metric, seed, options, kind), g in sub.groupby(["method", "metric", "seed", "options", "kind"],
                                                                     sort=False, dropna=False):
            g = g.sort_values("x")
            color, marker = _style(method)
            label = (method + (f" ({metric})" if metric else "") + (f" seed {seed}" if seed != "" else "")
                     + (f" [{options}]" if options else ""))
            if method == BASELINE:
                ax.plot(g["x"], g["Average"], marker=marker, color=color, linestyle="none", markersize=12,
                        label="unpruned", zorder=5)
                ax.axhline(100.0, color=color, linewidth=0.8, linestyle=":", zorder=1)
            elif kind == "adaptive":
                ax.plot(g["x"], g["Average"], marker=marker, color=color, linestyle="none", markersize=8,
                        markerfacecolor="none", label=label + ", adaptive")
            else:
                ax.plot(g["x"], g["Average"], marker=marker, color=color, linestyle="-", markersize=6, label=label)
            n_lines += 1
        ax.set_title(str(model))
        ax.set_xlabel("prefill FLOPs, % of unpruned (LLM decoder, 2 x MACs)" if relative
                      else "prefill TFLOPs per item (LLM decoder, 2 x MACs)")
        ax.set_ylabel("average accuracy, % of unpruned")
        if relative:
            ax.set_xlim(0, 105)
        ax.grid(alpha=0.3)
        _legend_below(ax, n_lines)
    fig.tight_layout()
    return _save(fig, path)


def _kind(setting: str) -> str:
    """``full`` (unpruned), ``adaptive`` (a ``layer:tT:MIN:MAX`` stage) or ``fixed`` (a budget or ratios)."""
    if setting == "full":
        return "full"
    return "adaptive" if ":t" in str(setting) else "fixed"


def _mean_profile(samples: pd.DataFrame) -> list[float] | None:
    if samples.empty or "vision_per_layer" not in samples.columns:
        return None
    rows = [r for r in samples["vision_per_layer"] if isinstance(r, list) and r]
    if not rows:
        return None
    length = max({len(r) for r in rows}, key=lambda n: sum(len(r) == n for r in rows))
    rows = [r for r in rows if len(r) == length]
    return [sum(float(r[i]) for r in rows) / len(rows) for i in range(length)]


def vision_tokens_plot(points: Sequence[PointResult], path: Path) -> list[Path]:
    """Mean vision tokens entering each decoder layer, one line per distinct method/schedule."""
    # model -> profile -> labels (points with the same profile, e.g. v2drop and random, share a line)
    curves: dict[str, dict[tuple[float, ...], list[str]]] = {}
    for p in points:
        profile = _mean_profile(p.samples)
        if profile is None:
            if not p.samples.empty or p.meta["method"] != BASELINE:
                warnings.warn(f"{p.point_id}: no vision_per_layer in its side-car; left out of {path.name}",
                              stacklevel=2)
            continue
        m = p.meta
        setting = m.get("schedule") or (f"budget {m['budget']}" if m.get("budget") is not None else "unpruned")
        model = str(m.get("model_name") or p.point_id.split("__")[0])
        labels = curves.setdefault(model, {}).setdefault(tuple(round(v, 3) for v in profile), [])
        labels.append(f"{setting} ({m['method']})" if m["method"] != BASELINE else setting)
    if not curves:
        warnings.warn(f"no vision-token profiles found; {path.name} not written", stacklevel=2)
        return []
    fig, axes = _grid(len(curves))
    for ax, (model, lines) in zip(axes, curves.items(), strict=True):
        ordered = sorted(lines.items(), key=lambda kv: -sum(kv[0]))
        for profile, labels in ordered:
            unique = list(dict.fromkeys(labels))
            # Points with one profile share a line: "2:0.25 (fastv, random, v2drop)".
            settings = list(dict.fromkeys(u.split(" (")[0] for u in unique))
            methods = sorted({u.split(" (")[1].rstrip(")") for u in unique if " (" in u})
            label = ", ".join(settings) + (f" ({', '.join(methods)})" if methods else "")
            style = "--" if "unpruned" in unique else "-"
            ax.stairs(profile, range(len(profile) + 1), baseline=None, linestyle=style, label=label, linewidth=1.6)
        ax.set_title(model)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("vision tokens entering the layer (mean over items)")
        ax.set_ylim(bottom=0)
        ax.set_xlim(0, max(len(p) for p in lines))
        ax.grid(alpha=0.3)
        _legend_below(ax, len(lines))
    fig.tight_layout()
    return _save(fig, path)


def complexity_plot(points: Sequence[PointResult], path: Path) -> list[Path]:
    """Layer-averaged kept vision tokens against image complexity, for each adaptive-schedule point.

    Complexity is the task's object count where its documents have one (the demo benchmark), else the
    side-car's ``image_edge_density``. Per object count: mean, and the min-max range as a bar.
    Written only when the sweep has adaptive points (``layer:tTHRESHOLD:MIN:MAX`` stages).
    """
    adaptive = adaptive_points(points)
    if not adaptive:
        return []
    models = list(dict.fromkeys(str(p.meta.get("model_name") or p.point_id.split("__")[0]) for p in adaptive))
    fig, axes = _grid(len(models))
    for ax, model in zip(axes, models, strict=True):
        xlabel = "image edge density"
        for p in adaptive:
            if str(p.meta.get("model_name") or p.point_id.split("__")[0]) != model:
                continue
            measured = complexity(p.samples)
            if measured is None:
                continue
            kind, x = measured
            y = pd.to_numeric(p.samples["avg_vision_tokens"], errors="coerce")
            if kind == "objects":
                xlabel = "objects in the image"
                g = y.groupby(x).agg(["mean", "min", "max"])
                line = ax.plot(g.index, g["mean"], marker="o", label=str(p.meta["schedule"]))[0]
                ax.vlines(g.index, g["min"], g["max"], color=line.get_color(), alpha=0.5)
            else:
                ax.scatter(x, y, s=10, alpha=0.6, label=str(p.meta["schedule"]))
        ax.set_title(model)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("vision tokens kept (layer average, per item)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        _legend_below(ax, len(ax.get_legend_handles_labels()[0]))
    fig.tight_layout()
    return _save(fig, path)
