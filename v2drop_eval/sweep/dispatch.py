"""Submit a sweep's points as submitit jobs (``local`` or ``slurm``) and follow them to the end.

Each job runs one point exactly as the inline runner does, into ``OUT/.tmp-<point-id>/``, which holds
the job's record (``job.json``) from submission on; the job renames it to ``OUT/<point-id>/`` (done)
or ``OUT/_failed/<point-id>/`` (failed). So the sweep directory alone says what every point is doing:
a point with a live job is never submitted again, and a job that died without finishing its point
(killed, timed out, out of memory, node failure) is recorded as a failed point with the scheduler's
reason, and resubmitted by the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from v2drop_eval.engine.atomic import write_json_atomic
from v2drop_eval.sweep.config import SweepConfig
from v2drop_eval.sweep.jobs import (
    job_log_tail,
    job_state,
    make_executor,
    refresh_jobs,
    run_point_job,
    sbatch_script,
    slurm_parameters,
    stop_local_job,
)
from v2drop_eval.sweep.layout import (
    ERROR_FILE,
    FAILED_DIR,
    LOG_NAME,
    POINT_FILE,
    TMP_PREFIX,
    JobRecord,
    now,
    point_lock,
    point_state_for,
    read_error,
    read_job,
    remove,
    tail,
    write_job,
    write_status,
)
from v2drop_eval.sweep.point import PointOutcome, SweepReport, outcome_line, prepare, print_dry_run_header
from v2drop_eval.sweep.points import Point

__all__ = ["settle_jobs", "record_dead_job", "run_jobs", "dry_run_jobs", "POLL_S"]

POLL_S = {"local": 0.5, "slurm": 30.0}  # how often a waiting sweep looks at its jobs (sacct is shared)
_CANCEL_WAIT_S = 20.0


def settle_jobs(out: Path, log: TextIO) -> dict[str, JobRecord]:
    """Look at every ``.tmp-*`` folder: keep those whose job is queued or running (returned by point
    id), record those whose job ended without finishing as failed, remove the rest (an inline run that
    was killed)."""
    live: dict[str, JobRecord] = {}
    records = {tmp: read_job(tmp) for tmp in sorted(out.glob(TMP_PREFIX + "*"))}
    refresh_jobs(r for r in records.values() if r is not None)
    for tmp, record in records.items():
        point_id = tmp.name[len(TMP_PREFIX):]
        if record is None:
            print(f"removing {tmp.name}, left by an interrupted run", file=log)
            remove(tmp)
            continue
        state, detail = job_state(record, refresh=False)
        if state != "ended":
            live[point_id] = record
        elif (error := record_dead_job(out, point_id, record, detail)) is not None:
            print(f"{point_id}: {error}; recorded as failed, to be resubmitted", file=log, flush=True)
    return live


def record_dead_job(out: Path, point_id: str, record: JobRecord, detail: str) -> str | None:
    """Move the point's folder to ``_failed/<point-id>`` with an ``error.json`` naming the job and why
    it ended; return the error (None: the job finished its point just before)."""
    with point_lock(out, point_id):
        return _record_dead_job_locked(out, point_id, record, detail)


def _record_dead_job_locked(out: Path, point_id: str, record: JobRecord, detail: str) -> str | None:
    tmp = out / (TMP_PREFIX + point_id)
    if not tmp.exists():
        return None
    record = read_job(tmp) or record  # with the pid and group the job wrote when it started
    error = f"{record.executor} job {record.job_id} ended ({detail}) before its point finished"
    log_tail = tail(tmp / LOG_NAME) or job_log_tail(record)
    write_json_atomic(tmp / ERROR_FILE, {
        "id": point_id, "status": "failed", "error": error, "job": asdict(record), "finished": now(),
        "log_tail": log_tail, "job_logs": record.logs})
    failed = out / FAILED_DIR / point_id
    failed.parent.mkdir(exist_ok=True)
    remove(failed)
    os.replace(tmp, failed)
    return error


@contextlib.contextmanager
def _sigint_ignored_by_children(executor: str) -> Iterator[None]:
    """Local jobs: submitit's controllers start (at the end of ``ex.batch()``) ignoring SIGINT, which they
    inherit, so a terminal's Ctrl-C to the sweep's process group prints no traceback of theirs; the sweep
    ends its jobs itself (SIGTERM to each job's group). This process ignores SIGINT for those milliseconds."""
    if executor != "local" or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _env_fix(executor: str) -> dict[str, str | None]:
    # submitit's local executor sets CUDA_VISIBLE_DEVICES itself ("" without gpus_per_node); a local
    # job sees the GPUs this sweep sees. SLURM sets it from the allocation: keep that.
    return {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")} if executor == "local" else {}


def _outcome_on_disk(out: Path, point: Point, cfg: SweepConfig, record: JobRecord) -> PointOutcome:
    """What a job whose folder has left ``.tmp-`` did: done, failed (its ``error.json``), or cancelled."""
    if point_state_for(cfg, point, out)[0] == "done":
        try:
            seconds = float(json.loads((out / point.id / POINT_FILE).read_text()).get("seconds") or 0)
        except (OSError, ValueError):
            seconds = 0.0
        return PointOutcome(point, "done", seconds)
    err = read_error(out, point.id)
    if err is None:
        return PointOutcome(point, "cancelled")
    last = (err.get("log_tail") or "").strip().splitlines()[-1:] or [""]
    error = str(err.get("error")) + (f"; last log line: {last[0].strip()[:200]}" if last[0].strip() else "")
    return PointOutcome(point, "failed", float(err.get("seconds") or 0), error)


def run_jobs(cfg: SweepConfig, points: list[Point], out: Path, log: TextIO, jobs: int, executor: str,
             wait: bool, live: dict[str, JobRecord]) -> SweepReport:
    """Submit every point not done and not already submitted; ``local``: ``jobs`` at a time, then wait
    for all; ``slurm``: one job array (``array_parallelism`` at a time), then wait only with ``wait``."""
    total = len(points)
    index = {p.id: i for i, p in enumerate(points, 1)}
    states = {p.id: point_state_for(cfg, p, out) for p in points}
    queue = [p for p in points if states[p.id][0] != "done" and p.id not in live]
    ours = {p.id for p in points}
    live = {pid: rec for pid, rec in live.items() if pid in ours}
    done_before = sum(state == "done" for state, _ in states.values())
    print(f"sweep {cfg.name}: {total} points, {done_before} done already, {len(live)} submitted already, "
          f"{len(queue)} to submit as {executor} jobs" + (f" ({jobs} at a time)" if executor == "local" else "")
          + f" -> {out}", file=log, flush=True)
    for note in cfg.notes:
        print(f"note: {note}", file=log)
    for p in queue:
        if states[p.id][0] == "redo":
            print(f"redo {p.id}: {states[p.id][1]}", file=log)
    results: dict[str, PointOutcome] = {}
    for p in points:
        if states[p.id][0] == "done" and p.id not in live:
            print(f"[{index[p.id]}/{total}] skip {p.id} (done)", file=log)
            results[p.id] = PointOutcome(p, "skipped")
        elif p.id in live:
            print(f"[{index[p.id]}/{total}] wait {p.id} (already submitted: {executor} job {live[p.id].job_id})",
                  file=log)
    if queue:
        prepare(cfg, queue, log)
    ex = make_executor(cfg, out, executor) if queue else None
    handles: dict[str, Any] = {}
    by_id = {p.id: p for p in points}
    started = time.monotonic()

    def submit(batch: list[Point]) -> None:
        for p in batch:
            tmp = out / (TMP_PREFIX + p.id)
            remove(tmp)
            tmp.mkdir()
        tokens = [uuid.uuid4().hex for _ in batch]  # only the job holding its point's token may finish it
        try:
            with _sigint_ignored_by_children(executor), ex.batch():  # slurm: one job array; local: a process each
                submitted = [ex.submit(run_point_job, cfg, p, out, _env_fix(executor), token)
                             for p, token in zip(batch, tokens, strict=True)]
        except Exception as exc:  # sbatch refused it (bad partition, account, ...): nothing was submitted
            for p in batch:
                remove(out / (TMP_PREFIX + p.id))
            raise RuntimeError(f"{executor}: submitting {len(batch)} point(s) failed: "
                               f"{' '.join(str(exc).split())[:500]}") from None
        for p, job, token in zip(batch, submitted, tokens, strict=True):
            record = JobRecord(executor=executor, job_id=str(job.job_id), submitted=now(), logs=str(job.paths.folder),
                               token=token)
            write_job(out / (TMP_PREFIX + p.id), record)
            live[p.id], handles[p.id] = record, job
            print(f"[{index[p.id]}/{total}] submit {p.id} -> {executor} job {job.job_id}", file=log, flush=True)

    try:
        if executor == "slurm" and queue:
            submit(queue)
            queue = []
        if executor == "slurm" and not wait:
            write_status(cfg, points, out, {})
            for p in points:
                results.setdefault(p.id, PointOutcome(p, "submitted"))
            print(f"sweep {cfg.name}: {len(live)} point(s) submitted or queued, {done_before} done. Follow them with "
                  f"`v2drop-eval status {out}`; run this command again to resubmit any that fail.", file=log, flush=True)
            return SweepReport([results[p.id] for p in points])
        while queue or live:
            if executor == "local":
                room = jobs - len(live)
                if room > 0 and queue:
                    submit(queue[:room])
                    queue = queue[room:]
            time.sleep(POLL_S[executor])
            refresh_jobs(live.values())
            for point_id, record in list(live.items()):
                outcome = _follow(out, by_id[point_id], cfg, record)
                if outcome is None:
                    continue
                del live[point_id]
                results[point_id] = outcome
                print(outcome_line(outcome, out, f"[{index[point_id]}/{total}] "), file=log, flush=True)
                write_status(cfg, points, out, {})
    except BaseException:
        _interrupted(out, executor, live, handles, log)
        raise
    write_status(cfg, points, out, {})
    for p in points:
        results.setdefault(p.id, PointOutcome(p, "cancelled"))
    report = SweepReport([results[p.id] for p in points])
    report.print(cfg.name, out, time.monotonic() - started, log)
    return report


def _follow(out: Path, point: Point, cfg: SweepConfig, record: JobRecord) -> PointOutcome | None:
    """The outcome of a point's job once it has one; None while it is queued or running."""
    tmp = out / (TMP_PREFIX + point.id)
    if tmp.exists():
        fresh = read_job(tmp)  # the job adds its pid and process group once it starts
        record = fresh if fresh is not None and fresh.token == record.token else record
        state, detail = job_state(record, refresh=False)
        if state != "ended":
            return None
        error = record_dead_job(out, point.id, record, detail)
        if error is not None:
            return PointOutcome(point, "failed", 0.0, error)
    return _outcome_on_disk(out, point, cfg, record)


def _interrupted(out: Path, executor: str, live: dict[str, JobRecord], handles: dict[str, Any], log: TextIO) -> None:
    """Ctrl-C or SIGTERM while waiting: local jobs are this machine's, so they are ended (their whole
    process groups, then checked gone) and their folders removed; SLURM jobs keep running (``status``
    follows them, the next run waits for them). A local job that cannot be ended keeps its folder and
    record: ``status`` shows it running and the next run waits for it, never runs the point beside it."""
    if executor != "local" or not live:
        if live:
            print(f"interrupted: {len(live)} {executor} job(s) keep running; `v2drop-eval status {out}` "
                  "follows them", file=sys.stderr)
        return
    for point_id in live:  # submitit's own cancel (SIGINT to the controller) first; ignored where SIGINT is
        if point_id in handles:
            with contextlib.suppress(Exception):
                handles[point_id].cancel(check=False)
    alive = []
    for point_id, record in live.items():
        tmp = out / (TMP_PREFIX + point_id)
        if not stop_local_job(tmp, record, grace_s=_CANCEL_WAIT_S / 2):
            alive.append(point_id)
            continue
        with point_lock(out, point_id):
            job = read_job(tmp)
            if job is None or job.token == record.token:
                remove(tmp)  # cancelled: nothing of it may look done or failed
    ended = len(live) - len(alive)
    print(f"interrupted: cancelled {ended} local job(s), their processes are gone; finished points are kept"
          + (f"; {len(alive)} could not be ended ({', '.join(alive)}): `v2drop-eval status {out}` shows them "
             "running, the next run waits for them" if alive else ""), file=log, flush=True)


def dry_run_jobs(cfg: SweepConfig, points: Sequence[Point], out: Path, executor: str,
                 log: TextIO | None = None) -> None:
    """What a run with ``executor`` would submit: every point's state and command, the executor's
    settings and, for slurm, the sbatch script of the job array."""
    log = log or sys.stdout
    print_dry_run_header(cfg, points, out, log, executor)
    todo = []
    for i, p in enumerate(points, 1):
        record = read_job(out / (TMP_PREFIX + p.id))
        state, why = point_state_for(cfg, p, out)
        if record is not None and state != "done":
            live, detail = job_state(record)
            what = (f"{live}: {record.executor} job {record.job_id}, not submitted again" if live != "ended"
                    else f"job {record.job_id} ended ({detail}): would be recorded as failed and resubmitted")
            if live == "ended":
                todo.append(p)
        elif state == "done":
            what = "done"
        else:
            what = "would submit" + (f" (to redo: {why})" if why else "")
            todo.append(p)
        print(f"[{i}/{len(points)}] {p.id} ({what})", file=log)
        print(f"    {cfg.shell_command(p, out / (TMP_PREFIX + p.id))}", file=log)
    print(f"{len(todo)} point(s) to submit", file=log)
    if executor == "slurm":
        print("slurm parameters: " + ", ".join(f"{k}={v!r}" for k, v in slurm_parameters(cfg).items()), file=log)
        if todo:
            print(f"sbatch script of the job array ({len(todo)} task(s)):", file=log)
            print(sbatch_script(cfg, out, len(todo)), file=log)
    log.flush()
