"""When an evaluated point counts: the one check the sweep runner and the tables share.

A point's folder is good when every ``*_results.json`` in it parses, every task asked for has a result,
every evaluated task has a numeric score, and its side-cars (when it has, or must have, one) parse
line by line with one record per evaluated item (lmms-eval's ``n-samples``: ``effective``).
A folder holds one run: a second ``*_results.json`` (two lmms-eval runs into one output path) is a
problem, never merged. Anything less is named: the runner redoes the point, the tables leave it out and
say why.

A point is also only done for the settings that made it: :func:`point_settings` is everything of a sweep
config that changes a point's result (model and model args, tasks, limit, batch size, processes, include
path, extra lmms-eval arguments, environment, and the versions of this package, lmms-eval and
transformers); ``point.json`` records it, and :func:`settings_problem` names what changed.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from v2drop_eval.engine.families import is_plugin_model
from v2drop_eval.plugin.sidecar import SIDECAR_GLOB, read_sidecar

if TYPE_CHECKING:
    from v2drop_eval.sweep.config import SweepConfig
    from v2drop_eval.sweep.points import Point

__all__ = ["PointFiles", "check_point_files", "writes_sidecar", "point_settings", "settings_problem", "versions",
           "VERSIONED"]

# Distributions whose version is part of a point's settings: a new one can change every score.
VERSIONED = ("v2drop-eval", "lmms_eval", "transformers")


@dataclass
class PointFiles:
    """What a point folder holds, and the first reason it does not count (None: it counts)."""

    results: list[Path] = field(default_factory=list)
    sidecars: list[Path] = field(default_factory=list)
    problem: str | None = None


def writes_sidecar(lmms_model: str) -> bool:
    """A ``v2drop_*`` lmms-eval model (or alias): it always writes a side-car."""
    return is_plugin_model(lmms_model)


@functools.cache
def versions() -> dict[str, str | None]:
    """The installed versions of :data:`VERSIONED` (None: not installed)."""
    out: dict[str, str | None] = {}
    for dist in VERSIONED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def point_settings(cfg: SweepConfig, point: Point) -> dict[str, Any]:
    """Everything that defines ``point``'s result under ``cfg`` (JSON-able; recorded in ``point.json``)."""
    return {
        "lmms_model": point.model.model,
        "model_args": point.model_args(),  # pretrained, method, budget/schedule, metric, seed, dtype, attention...
        "tasks": list(cfg.tasks),
        "limit": cfg.limit,
        "batch_size": cfg.batch_size,
        "num_processes": cfg.num_processes,
        "include_path": cfg.include_path,
        "lmms_eval_args": list(cfg.lmms_eval_args),
        "env": dict(sorted(cfg.env.items())),
        "versions": versions(),
    }


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def settings_problem(recorded: Any, expected: Mapping[str, Any], ignore: Sequence[str] = (),
                     unrecorded_ok: bool = False) -> str | None:
    """Why a point recorded with settings ``recorded`` is not the point ``expected`` asks for (None: same).
    ``ignore``: keys not compared; ``unrecorded_ok``: a point that recorded none (older runs) passes."""
    if not isinstance(recorded, Mapping):
        if unrecorded_ok:
            return None
        return "its point.json records no settings (made by an older version); run again to record them"
    changed = []
    for key in (k for k in expected if k not in ignore):
        old, new = recorded.get(key), expected[key]
        if json.dumps(old, sort_keys=True) == json.dumps(new, sort_keys=True):
            continue
        if isinstance(old, str) and isinstance(new, str) and key == "model_args":
            a, b = dict(p.partition("=")[::2] for p in old.split(",")), dict(p.partition("=")[::2] for p in new.split(","))
            diff = [f"{k}={a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in dict.fromkeys([*a, *b])
                    if a.get(k) != b.get(k)]
            changed.append(f"model_args {', '.join(diff)}")
        else:
            changed.append(f"{key} {_short(old)} -> {_short(new)}")
    return f"settings changed: {'; '.join(changed)}" if changed else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_point_files(folder: Path, tasks: Sequence[str] | None = None, need_sidecar: bool = False) -> PointFiles:
    """Check the lmms-eval output under ``folder`` (see the module docstring). ``tasks``: the tasks
    the point was asked for (None: whatever the results hold); ``need_sidecar``: the point ran a
    ``v2drop_*`` model, which always writes one."""
    out = PointFiles(sorted(folder.rglob("*_results.json")), sorted(folder.rglob(SIDECAR_GLOB)))
    if not out.results:
        out.problem = "lmms-eval wrote no *_results.json"
        return out
    if len(out.results) > 1:  # lmms-eval writes one per run: never merge two runs' scores and side-cars
        names = ", ".join(str(p.relative_to(folder)) for p in out.results)
        out.problem = f"{len(out.results)} runs in one folder ({names}); a point folder holds one run"
        return out
    found: set[str] = set()
    scores: dict[str, Any] = {}
    items: dict[str, int] = {}
    for path in out.results:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            out.problem = f"{path.name} is not valid JSON: {exc}"
            return out
        if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
            out.problem = f"{path.name} has no 'results' mapping"
            return out
        scores.update(data["results"])
        found |= set(data["results"]) | set(data.get("groups") or {})
        for task, n in (data.get("n-samples") or {}).items():
            if isinstance(n, dict) and _is_number(n.get("effective")):
                items[task] = int(n["effective"])
    missing = [t for t in (tasks or []) if t not in found]
    if missing:
        out.problem = f"no results for task(s) {', '.join(missing)}"
        return out
    unscored = [t for t in items if not any(_is_number(v) for v in (scores.get(t) or {}).values())]
    if unscored:
        out.problem = f"no score for task(s) {', '.join(unscored)} in the results"
        return out
    if not out.sidecars:
        if need_sidecar:
            out.problem = f"no side-car ({SIDECAR_GLOB}) beside the results"
        return out
    seen: dict[str, set[Any]] = {}
    for path in out.sidecars:
        try:
            rows, bad = read_sidecar(path)
        except OSError as exc:
            out.problem = f"side-car {path.name} is not readable: {exc}"
            return out
        if bad:
            out.problem = f"side-car {path.name} has {bad} corrupt line(s)"
            return out
        for row in rows:
            seen.setdefault(str(row.get("task")), set()).add(json.dumps(row.get("doc_id")))
    for task, n in items.items():
        got = len(seen.get(task, ()))
        if got != n:
            out.problem = f"side-car has {got} record(s) for task {task}, which evaluated {n} item(s)"
            return out
    return out
