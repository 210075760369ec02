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

from v2drop_eval.results import PointResult, adaptive_points, complexity  # noqa: E402

__all__ = ["tradeoff_plot", "vision_tokens_plot", "complexity_plot"]

_METHOD_STYLE = {"none": ("k", "*"), "v2drop": ("tab:red", "o"), "random": ("tab:gray", "s"), "fastv": ("tab:blue", "^"),
                 "pdrop": ("tab:purple", "v"), "dart": ("tab:orange", "P")}


def _grid(n: int) -> tuple[plt.Figure, list[plt.Axes]]:
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), squeeze=False)
    return fig, list(axes[0])


def tradeoff_plot(accuracy: pd.DataFrame, efficiency: pd.DataFrame, path: Path) -> list[Path]:
    """Average accuracy (% of unpruned) vs prefill TFLOPs, one curve per method, one panel per model."""
    if accuracy.empty or efficiency.empty:
        warnings.warn(f"no points to plot; {path.name} not written", stacklevel=2)
        return []
    df = accuracy[["point", "model", "method", "setting", "metric", "seed", "Average"]].merge(
        efficiency[["point", "prefill_tflops"]], on="point", how="left")
    models = list(dict.fromkeys(df["model"]))
    fig, axes = _grid(len(models))
    for ax, model in zip(axes, models, strict=True):
        sub = df[df["model"] == model].assign(kind=lambda d: d["setting"].map(_kind))
        groups = sub.groupby(["method", "metric", "seed", "kind"], sort=False, dropna=False)
        for (method, metric, seed, kind), g in groups:
            g = g.dropna(subset=["prefill_tflops", "Average"]).sort_values("prefill_tflops")
            if g.empty:
                continue
            color, marker = _METHOD_STYLE.get(method, ("tab:green", "D"))
            label = method + (f" ({metric})" if metric else "") + (f" seed {seed}" if seed != "" else "")
            curve = kind == "budget" and len(g) > 1
            ax.plot(g["prefill_tflops"], g["Average"], marker=marker if kind != "schedule" else "x", color=color,
                    linestyle="-" if curve else "none", markersize=9 if method == "none" else 6,
                    label=label + (" schedules" if kind == "schedule" else ""))
            for _, r in g.iterrows():
                if r["setting"] != "full":
                    ax.annotate(str(r["setting"]), (r["prefill_tflops"], r["Average"]), fontsize=7,
                                textcoords="offset points", xytext=(4, 4))
        ax.set_title(str(model))
        ax.set_xlabel("prefill TFLOPs per item (2 x MACs, LLM decoder)")
        ax.set_ylabel("average accuracy, % of unpruned")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def _kind(setting: str) -> str:
    if setting == "full":
        return "full"
    return "budget" if str(setting).isalnum() else "schedule"


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
            if not p.samples.empty or p.meta["method"] != "none":
                warnings.warn(f"{p.point_id}: no vision_per_layer in its side-car; left out of {path.name}",
                              stacklevel=2)
            continue
        m = p.meta
        setting = m.get("schedule") or (f"budget {m['budget']}" if m.get("budget") is not None else "unpruned")
        model = str(m.get("model_name") or p.point_id.split("__")[0])
        labels = curves.setdefault(model, {}).setdefault(tuple(round(v, 3) for v in profile), [])
        labels.append(f"{m['method']} {setting}" if m["method"] != "none" else setting)
    if not curves:
        warnings.warn(f"no vision-token profiles found; {path.name} not written", stacklevel=2)
        return []
    fig, axes = _grid(len(curves))
    for ax, (model, lines) in zip(axes, curves.items(), strict=True):
        ordered = sorted(lines.items(), key=lambda kv: -sum(kv[0]))
        for profile, labels in ordered:
            unique = list(dict.fromkeys(labels))
            label = ", ".join(unique[:3]) + (f" (+{len(unique) - 3})" if len(unique) > 3 else "")
            style = "--" if "unpruned" in unique else "-"
            ax.stairs(profile, range(len(profile) + 1), baseline=None, linestyle=style, label=label, linewidth=1.6)
        ax.set_title(model)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("vision tokens entering the layer (mean over items)")
        ax.set_ylim(bottom=0)
        ax.set_xlim(0, max(len(p) for p in lines))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=1 if len(lines) < 8 else 2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


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
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
