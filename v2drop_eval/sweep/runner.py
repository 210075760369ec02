"""Run a sweep: every point not done, inline (one lmms-eval process per point, ``jobs`` at a time) or
handed to :mod:`v2drop_eval.sweep.dispatch` as submitit jobs; resumable, atomic, failure-tolerant (the
folder layout: :mod:`v2drop_eval.sweep.layout`; one point: :mod:`v2drop_eval.sweep.point`).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from v2drop_eval.sweep import dispatch
from v2drop_eval.sweep.config import SweepConfig
from v2drop_eval.sweep.fields import EXECUTORS
from v2drop_eval.sweep.jobs import require_submitit
from v2drop_eval.sweep.layout import (
    TMP_PREFIX,
    JobRecord,
    fmt_time,
    point_state_for,
    remove,
    sweep_lock,
    write_status,
)
from v2drop_eval.sweep.origin import owner_problem, save_config
from v2drop_eval.sweep.point import (
    PointOutcome,
    RunFn,
    SweepReport,
    outcome_line,
    prepare,
    print_dry_run_header,
    run_point_in,
    stop_all,
    subprocess_run,
)
from v2drop_eval.sweep.points import Point

__all__ = ["run_sweep", "dry_run"]


def dry_run(cfg: SweepConfig, points: Sequence[Point], out: Path, log: TextIO | None = None) -> None:
    """Print every point, whether it is done, and the exact command that would run it."""
    log = log or sys.stdout
    print_dry_run_header(cfg, points, out, log)
    for i, p in enumerate(points, 1):
        state, why = point_state_for(cfg, p, out)
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
    force: bool = False,
) -> SweepReport:
    """Run every point not yet done, in order (``jobs`` at a time, default the config's ``jobs``);
    a failed point is recorded and the sweep goes on. ``executor`` (default the config's): ``inline``
    runs them here; ``local`` and ``slurm`` submit them as jobs (:mod:`v2drop_eval.sweep.dispatch`), and
    wait for them (``local`` always, ``slurm`` with ``wait``). A point whose job is queued or running
    is never started again. A folder of another sweep is refused (RuntimeError naming both) unless
    ``force`` (:mod:`v2drop_eval.sweep.origin`)."""
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
    error, _ = owner_problem(cfg, out, force)
    if error:
        raise RuntimeError(error)
    out.mkdir(parents=True, exist_ok=True)
    with sweep_lock(out):
        error, note = owner_problem(cfg, out, force)  # again, now that no other run can write it
        if error:
            raise RuntimeError(error)
        if note:
            print(f"note: {note}", file=log, flush=True)
        live = dispatch.settle_jobs(out, log)
        save_config(cfg, out)
        write_status(cfg, points, out, {})  # every point listed before the first runs (a kill -9 keeps the grid)
        if executor == "inline":
            return _run_locked(cfg, list(points), out, runner, log, jobs, live)
        return dispatch.run_jobs(cfg, list(points), out, log, jobs, executor, wait, live)


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
            eta = fmt_time(sum(done) / len(done) * self.left / self.jobs) if done else "?"
            elapsed = fmt_time(time.monotonic() - self.start)
        self.say(f"[{i}/{self.total}] run  {point.id}  elapsed {elapsed}  ETA {eta}")

    def finished(self, i: int, outcome: PointOutcome, out: Path) -> None:
        with self.lock:
            self.seconds[outcome.point.id] = outcome.seconds
            self.left -= 1
            self.bar.update(1)
        tag = f"[{i}/{self.total}] " if self.jobs > 1 else "      "
        if outcome.status in ("done", "failed"):
            self.say(outcome_line(outcome, out, tag))

    def close(self) -> None:
        self.bar.close()


def _run_locked(cfg: SweepConfig, points: list[Point], out: Path, runner: RunFn, log: TextIO,
                jobs: int, live: dict[str, JobRecord]) -> SweepReport:
    total = len(points)
    states = {p.id: point_state_for(cfg, p, out) for p in points}
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
        prepare(cfg, [p for p in points if p.id in todo], log)
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
            write_status(cfg, points, out, progress.seconds)
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
            stop_all()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    progress.close()
    write_status(cfg, points, out, progress.seconds)
    report = SweepReport([results[p.id] for p in points])
    report.print(cfg.name, out, time.monotonic() - progress.start, log)
    return report


def _run_point(cfg: SweepConfig, point: Point, out: Path, runner: RunFn, env: dict[str, str],
               cancel: threading.Event | None = None) -> PointOutcome:
    tmp = out / (TMP_PREFIX + point.id)
    remove(tmp)
    tmp.mkdir()
    return run_point_in(cfg, point, out, runner, env, tmp, cancel)


