"""``v2drop-eval status RESULTS_DIR``: what every point of a sweep is doing, from its directory alone.

One line per point: ``done``; ``failed`` with the first line of its error and its cause (the
last error line of its log, e.g. lmms-eval's ``ValueError: ...``); ``queued`` or ``running``
with the job id (asked of the scheduler: a job that has died shows as failed, with its reason);
``pending`` (not run yet, or to redo). The grid comes from ``sweep.yaml`` (the config a run saved; its
relative paths read from the folder the sweep ran in), else from the folders and ``sweep.json``. Nothing is changed on disk.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from v2drop_eval.sweep.config import ConfigError, SweepConfig, expand
from v2drop_eval.sweep.jobs import job_state, refresh_jobs
from v2drop_eval.sweep.layout import (
    ERROR_FILE,
    FAILED_DIR,
    POINT_FILE,
    STATUS_FILE,
    TMP_PREFIX,
    cause_line,
    lock_holder,
    point_state,
    read_error,
    read_job,
)
from v2drop_eval.sweep.origin import load_saved_config
from v2drop_eval.sweep.pointcheck import point_settings

__all__ = ["saved_config", "STATES", "PointStatus", "point_status", "sweep_status", "summary", "format_status", "status_json"]

STATES = ("done", "failed", "running", "queued", "pending")


@dataclass
class PointStatus:
    id: str
    state: str  # one of STATES
    detail: str | None = None  # failed: the error's first line; queued/running: the job; pending: why
    job_id: str | None = None
    executor: str | None = None


def saved_config(out: Path) -> SweepConfig | None:
    """The config the last run in ``out`` saved (``sweep.yaml``), or None (none, or not valid here)."""
    try:
        return load_saved_config(out)  # relative paths from where the sweep ran, not from here
    except (OSError, ValueError, ConfigError, yaml.YAMLError):
        return None


def _grid(out: Path) -> tuple[list[str], list[str] | None, dict[str, dict[str, Any]]]:
    """Point ids in config order, the tasks and each point's settings; from ``sweep.yaml``, else from
    what is on disk (no tasks, no settings)."""
    cfg = saved_config(out)
    if cfg is not None:
        points = expand(cfg)
        return [p.id for p in points], cfg.tasks, {p.id: point_settings(cfg, p) for p in points}
    ids: set[str] = set()
    try:
        ids |= set(json.loads((out / STATUS_FILE).read_text()).get("points") or {})
    except (OSError, ValueError, AttributeError):
        pass
    ids |= {p.parent.name for p in out.glob(f"*/{POINT_FILE}")}
    ids |= {d.name for d in (out / FAILED_DIR).glob("*") if d.is_dir()}
    ids |= {d.name[len(TMP_PREFIX):] for d in out.glob(TMP_PREFIX + "*")}
    return sorted(ids), None, {}


def _first_line(text: Any) -> str:
    lines = [line.strip() for line in str(text or "").strip().splitlines() if line.strip()]
    return lines[0] if lines else "(no error recorded)"


def point_status(out: Path, point_id: str, tasks: list[str] | None, inline_pid: int | None,
                 settings: dict[str, Any] | None = None) -> PointStatus:
    state, why = point_state(out / point_id, tasks, settings)
    if state == "done":
        return PointStatus(point_id, "done")
    tmp = out / (TMP_PREFIX + point_id)
    record = read_job(tmp)
    if record is not None:
        live, detail = job_state(record, refresh=False)
        if live != "ended":
            return PointStatus(point_id, live, f"{record.executor} job {record.job_id} ({detail})",
                               record.job_id, record.executor)
        if tmp.exists():
            return PointStatus(point_id, "failed", f"{record.executor} job {record.job_id} ended ({detail}) "
                               "before its point finished", record.job_id, record.executor)
    elif tmp.is_dir() and inline_pid:
        return PointStatus(point_id, "running", f"inline, sweep process {inline_pid}", executor="inline")
    error_file = out / FAILED_DIR / point_id / ERROR_FILE
    if error_file.is_file():
        err = read_error(out, point_id)
        if err is None:
            return PointStatus(point_id, "failed", f"{error_file}: not readable JSON")
        job = err.get("job") or {}
        cause = cause_line(str(err.get("log_tail") or "")) or err.get("cause")
        detail = _first_line(err.get("error")) + (f": {cause}" if cause else "")
        return PointStatus(point_id, "failed", detail, job.get("job_id"), job.get("executor"))
    if state == "redo":
        return PointStatus(point_id, "pending", f"to redo: {why}")
    return PointStatus(point_id, "pending")


def sweep_status(out: str | Path) -> list[PointStatus]:
    """The status of every point of the sweep in ``out`` (see the module docstring)."""
    out = Path(out)
    ids, tasks, settings = _grid(out)
    holder = lock_holder(out)
    refresh_jobs(r for r in (read_job(out / (TMP_PREFIX + pid)) for pid in ids) if r is not None)
    return [point_status(out, pid, tasks, holder, settings.get(pid)) for pid in ids]


def summary(points: list[PointStatus]) -> dict[str, int]:
    return {"points": len(points), **{s: sum(p.state == s for p in points) for s in STATES}}


def format_status(out: Path, points: list[PointStatus]) -> str:
    width = max((len(p.id) for p in points), default=0)
    lines = []
    for p in points:
        lines.append((f"{p.id:<{width}}  {p.state:<7}" + (f"  {p.detail}" if p.detail else "")).rstrip())
    counts = summary(points)
    lines.append(f"{out}: {counts['points']} points: " + ", ".join(f"{counts[s]} {s}" for s in STATES))
    return "\n".join(lines)


def status_json(out: Path, points: list[PointStatus]) -> str:
    return json.dumps({"sweep": str(out), "points": [asdict(p) for p in points], "summary": summary(points)},
                      indent=2)
