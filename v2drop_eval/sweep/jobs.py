"""Points as submitit jobs, ``local`` (parallel processes on this machine) or ``slurm`` (one job-array
task per point): the submitit executors, what a recorded job (``.tmp-<point-id>/job.json``,
:class:`~v2drop_eval.sweep.layout.JobRecord`) is doing now, and the function a job runs. Submitting and
following jobs is :mod:`v2drop_eval.sweep.dispatch`; the options are :mod:`v2drop_eval.sweep.fields`;
submitit is an optional extra.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from v2drop_eval.sweep.layout import (
    JOB_FILE,
    SUBMITIT_DIR,
    TMP_PREFIX,
    JobRecord,
    now,
    point_lock,
    read_job,
    remove,
    tail,
    write_job,
)
from v2drop_eval.sweep.point import run_point_in, subprocess_run

if TYPE_CHECKING:
    from v2drop_eval.sweep.config import SweepConfig
    from v2drop_eval.sweep.points import Point

__all__ = ["INSTALL_HINT", "require_submitit", "make_executor", "slurm_parameters", "sbatch_script", "job_state",
           "refresh_jobs", "job_log_tail", "local_alive", "stop_local_job", "run_point_job"]

INSTALL_HINT = "pip install -e \".[slurm]\" (or pip install 'submitit>=1.5')"
# States a SLURM job is alive in (sacct); UNKNOWN (sacct cannot tell yet) counts as alive: never submit twice.
_SLURM_QUEUED = {"PENDING", "REQUEUED", "CONFIGURING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED"}
_SLURM_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "UNKNOWN"}
_RECORD_WAIT_S = 60.0  # how long a started job waits for the record the sweep writes after submitting it


# -- submitit -------------------------------------------------------------------------------------
def require_submitit(executor: str) -> ModuleType:
    """``import submitit``, or an ImportError that says how to install it."""
    try:
        import submitit
    except ImportError:
        raise ImportError(f"executor {executor!r} needs submitit, which is not installed: {INSTALL_HINT}; "
                          "or use --executor inline") from None
    return submitit


def slurm_parameters(cfg: SweepConfig) -> dict[str, Any]:
    """The ``SlurmExecutor`` parameters of the config's points (one task per point, one node)."""
    opts = cfg.slurm
    params: dict[str, Any] = {
        "job_name": opts["job_name"] or f"v2drop-{cfg.name}",
        "time": opts["time_min"],
        "nodes": 1,
        "ntasks_per_node": 1,  # one task runs `accelerate launch`, which starts num_processes ranks
        "cpus_per_task": opts["cpus_per_task"],
        "gpus_per_node": cfg.num_processes if opts["gpus"] is None else opts["gpus"],
        "array_parallelism": opts["array_parallelism"],
        "setup": list(opts["setup"]),
    }
    if opts["mem_gb"] is not None:
        params["mem"] = f"{int(round(opts['mem_gb'] * 1024))}MB"
    for key in ("partition", "account", "qos", "constraint"):
        if opts[key] is not None:
            params[key] = opts[key]
    if not params["gpus_per_node"]:
        del params["gpus_per_node"]
    if opts["additional"]:
        params["additional_parameters"] = dict(opts["additional"])
    return params


def _local_timeout_min(cfg: SweepConfig) -> float:
    # submitit kills a local job after timeout_min (default 2); the point's own timeout is enforced
    # inside the job, so give the job that plus a margin, or a week without one.
    return (cfg.timeout / 60 + 5) if cfg.timeout else 7 * 24 * 60


def make_executor(cfg: SweepConfig, out: Path, executor: str) -> Any:
    """The submitit executor whose jobs write into ``out/.submitit/<job id>/``."""
    submitit = require_submitit(executor)
    folder = out / SUBMITIT_DIR / "%j"
    if executor == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=_local_timeout_min(cfg))
        return ex
    ex = submitit.SlurmExecutor(folder=folder)
    try:
        ex.update_parameters(**slurm_parameters(cfg))
    except ValueError as exc:
        raise ValueError(f"slurm options: {' '.join(str(exc).split())}") from None
    return ex


def sbatch_script(cfg: SweepConfig, out: Path, points: int) -> str:
    """The sbatch script a job array of ``points`` points gets (what ``--dry-run`` shows)."""
    require_submitit("slurm")
    from submitit.slurm.slurm import _make_sbatch_string  # the text SlurmExecutor submits

    params = slurm_parameters(cfg)
    if points > 1:
        params["map_count"] = points
    folder = out / SUBMITIT_DIR / "%j"
    command = f"{sys.executable} -u -m submitit.core._submit {folder}"
    return _make_sbatch_string(command=command, folder=folder, **params)


def _proc_alive(pid: int | None, marker: str) -> bool:
    """``pid`` runs and is a submitit process (its command line holds ``marker``; pids are reused)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        if sys.platform == "linux":
            return False
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return marker in cmdline


def _group_alive(pgid: int | None) -> bool:
    """Some process of the group ``pgid`` still runs, zombies aside (never this process's own group)."""
    if not pgid or pgid == os.getpgrp():
        return False
    if sys.platform == "linux":
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:  # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def local_alive(record: JobRecord) -> bool:
    """A local job still runs: its submitit controller, its job process, or anything of its process group
    (the lmms-eval run and its ranks; they outlive a controller or job process killed alone)."""
    return (_proc_alive(int(record.job_id), "submitit") or _proc_alive(record.pid, "submitit")
            or _group_alive(record.pgid))


def _signal_job(record: JobRecord, sig: int) -> None:
    targets = [(os.killpg, record.pgid)] if record.pgid and record.pgid != os.getpgrp() else []
    targets += [(os.kill, pid) for pid in (record.pid, int(record.job_id))
                if pid and _proc_alive(pid, "submitit")]
    for kill, pid in targets:
        try:
            kill(pid, sig)
        except OSError:
            pass


def stop_local_job(folder: Path, record: JobRecord, grace_s: float = 10.0) -> bool:
    """End a local job for good: SIGTERM to its process group, job process and controller, SIGKILL after
    ``grace_s``; True once none of them is left. The record is read again from ``folder`` each round,
    since a job that has just started writes its pid and group there."""
    deadline, sig = time.monotonic() + grace_s, signal.SIGTERM
    while True:
        fresh = read_job(folder)
        if fresh is not None and fresh.token == record.token:
            record = fresh
        if not local_alive(record):
            return True
        if time.monotonic() > deadline:
            if sig == signal.SIGKILL:
                return False
            sig, deadline = signal.SIGKILL, time.monotonic() + 5.0
        _signal_job(record, sig)
        time.sleep(0.2)


def refresh_jobs(records: Iterable[JobRecord]) -> None:
    """Ask SLURM about all these jobs in one ``sacct`` call (then :func:`job_state` reads the answer)."""
    slurm = [r for r in records if r.executor == "slurm"]
    if slurm:
        watcher = require_submitit("slurm").SlurmJob.watcher
        for record in slurm:
            watcher.register_job(record.job_id)
        watcher.update()


def job_state(record: JobRecord, refresh: bool = True) -> tuple[str, str]:
    """``(state, detail)``: state ``queued``, ``running`` or ``ended``; detail the scheduler's word
    (a SLURM state such as TIMEOUT, OUT_OF_MEMORY, CANCELLED) or why the job counts as ended.
    ``refresh=False``: use the answer of the last :func:`refresh_jobs`."""
    if record.executor == "local":
        return ("running", "RUNNING") if local_alive(record) else ("ended", "its processes are gone")
    if refresh:
        refresh_jobs([record])
    watcher = require_submitit(record.executor).SlurmJob.watcher
    state = str(watcher.get_info(record.job_id, mode="cache").get("State") or "UNKNOWN").split()[0]
    if state in _SLURM_QUEUED:
        return "queued", state
    if state in _SLURM_RUNNING:
        return "running", state
    return "ended", state


def job_log_tail(record: JobRecord, lines: int = 15) -> str:
    """The last lines of the job's submitit stderr (then stdout) log."""
    folder = Path(record.logs)
    for name in (f"{record.job_id}_0_log.err", f"{record.job_id}_0_log.out"):
        text = tail(folder / name, lines)
        if text.strip():
            return text
    return ""


# -- the job ---------------------------------------------------------------------------------------
def _own_session() -> None:
    """Make this job process the leader of a session of its own, so that the sweep (or ``status``) can
    end, or see, the job with everything it started as one process group; a terminal's Ctrl-C reaches
    the sweep only, which cancels its jobs. SIGTERM and SIGINT then end the job quietly (submitit
    ignores SIGTERM in a job; the point's ``finally`` still ends its lmms-eval process). Local jobs only:
    SLURM ends a job's whole cgroup itself, and submitit's SIGTERM/USR2 handling there stays as it is."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "local":
        return  # a SLURM task, or called in-process (tests): leave the session and signals alone
    with contextlib.suppress(OSError):
        os.setsid()

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def run_point_job(cfg: SweepConfig, point: Point, out: Path, env_fix: dict[str, str | None],
                  token: str | None = None) -> dict[str, Any]:
    """What each submitted job runs: the point, exactly as inline (``runner.run_point_in``), into its
    ``.tmp-<point-id>`` folder, which the sweep created and recorded the job in. ``env_fix``: variables
    to set (None: unset) before the config's ``env``; local jobs get the sweep's CUDA_VISIBLE_DEVICES
    back, which submitit's local executor overwrites. ``token``: this submission's (in its record); a job
    whose folder is gone or holds another submission's record was cancelled, and does nothing."""
    import socket

    _own_session()
    tmp = out / (TMP_PREFIX + point.id)
    if not tmp.is_dir():
        return {"status": "cancelled", "error": f"{tmp} is gone: the sweep cancelled this job", "seconds": 0.0}
    deadline = time.monotonic() + _RECORD_WAIT_S
    record = read_job(tmp)
    while record is None and time.monotonic() < deadline and tmp.is_dir():  # written right after submitting
        time.sleep(0.2)
        record = read_job(tmp)
    if record is None:
        import submitit

        env = submitit.JobEnvironment()
        record = JobRecord(executor=str(env.cluster), job_id=str(env.job_id), submitted=now(),
                           logs=str(out / SUBMITIT_DIR / str(env.job_id)), token=token)
    with point_lock(out, point.id):
        if not tmp.is_dir() or (token is not None and record.token != token):
            return {"status": "cancelled", "error": "the sweep cancelled or resubmitted this point", "seconds": 0.0}
        record.pid, record.host, record.started = os.getpid(), socket.gethostname(), now()
        record.pgid = os.getpgrp() if os.getpgrp() == os.getpid() else None  # a group of its own only
        write_job(tmp, record)
    for entry in tmp.iterdir():  # what an earlier attempt of a requeued job left
        if entry.name != JOB_FILE and not entry.name.startswith("."):
            remove(entry)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key, value in env_fix.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    env.update(cfg.env)
    runner = functools.partial(subprocess_run, new_session=False)  # its lmms-eval stays in the job's group
    outcome = run_point_in(cfg, point, out, runner, env, tmp, token=record.token)
    return {"status": outcome.status, "error": outcome.error, "seconds": outcome.seconds}
