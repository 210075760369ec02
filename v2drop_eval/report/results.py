"""Read a sweep directory: every point's lmms-eval results JSON, side-car JSONL and ``point.json``.

Never raises on bad files. A point whose files fail :func:`v2drop_eval.sweep.pointcheck.check_point_files`
(the runner's own test of "done") is left out and listed with the reason, as are failed points and
points not run yet (:func:`not_included`).
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

from v2drop_eval.methods import BASELINE, REGISTRY
from v2drop_eval.plugin.sidecar import SIDECAR_GLOB, is_sidecar, read_sidecar
from v2drop_eval.sweep.config import expand
from v2drop_eval.sweep.layout import CONFIG_FILE, ERROR_FILE, FAILED_DIR, POINT_FILE, STATUS_FILE
from v2drop_eval.sweep.pointcheck import check_point_files, point_settings, settings_problem, writes_sidecar
from v2drop_eval.sweep.status import saved_config

__all__ = ["PointResult", "load_sweep", "not_included", "parse_model_args", "adaptive_points", "complexity",
           "SIDECAR_GLOB", "sweeps_inside", "grid_settings"]

_SKIP_DIRS = (FAILED_DIR, "tables")
_META_KEYS = ("model_name", "family", "method", "budget", "schedule", "metric", "seed", "options", "positions", "encoder_schedule")


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
    items: dict[str, pd.DataFrame] = field(default_factory=dict)  # task -> lmms-eval's per-item log, by doc_id


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
    try:
        rows, bad = read_sidecar(path)
    except OSError as exc:
        _warn(f"skipping {path}: {exc}")
        return pd.DataFrame()
    if bad:
        _warn(f"{path}: skipped {bad} corrupt line(s)")
    return pd.DataFrame(rows)


def _read_items(point_dir: Path) -> dict[str, pd.DataFrame]:
    """lmms-eval's ``--log_samples`` files (``<timestamp>_samples_<task>.jsonl``): per task, one row per
    document (``doc_id`` index) with its per-item metric values. Later runs override earlier ones."""
    items: dict[str, pd.DataFrame] = {}
    for path in sorted(point_dir.rglob("*_samples_*.jsonl")):
        if is_sidecar(path):  # our side-car, not lmms-eval's log
            continue
        task = path.stem.split("_samples_", 1)[1]
        rows = []
        try:
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and "doc_id" in row:
                    rows.append(row)
        except OSError as exc:
            _warn(f"skipping {path}: {exc}")
            continue
        if rows:
            items[task] = pd.DataFrame(rows).drop_duplicates("doc_id", keep="last").set_index("doc_id")
    return items


def _normalise_meta(meta: dict[str, Any]) -> dict[str, Any]:
    out = {k: meta.get(k) for k in _META_KEYS}
    for key in ("budget", "seed"):
        value = out[key]
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            out[key] = int(value)
        elif isinstance(value, float) and value.is_integer():
            out[key] = int(value)
    for key in ("schedule", "metric", "method", "family", "options", "positions", "encoder_schedule"):
        if out[key] is not None and not isinstance(out[key], str):
            out[key] = str(out[key])
        if isinstance(out[key], str) and out[key].strip() in ("", "None", "null"):
            out[key] = None
    out["method"] = out["method"] or BASELINE
    spec = REGISTRY.get(out["method"])  # a method no longer registered keeps what it recorded
    if spec is not None and not spec.takes_metric:
        out["metric"] = None
    if spec is not None and not spec.takes_seed:
        out["seed"] = None
    return out


def _meta_from_run(point_id: str, config: dict[str, Any], samples: pd.DataFrame) -> dict[str, Any]:
    args = parse_model_args(config.get("model_args", ""))
    meta: dict[str, Any] = {k: args.get(k) for k in _META_KEYS}
    if not samples.empty:
        first = samples.iloc[0].to_dict()
        for key in ("family", "method", "budget", "schedule", "metric", "seed", "options", "positions", "encoder_schedule"):
            if meta.get(key) is None and first.get(key) is not None and not pd.isna(first.get(key)):
                meta[key] = first[key]
    pretrained = args.get("pretrained") or config.get("model") or point_id
    meta["model_name"] = point_id.split("__")[0] if "__" in point_id else Path(str(pretrained)).name
    return meta


def _load_point(point_dir: Path, meta: dict[str, Any] | None) -> PointResult:
    results: dict[str, dict[str, Any]] = {}
    throughput: dict[str, Any] = {}
    config: dict[str, Any] = {}
    good: list[Path] = []
    for path in sorted(point_dir.rglob("*_results.json")):  # timestamped: later runs override earlier ones
        data = _read_json(path)
        if data is None:
            continue
        results.update({t: m for t, m in data["results"].items() if isinstance(m, dict)})
        throughput.update(data.get("throughput") or {})
        config = data.get("config") or config
        good.append(path)
    frames = [f for f in (_read_sidecar(p) for p in sorted(point_dir.rglob(SIDECAR_GLOB))) if not f.empty]
    samples = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if meta is None:
        meta = _meta_from_run(point_dir.name, config, samples)
    return PointResult(point_dir.name, point_dir, _normalise_meta(meta), results, throughput, samples, good,
                       _read_items(point_dir))


def _point_dirs(sweep_dir: Path) -> list[Path]:
    """Top-level folders that hold a point: a results JSON or a ``point.json`` (a folder of the sweep's
    own, ``.tmp-*`` or hidden, is skipped)."""
    found = {sweep_dir / p.relative_to(sweep_dir).parts[0] for p in sweep_dir.rglob("*_results.json")
             if len(p.relative_to(sweep_dir).parts) > 1}
    found |= {p.parent for p in sweep_dir.glob(f"*/{POINT_FILE}")}
    return sorted(d for d in found if d.is_dir() and not d.name.startswith(".") and d.name not in _SKIP_DIRS)



def sweeps_inside(folder: str | Path) -> list[str]:
    """The sweeps directly under ``folder`` (sub-folders with a ``sweep.yaml`` or ``sweep.json``) when
    ``folder`` is not a sweep itself (has neither); [] for a sweep folder."""
    folder = Path(folder)
    if (folder / CONFIG_FILE).is_file() or (folder / STATUS_FILE).is_file():
        return []
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")
                  and ((d / CONFIG_FILE).is_file() or (d / STATUS_FILE).is_file()))


def grid_settings(sweep_dir: str | Path) -> dict[str, dict[str, Any]] | None:
    """Point id -> settings of every grid point of the config the sweep saved (None: no readable config)."""
    cfg = saved_config(Path(sweep_dir))
    return None if cfg is None else {p.id: point_settings(cfg, p) for p in expand(cfg)}


def load_sweep(sweep_dir: str | Path, excluded: list[tuple[str, str]] | None = None,
               grid: dict[str, dict[str, Any]] | None = None) -> list[PointResult]:
    """Every point under ``sweep_dir`` whose files pass the check, in folder-name order; the others go
    into ``excluded`` as ``(point id, reason)``. ``grid`` (:func:`grid_settings`): a grid point made with
    other settings than the sweep's config is left out too, so no table mixes settings (package versions
    aside; a point that recorded none, made by an older version, is taken)."""
    sweep_dir = Path(sweep_dir)
    points = []
    for point_dir in _point_dirs(sweep_dir):
        meta_path = point_dir / POINT_FILE
        meta = _read_json(meta_path) if meta_path.is_file() else None
        tasks = meta.get("tasks") if meta and isinstance(meta.get("tasks"), list) else None
        need_sidecar = bool(meta and (meta.get("sidecars") or writes_sidecar(str(meta.get("lmms_model")))))
        problem = check_point_files(point_dir, tasks, need_sidecar).problem
        if problem is None and meta is not None and meta.get("status") not in (None, "ok"):
            problem = f"{POINT_FILE} says status {meta.get('status')!r}"
        if problem is None and meta is not None and grid and point_dir.name in grid:
            problem = settings_problem(meta.get("settings"), grid[point_dir.name], ignore=("versions",),
                                       unrecorded_ok=True)
        if problem is not None:
            if excluded is not None:
                excluded.append((point_dir.name, problem))
            else:
                _warn(f"skipping {point_dir.name}: {problem}")
            continue
        points.append(_load_point(point_dir, meta))
    if not points:
        _warn(f"no readable *_results.json under {sweep_dir}")
    return points


def not_included(sweep_dir: str | Path, loaded: Sequence[str], grid: Sequence[str] = ()) -> list[tuple[str, str]]:
    """``(point id, reason)`` for the points the sweep knows of but that have no loaded result: the
    last failure recorded under ``_failed/``, the status in ``sweep.json`` (pending, redo), or a point
    of the saved config's ``grid`` that never ran."""
    sweep_dir = Path(sweep_dir)
    out: dict[str, str] = {pid: "not run yet" for pid in grid}
    for error in sorted((sweep_dir / FAILED_DIR).glob(f"*/{ERROR_FILE}")):
        data = _read_json(error) or {}
        grid = [g for g in grid if g != error.parent.name]
        out[error.parent.name] = f"failed: {data.get('error') or 'see ' + str(error)}"
    status = _read_json(sweep_dir / STATUS_FILE) if (sweep_dir / STATUS_FILE).is_file() else None
    failed = set(out) - set(grid)
    for pid, entry in ((status or {}).get("points") or {}).items():
        if pid in failed or not isinstance(entry, dict) or entry.get("status") == "done":
            continue
        state = entry.get("status", "pending")
        out[pid] = "not run yet" if state == "pending" else f"{state}: {entry.get('error') or ''}".rstrip(": ")
    return [(pid, why) for pid, why in out.items() if pid not in set(loaded)]
