"""Job lifecycle and folder ownership: a cancelled job is ended with everything it started (its process
group, checked gone), a job that outlives its cancellation never lands over a later point (the per-submission
token), ``status`` sees a job alive while any of its processes runs; a sweep folder belongs to one sweep, and
its saved config is read from where the sweep ran. The lmms-eval runs are the stand-in of ``sweep_fakes``."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_executors import FASTV, NONE, V2DROP, cli, wait_for
from test_sweep import FakeRunner, calls, small_cfg, write_cfg

from v2drop_eval.cli import main
from v2drop_eval.sweep.config import expand
from v2drop_eval.sweep.jobs import job_state, local_alive, stop_local_job
from v2drop_eval.sweep.layout import JobRecord, is_done, read_job, write_job
from v2drop_eval.sweep.point import run_point_in
from v2drop_eval.sweep.runner import run_sweep
from v2drop_eval.sweep.status import sweep_status


def _procs_writing_into(folder: Path) -> list[int]:
    """Pids of live processes whose command line names ``folder`` (the point runs name their --output_path)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((line for line in (proc / "status").read_text().splitlines() if line.startswith("State:")), "")
        except OSError:
            continue
        if str(folder) in cmdline and "zombie" not in state:
            pids.append(int(proc.name))
    return pids


def _own_group(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL)


# -- the token: only the submission that holds it finishes its point ------------------------------------------
def test_a_job_whose_submission_was_superseded_never_lands(tmp_path):
    cfg = small_cfg(tmp_path)
    point = expand(cfg)[0]
    out = cfg.output
    done = run_sweep(cfg, [point], runner=FakeRunner(), log=io.StringIO())
    assert done.ok and is_done(out / point.id)
    finished = (out / point.id / "point.json").read_bytes()
    # An old job (token "old") finishes after the sweep cancelled it and a newer run submitted the point
    # again (its record in the folder holds token "new"): the point finished later is left alone.
    tmp = out / f".tmp-{point.id}"
    tmp.mkdir()
    write_job(tmp, JobRecord(executor="local", job_id="1", submitted="t", logs="", token="new"))
    outcome = run_point_in(cfg, point, out, FakeRunner(), dict(os.environ), tmp, token="old")
    assert outcome.status == "cancelled" and "superseded" in outcome.error
    assert (out / point.id / "point.json").read_bytes() == finished and read_job(tmp).token == "new"
    # ... and one whose folder the sweep removed (cancelled) lands nowhere either.
    tmp_gone = out / f".tmp-{point.id}-x"
    tmp_gone.mkdir()
    outcome = run_point_in(cfg, point, out, FakeRunner(), dict(os.environ), tmp_gone, token="old")
    assert outcome.status == "cancelled" and (out / point.id / "point.json").read_bytes() == finished
    # The job that holds the token finishes the point as always.
    outcome = run_point_in(cfg, point, out, FakeRunner(), dict(os.environ), tmp, token="new")
    assert outcome.status == "done" and not tmp.exists()
    assert json.loads((out / point.id / "job.json").read_text())["token"] == "new"


# -- liveness and ending a job: its whole process group ---------------------------------------------------
def test_a_job_is_alive_while_its_process_group_is_and_stopping_it_ends_the_group(tmp_path):
    # The controller and the job process are gone (killed alone); the point's process runs on in the group.
    child = _own_group([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = JobRecord(executor="local", job_id="999999999", submitted="t", logs="", pid=None, pgid=child.pid)
        assert local_alive(record) and job_state(record)[0] == "running"
        assert stop_local_job(tmp_path, record, grace_s=5)
        assert child.wait(timeout=5) == -signal.SIGTERM
        assert not local_alive(record) and job_state(record) == ("ended", "its processes are gone")
    finally:
        child.kill()


def test_stopping_a_job_that_ignores_sigterm_kills_it(tmp_path):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        record = JobRecord(executor="local", job_id="999999999", submitted="t", logs="", pgid=child.pid)
        t0 = time.monotonic()
        assert stop_local_job(tmp_path, record, grace_s=0.5)
        assert child.wait(timeout=5) == -signal.SIGKILL and time.monotonic() - t0 < 10
    finally:
        child.kill()


def test_own_group_is_never_signalled(tmp_path):
    record = JobRecord(executor="local", job_id="999999999", submitted="t", logs="", pgid=os.getpgrp())
    assert not local_alive(record) and stop_local_job(tmp_path, record, grace_s=0.1)


# -- real local jobs (submitit) -----------------------------------------------------------------------------
def test_sigterm_ends_every_process_of_local_jobs_even_with_sigint_ignored(tmp_path):
    """A sweep started in the background by a script ignores SIGINT, and so did submitit's controllers,
    whose cancel is a SIGINT: the jobs and their lmms-eval runs lived on (issue 29: 2 orphans per 2 jobs),
    later replacing points finished by a rerun. Now the sweep ends each job's process group and checks."""
    pytest.importorskip("submitit")
    path = write_cfg(tmp_path, executor="local", jobs=2, methods=["none", "v2drop"])
    out = tmp_path / "sw"

    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = cli("sweep", str(path), env={"FAKE_LMMS_SLOW": "pretrained", "FAKE_LMMS_SLEEP": "60"},
               preexec_fn=ignore_sigint)
    wait_for(lambda: len(list(out.glob(".tmp-*/v2drop_llava/partial.txt"))) == 2
             and all((read_job(t) or JobRecord("", "", "", "")).pgid for t in out.glob(".tmp-*")))
    records = [read_job(t) for t in out.glob(".tmp-*")]
    assert len(_procs_writing_into(out)) >= 2  # the two lmms-eval runs
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, text
    assert "cancelled 2 local job(s), their processes are gone" in text
    assert _procs_writing_into(out) == [] and not any(local_alive(r) for r in records)
    assert not list(out.glob(".tmp-*")) and not (out / "_failed").exists()


def test_a_killed_controller_leaves_its_job_running_and_the_point_lands_with_its_log(tmp_path):
    """Issue 30: killing a local job's submitit process reported the point failed (the sweep's copy of the
    record had no pid) while its lmms-eval ran on and later landed as done without its log."""
    pytest.importorskip("submitit")
    path = write_cfg(tmp_path, executor="local", jobs=1, methods=["none"])
    out = tmp_path / "sw"
    proc = cli("sweep", str(path), env={"FAKE_LMMS_SLOW": "pretrained", "FAKE_LMMS_SLEEP": "6"})
    running = out / f".tmp-{NONE}"
    wait_for(lambda: (running / "v2drop_llava" / "partial.txt").exists() and (read_job(running) or
                                                                                JobRecord("", "", "", "")).pgid)
    record = read_job(running)
    os.kill(int(record.job_id), signal.SIGKILL)  # the controller (submitit's process of the job) alone
    time.sleep(1.5)
    assert [(p.id, p.state) for p in sweep_status(out)] == [(NONE, "running")]
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, text
    assert f"ok {NONE}" in text and "FAILED" not in text
    assert is_done(out / NONE) and (out / NONE / "lmms_eval.log").is_file()
    job = json.loads((out / NONE / "job.json").read_text())
    assert job["pid"] and job["pgid"] == job["pid"] and job["token"] == record.token


# -- one sweep per folder -----------------------------------------------------------------------------------
def test_another_sweep_into_a_sweep_folder_is_refused_unless_forced(tmp_path, capsys):
    path = write_cfg(tmp_path, methods=["none"])
    out = tmp_path / "sw"
    assert main(["sweep", str(path)]) == 0 and is_done(out / NONE)
    capsys.readouterr()
    other = tmp_path / "other.yaml"
    other.write_text(path.read_text().replace("name: t", "name: other"))
    for extra in ([], ["--dry-run"]):
        assert main(["sweep", str(other), "--output", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err
        assert f"{out} holds sweep 't' ({path.resolve()}, run in " in err and f"not 'other' ({other})" in err
        assert "--force" in err and "1 finished point(s)" in err
    assert len(calls(tmp_path)) == 1 and json.loads((out / "sweep.origin.json").read_text())["name"] == "t"
    assert main(["sweep", str(other), "--output", str(out), "--force"]) == 0
    text = capsys.readouterr().out
    assert "note: --force: running sweep 'other' into" in text and "which holds sweep 't'" in text
    assert "its 1 finished point(s) stay" in text
    assert json.loads((out / "sweep.origin.json").read_text())["name"] == "other"
    # the same sweep with an edited grid is the same sweep
    path.write_text(path.read_text().replace("name: t", "name: other").replace("- none", "- none\n- fastv"))
    assert main(["sweep", str(path), "--output", str(out)]) == 0


def test_status_reads_the_saved_config_from_where_the_sweep_ran(tmp_path, monkeypatch, capsys):
    """Relative paths in the saved config (a local model folder) are read from the folder the sweep ran
    in: `status` said "16 points: 8 done, 8 pending" in the checkout and "8 points: 8 done" in /tmp."""
    home = tmp_path / "project"
    (home / "models" / "m").mkdir(parents=True)
    (home / "models" / "m" / "config.json").write_text('{"model_type": "llava"}')
    monkeypatch.chdir(home)
    cfg = small_cfg(tmp_path, models=[{"name": "m7b", "family": "llava", "pretrained": "models/m", "num_layers": 32}])
    run_sweep(cfg, expand(cfg)[:2], runner=FakeRunner(), log=io.StringIO())
    here = [(p.id, p.state) for p in sweep_status(cfg.output)]
    assert here == [(NONE, "done"), (V2DROP, "done"), (FASTV, "pending")]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert [(p.id, p.state) for p in sweep_status(cfg.output)] == here
    assert main(["status", str(cfg.output)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("3 points: 2 done, 0 failed, 0 running, 0 queued, 1 pending")
    assert Path.cwd() == elsewhere


def test_ctrl_c_on_a_local_sweep_ends_its_jobs_quietly(tmp_path):
    """A terminal's Ctrl-C is a SIGINT to the whole foreground process group: the jobs used to print
    KeyboardInterrupt tracebacks. In sessions of their own, they are ended by the sweep, quietly."""
    pytest.importorskip("submitit")
    path = write_cfg(tmp_path, executor="local", jobs=2, methods=["none", "v2drop"])
    out = tmp_path / "sw"
    proc = cli("sweep", str(path), env={"FAKE_LMMS_SLOW": "pretrained", "FAKE_LMMS_SLEEP": "60"},
               start_new_session=True)  # the sweep's own group, as a terminal's foreground job
    wait_for(lambda: len(list(out.glob(".tmp-*/v2drop_llava/partial.txt"))) == 2
             and all((read_job(t) or JobRecord("", "", "", "")).pgid for t in out.glob(".tmp-*")))
    os.killpg(proc.pid, signal.SIGINT)
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, text
    assert "cancelled 2 local job(s)" in text and _procs_writing_into(out) == []
    logs = "".join(p.read_text() for p in (out / ".submitit").glob("*/*_log.err"))
    assert "Traceback" not in text and "KeyboardInterrupt" not in logs


def test_an_inline_point_is_ended_with_everything_it_started(tmp_path):
    """Inline points run in a session of their own: a timeout (or Ctrl-C) ends the whole group, so the
    ranks `accelerate launch` starts do not outlive the point."""
    from v2drop_eval.sweep.point import subprocess_run

    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    t0 = time.monotonic()
    assert subprocess_run([sys.executable, "-c", code], tmp_path / "log.txt", dict(os.environ), 3.0) == 124
    grandchild = int(pid_file.read_text())
    wait_for(lambda: not Path(f"/proc/{grandchild}").exists()
             or "Z" in (Path(f"/proc/{grandchild}/stat").read_text().rsplit(")", 1)[1].split() or ["Z"])[0], 10)
    assert time.monotonic() - t0 < 20 and "timed out: killed after 3 s" in (tmp_path / "log.txt").read_text()


@pytest.mark.slow
def test_real_local_smoke_sweep_killed_leaves_no_orphan_and_resumes(tmp_path):
    """The issue's probe on the real smoke config: a local sweep of two points, SIGTERM while both
    lmms-eval runs load (the sweep ignoring SIGINT, as when a script starts it in the background), then
    no process of it left; the rerun finishes both points and nothing replaces them afterwards."""
    pytest.importorskip("submitit")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "smoke"
    env = {**os.environ, "V2DROP_SMOKE_ASSETS": str(tmp_path / "assets"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "v2drop_eval.cli", "sweep", "configs/smoke.yaml", "--output", str(out),
           "--executor", "local", "--only", "tiny_llava__none", "--only", "tiny_qwen2_vl__none"]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    wait_for(lambda: len([p for p in _procs_writing_into(out) if p != proc.pid]) >= 4, 300)  # jobs + lmms-eval
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "cancelled 2 local job(s), their processes are gone" in text, text
    time.sleep(2)
    assert _procs_writing_into(out) == [] and not list(out.glob(".tmp-*"))
    again = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:]
    stamps = {p: (out / p / "point.json").stat().st_mtime_ns for p in ("tiny_llava__none", "tiny_qwen2_vl__none")}
    time.sleep(5)
    assert {p: (out / p / "point.json").stat().st_mtime_ns for p in stamps} == stamps
    assert _procs_writing_into(out) == []
