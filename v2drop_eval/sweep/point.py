"""Running one point: the lmms-eval process, the check of what it wrote, the atomic rename that makes it
done (or failed), and the outcome records the inline runner and the job dispatcher share, with the one
summary they print. Also the config's ``prepare`` step."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from v2drop_eval.engine.atomic import write_json_atomic
from v2drop_eval.methods.rules import local_model_problem
from v2drop_eval.sweep.layout import (
    ERROR_FILE,
    FAILED_DIR,
    LOG_NAME,
    POINT_FILE,
    cause_line,
    fmt_time,
    now,
    point_lock,
    read_job,
    remove,
    replace_dir,
    tail,
)
from v2drop_eval.sweep.pointcheck import check_point_files, point_settings, writes_sidecar
from v2drop_eval.sweep.preflight import checkpoint_problems, task_problems

if TYPE_CHECKING:
    from v2drop_eval.sweep.config import SweepConfig
    from v2drop_eval.sweep.points import Point

__all__ = ["print_dry_run_header", "RunFn", "PointOutcome", "SweepReport", "PrepareError", "subprocess_run", "stop_all", "check_point_output",
           "run_point_in", "prepare", "preflight_problems", "outcome_line"]

# cmd, log file, environment, timeout (s) -> exit status. Tests pass a fake; real runs use subprocess_run.
RunFn = Callable[[Sequence[str], Path, dict[str, str], "float | None"], int]


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
                 + f", in {fmt_time(seconds)}"]
        lines += [f"  failed: {o.point.id}: {o.error} (see {out / FAILED_DIR / o.point.id})" for o in self.failed]
        return "\n".join(lines)

    def print(self, name: str, out: Path, seconds: float, log: TextIO) -> None:
        """The closing lines, as inline and job sweeps both end."""
        print(self.summary(name, out, seconds), file=log, flush=True)
        log.flush()


def outcome_line(outcome: PointOutcome, out: Path, tag: str = "") -> str:
    """The line a sweep prints when a point ends (inline or as a job); ``tag`` e.g. ``[3/8] ``."""
    pid = outcome.point.id
    if outcome.status == "done":
        return f"{tag}ok {pid} in {outcome.seconds:.1f}s -> {out / pid}"
    if outcome.status == "failed":
        return f"{tag}FAILED {pid}: {outcome.error}"
    return f"{tag}{outcome.status} {pid}"


# -- the process ------------------------------------------------------------------------------------
def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the child gets SIGKILL if the sweep dies, so no orphan keeps writing a temp folder."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_ACTIVE: dict[subprocess.Popen, bool] = {}  # running point processes: whether each leads its own group
_ACTIVE_LOCK = threading.Lock()
_TERM_GRACE_S = 10.0


def _signal_tree(proc: subprocess.Popen, sig: int, group: bool) -> None:
    """``sig`` to the process, or to its whole process group (its own session: accelerate's ranks too)."""
    with contextlib.suppress(OSError):
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)


def _end(proc: subprocess.Popen, group: bool) -> None:
    """SIGTERM, then SIGKILL after a grace period; a group is signalled again until none of it is left."""
    _signal_tree(proc, signal.SIGTERM, group)
    try:
        proc.wait(timeout=_TERM_GRACE_S)
    except subprocess.TimeoutExpired:
        _signal_tree(proc, signal.SIGKILL, group)
        proc.wait()
    if group:  # children of the point that outlived its main process
        _signal_tree(proc, signal.SIGKILL, group)


def stop_all() -> None:
    """Terminate every point process still running, with its process group (parallel sweeps, on interruption)."""
    with _ACTIVE_LOCK:
        procs = list(_ACTIVE.items())
    for proc, group in procs:
        _signal_tree(proc, signal.SIGTERM, group)


def subprocess_run(cmd: Sequence[str], log_path: Path, env: dict[str, str], timeout: float | None,
                   new_session: bool = True) -> int:
    """Run ``cmd`` with stdout and stderr into ``log_path``; kill it on timeout or interruption.
    ``new_session``: the point runs in its own session, and ending it ends its whole process group (the
    inline runner); a submitted job is a session of its own already, so its point stays in it."""
    group = new_session and sys.platform != "win32"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=group,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        with _ACTIVE_LOCK:
            _ACTIVE[proc] = group
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.write(f"\n[v2drop-eval sweep] timed out: killed after {timeout:g} s\n".encode())
            log.flush()
            return 124
        finally:
            if proc.poll() is None or group:
                _end(proc, group)
            with _ACTIVE_LOCK:
                _ACTIVE.pop(proc, None)


def check_point_output(workdir: Path, tasks: Sequence[str], need_sidecar: bool = False
                       ) -> tuple[list[Path], list[Path], str | None]:
    """``(results files, side-cars, error)``: lmms-eval exits 0 even when a run failed, so a point counts
    only if its output passes :func:`v2drop_eval.sweep.pointcheck.check_point_files`."""
    found = check_point_files(workdir, tasks, need_sidecar)
    return found.results, found.sidecars, found.problem


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


def prepare(cfg: SweepConfig, points: Sequence[Point], log: TextIO) -> None:
    """Run the config's ``prepare`` step; then every local model folder must exist and be of its family,
    and every task must be known (:mod:`v2drop_eval.sweep.preflight`): all before the first point."""
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
    problems = preflight_problems(cfg, points)
    if problems:
        raise PrepareError("; ".join(problems) + " (nothing ran)")


def preflight_problems(cfg: SweepConfig, points: Sequence[Point]) -> list[str]:
    """The config's tasks and the points' local checkpoints, checked against the files they name."""
    models = {p.model.name: p.model for p in points}.values()
    return (task_problems(cfg.tasks, cfg.include_path)
            + checkpoint_problems((m.name, m.family, m.pretrained) for m in models))


def run_point_in(cfg: SweepConfig, point: Point, out: Path, runner: RunFn, env: dict[str, str], tmp: Path,
                 cancel: threading.Event | None = None, token: str | None = None) -> PointOutcome:
    """Run ``point`` into the existing folder ``tmp``; then rename it to the point's folder (done) or to
    ``_failed/<point-id>`` (failed). Interrupted: ``tmp`` is removed. Inline and submitted jobs alike.
    ``token`` (a submitted job's): the rename happens only while ``tmp`` still holds the job record of
    this submission; a job that outlived its cancellation (the sweep removed or failed its folder, or
    submitted the point again) leaves every point alone."""
    cmd = cfg.command(point, tmp)
    started, t0 = now(), time.monotonic()
    log_path = tmp / LOG_NAME
    log_path.write_text(f"$ {cfg.shell_command(point, tmp)}\n")
    try:
        rc = runner(cmd, log_path, env, cfg.timeout)
    except BaseException:
        if token is None:  # interrupted (Ctrl-C, SIGTERM): leave nothing behind that could look done
            remove(tmp)
        raise  # a job's folder is the sweep's to remove (cancelled) or fail (with the scheduler's reason)
    seconds = time.monotonic() - t0
    if cancel is not None and cancel.is_set():
        remove(tmp)
        return PointOutcome(point, "cancelled", seconds)
    if token is None:
        return _finish(cfg, point, out, tmp, cmd, started, seconds, rc)
    with point_lock(out, point.id):
        record = read_job(tmp)
        if record is None or record.token != token:
            return PointOutcome(point, "cancelled", seconds, "superseded: the sweep cancelled this submission")
        return _finish(cfg, point, out, tmp, cmd, started, seconds, rc)


def _finish(cfg: SweepConfig, point: Point, out: Path, tmp: Path, cmd: list[str], started: str, seconds: float,
            rc: int) -> PointOutcome:
    """Check what the run wrote; rename ``tmp`` to the point's folder (done) or ``_failed/<point-id>``."""
    final = out / point.id
    log_path = tmp / LOG_NAME
    results, sidecars, error = check_point_output(tmp, cfg.tasks, writes_sidecar(point.model.model))
    if rc != 0:
        error = f"lmms-eval exited with status {rc}" + (f" ({error})" if error else "")
    meta = {
        **point.to_dict(), "sweep": cfg.name, "tasks": cfg.tasks, "limit": cfg.limit,
        "batch_size": cfg.batch_size, "num_processes": cfg.num_processes,
        "command": [str(c).replace(str(tmp), str(final)) for c in cmd], "started": started,
        "finished": now(), "seconds": round(seconds, 3), "returncode": rc,
        "results_files": [str(p.relative_to(tmp)) for p in results],
        "sidecars": [str(p.relative_to(tmp)) for p in sidecars],
        "status": "ok" if error is None else "failed", "error": error,
        "settings": point_settings(cfg, point),
    }
    if error is None:
        write_json_atomic(tmp / POINT_FILE, meta)
        replace_dir(tmp, final)  # an earlier run (other settings, or damaged) goes as a whole
        remove(out / FAILED_DIR / point.id)
        return PointOutcome(point, "done", seconds)
    log_tail = tail(log_path, 40)
    meta["log_tail"] = log_tail
    meta["cause"] = cause_line(log_tail)
    write_json_atomic(tmp / ERROR_FILE, meta)
    failed = out / FAILED_DIR / point.id
    failed.parent.mkdir(exist_ok=True)
    remove(failed)
    os.replace(tmp, failed)
    last = meta["cause"] or (log_tail.splitlines()[-1].strip() if log_tail else "")
    why = "cause" if meta["cause"] else "last log line"
    return PointOutcome(point, "failed", seconds, error + (f"; {why}: {last[:300]}" if last else ""))


def print_dry_run_header(cfg: SweepConfig, points: Sequence[Point], out: Path, log: TextIO,
                         executor: str | None = None) -> None:
    """The first lines of every dry run: the sweep, its notes and its prepare step."""
    where = f" (executor {executor})" if executor else ""
    print(f"sweep {cfg.name}: {len(points)} points -> {out}{where}", file=log)
    for note in cfg.notes:
        print(f"note: {note}", file=log)
    if cfg.prepare:
        print(f"prepare: {cfg.prepare['call']}({cfg.prepare['args']})", file=log)
