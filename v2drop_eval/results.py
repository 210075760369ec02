"""Read a sweep directory: every point's lmms-eval results JSON, side-car JSONL and ``point.json``.

Never raises on bad files: a missing, unreadable or corrupt file is named in a warning and skipped.
A point folder without ``point.json`` (e.g. a plain ``lmms_eval --output_path``) is described from its
results' ``config.model_args`` and its side-car rows instead.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["PointResult", "load_sweep", "parse_model_args", "adaptive_points", "complexity", "SIDECAR_GLOB"]

SIDECAR_GLOB = "*v2drop*.jsonl"
_SKIP_DIRS = ("_failed", "tables")
_META_KEYS = ("model_name", "family", "method", "budget", "schedule", "metric", "seed")


@dataclass
class PointResult:
    """One evaluated point: what it was, its per-task metrics and its per-sample measurements."""

    point_id: str
    path: Path
    meta: dict[str, Any]
    results: dict[str, dict[str, Any]]  # task -> {"exact_match,none": 0.61, ...}
    throughput: dict[str, Any] = field(default_factory=dict)
    samples: pd.DataFrame = field(default_factory=pd.DataFrame)
    results_files: list[Path] = field(default_factory=list)


def adaptive_points(points: Sequence[PointResult]) -> list[PointResult]:
    """The points with an adaptive stage (``layer:tTHRESHOLD:MIN:MAX``) and per-item kept counts."""
    return [p for p in points if ":t" in str(p.meta.get("schedule") or "") and not p.samples.empty
            and "avg_vision_tokens" in p.samples.columns]


def complexity(samples: pd.DataFrame) -> tuple[str, pd.Series] | None:
    """Each item's image complexity: the task's object count where its documents have one (the demo
    benchmark), else the side-car's ``image_edge_density``; ``(kind, values)``, or None."""
    if "n_objects" in samples.columns:
        objects = pd.to_numeric(samples["n_objects"], errors="coerce")
        if objects.notna().any():
            return "objects", objects
    if "image_edge_density" in samples.columns:
        return "edge density", pd.to_numeric(samples["image_edge_density"], errors="coerce")
    return None


def parse_model_args(text: str) -> dict[str, str]:
    """``"pretrained=x,budget=128"`` -> ``{"pretrained": "x", "budget": "128"}``."""
    out = {}
    for part in str(text or "").split(","):
        key, sep, value = part.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _warn(msg: str) -> None:
    warnings.warn(msg, stacklevel=3)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        _warn(f"skipping {path}: not readable JSON ({exc})")
        return None
    if not isinstance(data, dict):
        _warn(f"skipping {path}: not a JSON object")
        return None
    return data


def _read_sidecar(path: Path) -> pd.DataFrame:
    rows, bad = [], 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        _warn(f"skipping {path}: {exc}")
        return pd.DataFrame()
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        _warn(f"{path}: skipped {bad} corrupt line(s)")
    return pd.DataFrame(rows)


def _normalise_meta(meta: dict[str, Any]) -> dict[str, Any]:
    out = {k: meta.get(k) for k in _META_KEYS}
    for key in ("budget", "seed"):
        value = out[key]
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            out[key] = int(value)
        elif isinstance(value, float) and value.is_integer():
            out[key] = int(value)
    for key in ("schedule", "metric", "method", "family"):
        if out[key] is not None and not isinstance(out[key], str):
            out[key] = str(out[key])
        if isinstance(out[key], str) and out[key].strip() in ("", "None", "null"):
            out[key] = None
    out["method"] = out["method"] or "none"
    if out["method"] != "v2drop":
        out["metric"] = None
    if out["method"] != "random":
        out["seed"] = None
    return out


def _meta_from_run(point_id: str, config: dict[str, Any], samples: pd.DataFrame) -> dict[str, Any]:
    args = parse_model_args(config.get("model_args", ""))
    meta: dict[str, Any] = {k: args.get(k) for k in _META_KEYS}
    if not samples.empty:
        first = samples.iloc[0].to_dict()
        for key in ("family", "method", "budget", "schedule", "metric", "seed"):
            if meta.get(key) is None and first.get(key) is not None and not pd.isna(first.get(key)):
                meta[key] = first[key]
    pretrained = args.get("pretrained") or config.get("model") or point_id
    meta["model_name"] = point_id.split("__")[0] if "__" in point_id else Path(str(pretrained)).name
    return meta


def _load_point(point_dir: Path, files: list[Path]) -> PointResult | None:
    results: dict[str, dict[str, Any]] = {}
    throughput: dict[str, Any] = {}
    config: dict[str, Any] = {}
    good: list[Path] = []
    for path in sorted(files):  # timestamped names: later runs override earlier ones
        data = _read_json(path)
        if data is None:
            continue
        res = data.get("results")
        if not isinstance(res, dict):
            _warn(f"skipping {path}: no 'results' mapping")
            continue
        results.update({t: m for t, m in res.items() if isinstance(m, dict)})
        throughput.update(data.get("throughput") or {})
        config = data.get("config") or config
        good.append(path)
    if not good:
        return None
    frames = [f for f in (_read_sidecar(p) for p in sorted(point_dir.rglob(SIDECAR_GLOB))) if not f.empty]
    samples = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    meta_path = point_dir / "point.json"
    meta = _read_json(meta_path) if meta_path.is_file() else None
    if meta is None:
        meta = _meta_from_run(point_dir.name, config, samples)
    return PointResult(point_dir.name, point_dir, _normalise_meta(meta), results, throughput, samples, good)


def load_sweep(sweep_dir: str | Path) -> list[PointResult]:
    """Every point under ``sweep_dir`` that has a readable results JSON, in folder-name order."""
    sweep_dir = Path(sweep_dir)
    groups: dict[Path, list[Path]] = {}
    for path in sweep_dir.rglob("*_results.json"):
        rel = path.relative_to(sweep_dir)
        top = rel.parts[0]
        if len(rel.parts) < 2 or top.startswith(".") or top in _SKIP_DIRS:
            continue
        groups.setdefault(sweep_dir / top, []).append(path)
    points = []
    for point_dir in sorted(groups):
        point = _load_point(point_dir, groups[point_dir])
        if point is not None:
            points.append(point)
    if not points:
        _warn(f"no readable *_results.json under {sweep_dir}")
    return points
