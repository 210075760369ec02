"""Run the points of a sweep: one lmms-eval process per point, resumable, atomic, failure-tolerant.

Layout under the sweep directory ``OUT``:

- ``OUT/<point-id>/``: a finished point: lmms-eval's ``<model>/<timestamp>_results.json``, the plugin's
  side-car JSONL, ``lmms_eval.log`` and ``point.json``. The folder appears only by an atomic rename of
  ``OUT/.tmp-<point-id>/`` once the run has exited 0 *and* written results for every task, so a point
  killed half-way is never counted as done; its temp folder is removed on the next run, unless it
  holds a ``job.json`` whose job is still queued or running (executors ``local``/``slurm``, see
  :mod:`v2drop_eval.sweep.dispatch`; their logs are under ``OUT/.submitit/<job id>/``).
- ``OUT/_failed/<point-id>/``: the last failed attempt (its log and ``error.json``); retried next run.
- ``OUT/sweep.json``: the status of every point, rewritten after each one; ``OUT/sweep.yaml``: the config.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import yaml
from filelock import FileLock, Timeout
from tqdm import tqdm

from v2drop_eval.engine.atomic import write_json_atomic, write_text_atomic
from v2drop_eval.methods.rules import local_model_problem
from v2drop_eval.sweep.config import Point, SweepConfig
from v2drop_eval.sweep.executors import JobRecord, read_job
from v2drop_eval.sweep.pointcheck import POINT_FILE, SIDECAR_GLOB, check_point_files, writes_sidecar

__all__ = ["RunFn", "PointOutcome", "SweepReport", "PrepareError", "run_sweep", "dry_run", "subprocess_run",
           "check_point_output", "is_done", "point_state", "run_point_in", "SIDECAR_GLOB", "LOG_NAME",
           "POINT_FILE", "FAILED_DIR", "TMP_PREFIX"]

# cmd, log file, environment, timeout (s) -> exit status. Tests pass a fake; real runs use subprocess_run.
RunFn = Callable[[Sequence[str], Path, dict[str, str], "float | None"], int]
LOG_NAME = "lmms_eval.log"
FAILED_DIR = "_failed"
TMP_PREFIX = ".tmp-"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")  # lmms-eval colours its log lines


class PrepareError(RuntimeError):
    """The config's ``prepare`` step failed (or did not build what the models need)."""


@dataclass
class PointOutcome:
    point: Point
    # "done" (ran now), "skipped" (already done), "failed", "cancelled" (interrupted),
    # "submitted" (its job is queued or running)
    status: str
    seconds: float = 0.0
    error: str | None = None


@dataclass
class SweepReport:
    outcomes: list[PointOutcome]

    @property
    def failed(self) -> list[PointOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self, name: str, out: Path, seconds: float) -> str:
        """The sweep's closing lines: counts by outcome, then each failure and where its log is."""
        counts = {s: sum(o.status == s for o in self.outcomes) for s in ("skipped", "done", "failed")}
        rest = len(self.outcomes) - sum(counts.values())  # submitted as jobs, or cancelled
        lines = [f"sweep {name}: {len(self.outcomes)} points: {counts['skipped']} skipped, {counts['done']} ran ok, "
                 f"{counts['failed']} failed" + (f", {rest} not finished here" if rest else "")
                 + f", in {_fmt_time(seconds)}"]
        lines += [f"  failed: {o.point.id}: {o.error} (see {out / FAILED_DIR / o.point.id})" for o in self.failed]
        return "\n".join(lines)


# -- the process ------------------------------------------------------------------------------------
def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the child gets SIGKILL if the sweep dies, so no orphan keeps writing a temp folder."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_ACTIVE: set[subprocess.Popen] = set()
_ACTIVE_LOCK = threading.Lock()


def _stop_all() -> None:
    """Terminate every point process still running (parallel sweeps, on interruption)."""
    with _ACTIVE_LOCK:
        procs = list(_ACTIVE)
    for proc in procs:
        with contextlib.suppress(OSError):
            proc.terminate()


def subprocess_run(cmd: Sequence[str], log_path: Path, env: dict[str, str], timeout: float | None) -> int:
    """Run ``cmd`` with stdout and stderr into ``log_path``; kill it on timeout or interruption."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        with _ACTIVE_LOCK:
            _ACTIVE.add(proc)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.write(f"\n[v2drop-eval sweep] timed out: killed after {timeout:g} s\n".encode())
            log.flush()
            return 124
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            with _ACTIVE_LOCK:
                _ACTIVE.discard(proc)


# -- checking a point's output ----------------------------------------------------------------------
def check_point_output(workdir: Path, tasks: Sequence[str], need_sidecar: bool = False
                       ) -> tuple[list[Path], list[Path], str | None]:
    """``(results files, side-cars, error)``: lmms-eval exits 0 even when a run failed, so a point counts
    only if its output passes :func:`v2drop_eval.sweep.pointcheck.check_point_files`."""
    found = check_point_files(workdir, tasks, need_sidecar)
    return found.results, found.sidecars, found.problem


def point_state(point_dir: Path, tasks: Sequence[str] | None = None) -> tuple[str, str | None]:
    """``("todo", None)`` (never finished), ``("done", None)``, or ``("redo", why)``: a finished point
    whose files no longer pass the check (``tasks``: the config's, else those in ``point.json``)."""
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
    return ("redo", problem) if problem else ("done", None)


def is_done(point_dir: Path, tasks: Sequence[str] | None = None) -> bool:
    """A finished point whose files pass the check (see :func:`point_state`)."""
    return point_state(point_dir, tasks)[0] == "done"


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = _ANSI.sub("", path.read_text(errors="replace")).rstrip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


# -- helpers ---------------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


LOCK_FILE, PID_FILE = ".sweep.lock", ".sweep.pid"


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
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


def _lock_holder(out: Path) -> int | None:
    """The pid of the sweep that runs in ``out`` now (it wrote it into ``.sweep.pid``), if alive."""
    try:
        pid = int((out / PID_FILE).read_text().strip() or 0)
        if pid:
            os.kill(pid, 0)
            return pid
    except (OSError, ValueError):
        pass
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _load_module(name: str) -> Any:
    """A module by import name, or by file path (``tools/smoke_assets.py``, relative to the current folder)."""
    if not name.endswith(".py"):
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(Path(name).stem, name)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {name}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prepare(cfg: SweepConfig, points: Sequence[Point], log: TextIO) -> None:
    """Run the config's ``prepare`` step; then every local model folder must exist."""
    if cfg.prepare:
        call = cfg.prepare["call"]
        module, _, func = call.rpartition(":")
        print(f"prepare: {call}({cfg.prepare['args']})", file=log, flush=True)
        try:
            getattr(_load_module(module), func)(**cfg.prepare["args"])
        except Exception as exc:  # noqa: BLE001 - any failure of the user's step is reported as one
            raise PrepareError(f"prepare step {call} failed: {type(exc).__name__}: {exc}") from exc
    for model in {p.model.name: p.model for p in points}.values():
        problem = local_model_problem(model.pretrained)
        if problem:
            raise PrepareError(f"model {model.name}: {problem}" + (" after the prepare step" if cfg.prepare else ""))


# -- the sweep -------------------------------------------------------------------------------------
def dry_run(cfg: SweepConfig, points: Sequence[Point], out: Path, log: TextIO | None = None) -> None:
    """Print every point, whether it is done, and the exact command that would run it."""
    log = log or sys.stdout
    print(f"sweep {cfg.name}: {len(points)} points -> {out}", file=log)
    for note in cfg.notes:
        print(f"note: {note}", file=log)
    if cfg.prepare:
        print(f"prepare: {cfg.prepare['call']}({cfg.prepare['args']})", file=log)
    for i, p in enumerate(points, 1):
        state, why = point_state(out / p.id, cfg.tasks)
        print(f"[{i}/{len(points)}] {p.id} ({'to redo: ' + why if why else state})", file=log)
        print(f"    {cfg.shell_command(p, out / (TMP_PREFIX + p.id))}", file=log)
    log.flush()


def run_sweep(
    cfg: SweepConfig,
    points: Sequence[Point],
    out: Path | None = None,
    runner: RunFn = subprocess_run,
    log: TextIO | None = None,
    jobs: int | None = None,
    executor: str | None = None,
    wait: bool = False,
) -> SweepReport:
    """Run every point not yet done, in order (``jobs`` at a time, default the config's ``jobs``);
    a failed point is recorded and the sweep goes on. ``executor`` (default the config's): ``inline``
    runs them here; ``local`` and ``slurm`` submit them as jobs (:mod:`v2drop_eval.sweep.dispatch`), and
    wait for them (``local`` always, ``slurm`` with ``wait``). A point whose job is queued or running
    is never started again."""
    from v2drop_eval.sweep import dispatch
    from v2drop_eval.sweep.executors import EXECUTORS, require_submitit

    log = log or sys.stdout
    jobs = cfg.jobs if jobs is None else jobs
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs={jobs!r} is not allowed; give an integer >= 1 (points run at the same time)")
    executor = cfg.executor if executor is None else executor
    if executor not in EXECUTORS:
        raise ValueError(f"executor {executor!r} is not allowed; known executors: {', '.join(EXECUTORS)}")
    if executor != "inline":
        require_submitit(executor)
    out = Path(out if out is not None else cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    with _lock(out):
        live = dispatch.settle_jobs(out, log)
        (out / "sweep.yaml").write_text(yaml.safe_dump(cfg.raw, sort_keys=False))
        if executor == "inline":
            return _run_locked(cfg, list(points), out, runner, log, jobs, live)
        return dispatch.run_jobs(cfg, list(points), out, log, jobs, executor, wait, live)


_STATUS_LOCK = threading.Lock()


def _write_status(cfg: SweepConfig, points: Sequence[Point], out: Path, seconds: dict[str, float]) -> None:
    """``sweep.json``: done / failed / pending for every point, from what is on disk (merged with the
    entries of points not selected in this run, e.g. with ``--only``)."""
    with _STATUS_LOCK:
        _write_status_locked(cfg, points, out, dict(seconds))


def _write_status_locked(cfg: SweepConfig, points: Sequence[Point], out: Path, seconds: dict[str, float]) -> None:
    path = out / "sweep.json"
    try:
        entries = json.loads(path.read_text()).get("points", {})
    except (OSError, ValueError, AttributeError):
        entries = {}
    for p in points:
        entry: dict[str, Any] = {"status": "pending"}
        previous = entries.get(p.id) if isinstance(entries.get(p.id), dict) else {}
        state, why = point_state(out / p.id, cfg.tasks)
        if state == "done":
            entry = {"status": "done"}
            if "seconds" in previous and previous.get("status") == "done":  # a run of an earlier sweep
                entry["seconds"] = previous["seconds"]
        elif state == "redo":
            entry = {"status": "redo", "error": why}
        elif (job := read_job(out / (TMP_PREFIX + p.id))) is not None:
            entry = {"status": "submitted", "executor": job.executor, "job_id": job.job_id}
        elif (out / FAILED_DIR / p.id / "error.json").is_file():
            try:
                err = json.loads((out / FAILED_DIR / p.id / "error.json").read_text())
                entry = {"status": "failed", "error": err.get("error")}
            except (OSError, ValueError):
                entry = {"status": "failed"}
        if p.id in seconds:
            entry["seconds"] = round(seconds[p.id], 2)
        entries[p.id] = entry
    write_json_atomic(path, {"name": cfg.name, "updated": _now(), "points": entries})


class _Progress:
    """Sweep progress, safe to call from worker threads. In a terminal a tqdm bar (points done, rate,
    ETA) sits under the lines; in a log file (not a tty) only the lines are written
    (``[k/N] run <id>  elapsed ..  ETA ..``), since a bar's carriage returns would garble the file."""

    def __init__(self, total: int, todo: int, jobs: int, log: TextIO):
        self.total, self.left, self.jobs, self.log = total, todo, max(jobs, 1), log
        self.start = time.monotonic()
        self.seconds: dict[str, float] = {}
        self.lock = threading.Lock()
        tty = bool(getattr(log, "isatty", lambda: False)())
        self.bar = tqdm(total=todo, file=log, unit="point", desc="sweep", dynamic_ncols=True,
                        disable=not tty or todo == 0, leave=False)

    def say(self, text: str) -> None:
        with self.lock:
            if self.bar.disable:
                print(text, file=self.log, flush=True)
            else:
                self.bar.write(text, file=self.log)  # above the bar, which is redrawn below

    def started(self, i: int, point: Point) -> None:
        with self.lock:
            done = list(self.seconds.values())
            eta = _fmt_time(sum(done) / len(done) * self.left / self.jobs) if done else "?"
            elapsed = _fmt_time(time.monotonic() - self.start)
        self.say(f"[{i}/{self.total}] run  {point.id}  elapsed {elapsed}  ETA {eta}")

    def finished(self, i: int, outcome: PointOutcome, out: Path) -> None:
        with self.lock:
            self.seconds[outcome.point.id] = outcome.seconds
            self.left -= 1
            self.bar.update(1)
        tag = f"[{i}/{self.total}] " if self.jobs > 1 else "      "
        if outcome.status == "done":
            self.say(f"{tag}ok in {outcome.seconds:.1f}s -> {out / outcome.point.id}")
        elif outcome.status == "failed":
            self.say(f"{tag}FAILED {outcome.point.id} in {outcome.seconds:.1f}s: {outcome.error}")

    def close(self) -> None:
        self.bar.close()


def _run_locked(cfg: SweepConfig, points: list[Point], out: Path, runner: RunFn, log: TextIO,
                jobs: int, live: dict[str, JobRecord]) -> SweepReport:
    total = len(points)
    states = {p.id: point_state(out / p.id, cfg.tasks) for p in points}
    todo = {pid for pid, (state, _) in states.items() if state != "done" and pid not in live}
    redo = [pid for pid in todo if states[pid][0] == "redo"]
    waiting = sum(p.id in live for p in points)
    print(f"sweep {cfg.name}: {total} points, {total - len(todo) - waiting} done already, {len(todo)} to run"
          + (f", {waiting} submitted as jobs (not run here)" if waiting else "")
          + (f" ({len(redo)} to redo)" if redo else "") + f" -> {out}"
          + (f" ({jobs} at a time)" if jobs > 1 and todo else ""), file=log, flush=True)
    for note in cfg.notes:
        print(f"note: {note}", file=log)
    for pid in redo:
        print(f"redo {pid}: {states[pid][1]}", file=log, flush=True)
    if todo:
        _prepare(cfg, [p for p in points if p.id in todo], log)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **cfg.env}
    progress = _Progress(total, len(todo), jobs, log)
    cancel = threading.Event()
    results: dict[str, PointOutcome] = {}

    def work(i: int, point: Point) -> PointOutcome:
        if cancel.is_set():
            return PointOutcome(point, "cancelled")
        progress.started(i, point)
        outcome = _run_point(cfg, point, out, runner, env, cancel)
        if outcome.status != "cancelled":
            progress.finished(i, outcome, out)
            _write_status(cfg, points, out, progress.seconds)
        return outcome

    queue = []
    for i, point in enumerate(points, 1):
        if point.id in todo:
            queue.append((i, point))
        elif point.id in live:
            job = live[point.id]
            progress.say(f"[{i}/{total}] skip {point.id} (submitted: {job.executor} job {job.job_id})")
            results[point.id] = PointOutcome(point, "submitted")
        else:
            progress.say(f"[{i}/{total}] skip {point.id} (done)")
            results[point.id] = PointOutcome(point, "skipped")
    if jobs <= 1:
        for i, point in queue:
            results[point.id] = work(i, point)
    elif queue:
        pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="sweep")
        try:
            futures = [pool.submit(work, i, point) for i, point in queue]
            for fut in as_completed(futures):
                outcome = fut.result()
                results[outcome.point.id] = outcome
        except BaseException:
            cancel.set()  # Ctrl-C, SIGTERM, or a runner that raised: stop every running point
            _stop_all()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    progress.close()
    _write_status(cfg, points, out, progress.seconds)
    report = SweepReport([results[p.id] for p in points])
    print(report.summary(cfg.name, out, time.monotonic() - progress.start), file=log, flush=True)
    log.flush()
    return report


def _run_point(cfg: SweepConfig, point: Point, out: Path, runner: RunFn, env: dict[str, str],
               cancel: threading.Event | None = None) -> PointOutcome:
    tmp = out / (TMP_PREFIX + point.id)
    _remove(tmp)
    tmp.mkdir()
    return run_point_in(cfg, point, out, runner, env, tmp, cancel)


def run_point_in(cfg: SweepConfig, point: Point, out: Path, runner: RunFn, env: dict[str, str], tmp: Path,
                 cancel: threading.Event | None = None) -> PointOutcome:
    """Run ``point`` into the existing folder ``tmp``; then rename it to the point's folder (done) or to
    ``_failed/<point-id>`` (failed). Interrupted: ``tmp`` is removed. Inline and submitted jobs alike."""
    final = out / point.id
    cmd = cfg.command(point, tmp)
    started, t0 = _now(), time.monotonic()
    log_path = tmp / LOG_NAME
    log_path.write_text(f"$ {cfg.shell_command(point, tmp)}\n")
    try:
        rc = runner(cmd, log_path, env, cfg.timeout)
    except BaseException:
        _remove(tmp)  # interrupted (Ctrl-C, SIGTERM): leave nothing behind that could look done
        raise
    seconds = time.monotonic() - t0
    if cancel is not None and cancel.is_set():
        _remove(tmp)
        return PointOutcome(point, "cancelled", seconds)
    results, sidecars, error = check_point_output(tmp, cfg.tasks, writes_sidecar(point.model.model))
    if rc != 0:
        error = f"lmms-eval exited with status {rc}" + (f" ({error})" if error else "")
    meta = {
        **point.to_dict(), "sweep": cfg.name, "tasks": cfg.tasks, "limit": cfg.limit,
        "batch_size": cfg.batch_size, "num_processes": cfg.num_processes,
        "command": [str(c).replace(str(tmp), str(final)) for c in cmd], "started": started,
        "finished": _now(), "seconds": round(seconds, 3), "returncode": rc,
        "results_files": [str(p.relative_to(tmp)) for p in results],
        "sidecars": [str(p.relative_to(tmp)) for p in sidecars],
        "status": "ok" if error is None else "failed", "error": error,
    }
    if error is None:
        write_json_atomic(tmp / POINT_FILE, meta)
        if final.exists():  # an unfinished or tampered folder; replace it
            _remove(final)
        os.replace(tmp, final)
        _remove(out / FAILED_DIR / point.id)
        return PointOutcome(point, "done", seconds)
    tail = _tail(log_path)
    meta["log_tail"] = tail
    write_json_atomic(tmp / "error.json", meta)
    failed = out / FAILED_DIR / point.id
    failed.parent.mkdir(exist_ok=True)
    _remove(failed)
    os.replace(tmp, failed)
    last = tail.splitlines()[-1].strip() if tail else ""
    return PointOutcome(point, "failed", seconds, error + (f"; last log line: {last[:200]}" if last else ""))
