"""When an evaluated point counts: the one check the sweep runner and the tables share.

A point's folder is good when every ``*_results.json`` in it parses, every task asked for has a result,
every evaluated task has a numeric score, and its side-cars (when it has, or must have, one) parse
line by line with one record per evaluated item (lmms-eval's ``n-samples``: ``effective``).
Anything less is named: the runner redoes the point, the tables leave it out and say why.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from v2drop_eval.engine.families import is_plugin_model
from v2drop_eval.plugin.sidecar import SIDECAR_GLOB, read_sidecar

__all__ = ["PointFiles", "check_point_files", "writes_sidecar"]


@dataclass
class PointFiles:
    """What a point folder holds, and the first reason it does not count (None: it counts)."""

    results: list[Path] = field(default_factory=list)
    sidecars: list[Path] = field(default_factory=list)
    problem: str | None = None


def writes_sidecar(lmms_model: str) -> bool:
    """A ``v2drop_*`` lmms-eval model (or alias): it always writes a side-car."""
    return is_plugin_model(lmms_model)


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
    found: set[str] = set()
    scores: dict[str, Any] = {}
    items: dict[str, int] = {}
    for path in out.results:  # timestamped names: a later run's entries replace an earlier one's
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
