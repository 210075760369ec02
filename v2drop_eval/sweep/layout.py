"""A sweep folder: the names of everything in it, what each point's folder says about it, and the lock.

Layout under the sweep directory ``OUT``:

- ``OUT/<point-id>/``: a finished point: lmms-eval's ``<model>/<timestamp>_results.json``, the plugin's
  side-car JSONL, ``lmms_eval.log`` and ``point.json`` (with the settings that made it). The folder
  appears only by an atomic rename of ``OUT/.tmp-<point-id>/`` once the run has exited 0 *and* written
  results for every task, so a point killed half-way is never counted as done, and a rerun replaces
  the whole folder (the old one is first renamed aside to ``OUT/.replaced-<point-id>``), so a folder
  never holds two runs. A point is done only for the settings it recorded; its temp folder is removed on the next run, unless it
  holds a ``job.json`` whose job is still queued or running (executors ``local``/``slurm``; their
  logs are under ``OUT/.submitit/<job id>/``).
- ``OUT/_failed/<point-id>/``: the last failed attempt (its log and ``error.json``); retried next run.
- ``OUT/sweep.json``: the status of every point, rewritten after each one; ``OUT/sweep.yaml``: the config.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout

from v2drop_eval.engine.atomic import write_json_atomic, write_text_atomic
from v2drop_eval.sweep.pointcheck import check_point_files, point_settings, settings_problem, writes_sidecar

if TYPE_CHECKING:
    from v2drop_eval.sweep.config import SweepConfig
    from v2drop_eval.sweep.points import Point

__all__ = ["POINT_FILE", "ERROR_FILE", "STATUS_FILE", "CONFIG_FILE", "LOG_NAME", "FAILED_DIR", "TMP_PREFIX",
           "REPLACED_PREFIX", "replace_dir", "point_state_for", "point_lock",
           "JOB_FILE", "SUBMITIT_DIR", "cause_line", "LOCK_FILE", "PID_FILE", "JobRecord", "read_job", "write_job", "point_state",
           "is_done", "tail", "remove", "now", "fmt_time", "sweep_lock", "lock_holder", "write_status",
           "read_error"]

POINT_FILE = "point.json"  # the sweep's record of a finished point
ERROR_FILE = "error.json"  # the record of a failed attempt, in _failed/<point-id>/
STATUS_FILE = "sweep.json"
CONFIG_FILE = "sweep.yaml"
LOG_NAME = "lmms_eval.log"
FAILED_DIR = "_failed"
TMP_PREFIX = ".tmp-"
REPLACED_PREFIX = ".replaced-"  # a finished point's folder, renamed aside while its rerun takes its place
JOB_FILE = "job.json"
SUBMITIT_DIR = ".submitit"  # submitit's pickles, submission scripts and job logs, per job id
LOCK_FILE, PID_FILE = ".sweep.lock", ".sweep.pid"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")  # lmms-eval colours its log lines
# A line that says why a run failed: a Python exception ("ValueError: ..."), an lmms-eval ERROR record,
# or its "Tasks not found" / "not found" messages.
_LOG_PREFIX = re.compile(r"^.*?\|\s*ERROR\s*\|\s*\S+\s+-\s+(?:Error during evaluation:\s*)?")  # loguru's time | level | where -
_CAUSE = re.compile(r"(?:\b[A-Za-z_][\w.]*(?:Error|Exception)\b:\s*\S|\|\s*ERROR\s*\||not found|[Nn]o such )")


# -- small helpers -------------------------------------------------------------------------------------
def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log, colour codes removed ("" if unreadable)."""
    try:
        text = _ANSI.sub("", path.read_text(errors="replace")).rstrip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def cause_line(log_tail: str) -> str | None:
    """The last line of a failed run's log that says why (an exception, an ERROR record), or None."""
    for line in reversed(_ANSI.sub("", log_tail).splitlines()):
        if _CAUSE.search(line):
            text = " ".join(_LOG_PREFIX.sub("", line).split())
            return text if len(text) <= 300 else text[:297] + "..."
    return None


def remove(path: Path) -> None:
    """Remove a file or a folder tree, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_dir(src: Path, dst: Path) -> None:
    """Make ``src`` the folder ``dst``: the old ``dst`` is renamed aside first and removed after, so at
    every moment ``dst`` is either the whole old run or the whole new one, never a mix of both."""
    if not dst.exists():
        os.replace(src, dst)
        return
    aside = dst.with_name(REPLACED_PREFIX + dst.name)
    remove(aside)
    os.replace(dst, aside)
    os.replace(src, dst)
    remove(aside)


def read_error(out: Path, point_id: str) -> dict[str, Any] | None:
    """The ``error.json`` of the point's last failed attempt, or None (none, or unreadable)."""
    try:
        data = json.loads((out / FAILED_DIR / point_id / ERROR_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- job records ---------------------------------------------------------------------------------------
@dataclass
class JobRecord:
    """A point's job: written into ``.tmp-<point-id>/job.json`` when it is submitted; moves with the
    folder into the finished point (or ``_failed/``) as a record of which job produced it."""

    executor: str
    job_id: str
    submitted: str
    logs: str  # submitit's folder of this job: submission script, stdout/stderr
    pid: int | None = None  # the job's own process on its node (local: liveness check)
    host: str | None = None
    started: str | None = None
    pgid: int | None = None  # the job's own process group (session): cancelling ends all of it
    token: str | None = None  # this submission's: only the job holding it may finish the point


def point_lock(out: Path, point_id: str) -> FileLock:
    """The lock a job holds while it finishes its point (token check, rename) and the sweep holds while
    it removes or fails the point's ``.tmp-`` folder: a cancelled job never lands after the sweep moved on."""
    folder = out / SUBMITIT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(folder / f"{point_id}.lock", timeout=60)


def read_job(folder: Path) -> JobRecord | None:
    try:
        data = json.loads((folder / JOB_FILE).read_text())
        return JobRecord(**{k: data.get(k) for k in JobRecord.__dataclass_fields__})
    except (OSError, ValueError, TypeError):
        return None


def write_job(folder: Path, record: JobRecord) -> None:
    write_json_atomic(folder / JOB_FILE, asdict(record))


# -- a point's state -----------------------------------------------------------------------------------
def point_state(point_dir: Path, tasks: Sequence[str] | None = None,
                settings: dict[str, Any] | None = None) -> tuple[str, str | None]:
    """``("todo", None)`` (never finished), ``("done", None)``, or ``("redo", why)``: a finished point
    whose files no longer pass the check (``tasks``: the config's, else those in ``point.json``), or
    made with other settings than ``settings`` (:func:`~v2drop_eval.sweep.pointcheck.point_settings`;
    None: not checked)."""
    if not point_dir.exists():
        return "todo", None
    try:
        meta = json.loads((point_dir / POINT_FILE).read_text())
    except (OSError, ValueError) as exc:
        return ("todo", None) if not (point_dir / POINT_FILE).exists() else ("redo", f"{POINT_FILE}: {exc}")
    if not isinstance(meta, dict) or meta.get("status") != "ok":
        return "redo", f"{POINT_FILE} does not say status ok"
    files = meta.get("results_files") or []
    gone = [f for f in files if not (point_dir / f).is_file()]
    if not files or gone:
        return "redo", f"results file(s) missing: {', '.join(gone) or '(none listed)'}"
    need_sidecar = bool(meta.get("sidecars")) or writes_sidecar(str(meta.get("lmms_model")))
    problem = check_point_files(point_dir, tasks if tasks is not None else meta.get("tasks"), need_sidecar).problem
    if problem is None and settings is not None:
        problem = settings_problem(meta.get("settings"), settings)
    return ("redo", problem) if problem else ("done", None)


def point_state_for(cfg: SweepConfig, point: Point, out: Path) -> tuple[str, str | None]:
    """:func:`point_state` of ``point`` of sweep ``cfg`` in ``out``: its files and its settings."""
    return point_state(out / point.id, cfg.tasks, point_settings(cfg, point))


def is_done(point_dir: Path, tasks: Sequence[str] | None = None, settings: dict[str, Any] | None = None) -> bool:
    """A finished point whose files pass the check (see :func:`point_state`)."""
    return point_state(point_dir, tasks, settings)[0] == "done"


# -- one sweep per folder ------------------------------------------------------------------------------
@contextlib.contextmanager
def sweep_lock(out: Path) -> Iterator[None]:
    """One sweep per results folder (filelock); its pid in ``.sweep.pid`` for `status`."""
    lock = FileLock(out / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RuntimeError(f"another sweep is running in {out} (it holds {out / LOCK_FILE})") from None
    try:
        write_text_atomic(out / PID_FILE, str(os.getpid()))
        yield
    finally:
        (out / PID_FILE).unlink(missing_ok=True)
        lock.release()


def lock_holder(out: Path) -> int | None:
    """The pid of the sweep that runs in ``out`` now (it wrote it into ``.sweep.pid``), if alive."""
    try:
        pid = int((out / PID_FILE).read_text().strip() or 0)
        if pid:
            os.kill(pid, 0)
            return pid
    except (OSError, ValueError):
        pass
    return None


# -- sweep.json ----------------------------------------------------------------------------------------
_STATUS_LOCK = threading.Lock()


def write_status(cfg: SweepConfig, points: Sequence[Point], out: Path, seconds: dict[str, float]) -> None:
    """``sweep.json``: done / failed / pending for every point, from what is on disk (merged with the
    entries of points not selected in this run, e.g. with ``--only``)."""
    with _STATUS_LOCK:
        _write_status_locked(cfg, points, out, dict(seconds))


def _write_status_locked(cfg: SweepConfig, points: Sequence[Point], out: Path, seconds: dict[str, float]) -> None:
    path = out / STATUS_FILE
    try:
        entries = json.loads(path.read_text()).get("points", {})
    except (OSError, ValueError, AttributeError):
        entries = {}
    for p in points:
        entry: dict[str, Any] = {"status": "pending"}
        previous = entries.get(p.id) if isinstance(entries.get(p.id), dict) else {}
        state, why = point_state_for(cfg, p, out)
        if state == "done":
            entry = {"status": "done"}
            if "seconds" in previous and previous.get("status") == "done":  # a run of an earlier sweep
                entry["seconds"] = previous["seconds"]
        elif state == "redo":
            entry = {"status": "redo", "error": why}
        elif (job := read_job(out / (TMP_PREFIX + p.id))) is not None:
            entry = {"status": "submitted", "executor": job.executor, "job_id": job.job_id}
        elif (out / FAILED_DIR / p.id / ERROR_FILE).is_file():
            err = read_error(out, p.id)
            entry = {"status": "failed", "error": err.get("error")} if err is not None else {"status": "failed"}
        if p.id in seconds:
            entry["seconds"] = round(seconds[p.id], 2)
        entries[p.id] = entry
    write_json_atomic(path, {"name": cfg.name, "updated": now(), "points": entries})
