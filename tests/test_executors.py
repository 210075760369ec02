"""Sweeps through submitit (local jobs for real, SLURM with stand-in sbatch/sacct/srun), ``status``, and
the executor options; the lmms-eval runs are the stand-in of ``sweep_fakes``."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from test_sweep import FakeRunner, calls, small_cfg, write_cfg

from v2drop_eval.cli import main
from v2drop_eval.sweep.config import expand, load_config
from v2drop_eval.sweep.layout import is_done
from v2drop_eval.sweep.runner import run_sweep

REPO = Path(__file__).resolve().parents[1]
NONE, V2DROP, FASTV = "m7b__none", "m7b__v2drop__b128__l2", "m7b__fastv__b128"


def cli(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "v2drop_eval.cli", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def wait_for(condition, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and not condition():
        time.sleep(0.1)
    assert condition()


# -- config and command-line checks (no submitit needed) ------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"executor": "kubernetes"}, "unknown executor 'kubernetes'; known executors: inline, local, slurm"),
    ({"slurm": {"partiton": "gpu"}}, "slurm: unknown option 'partiton'; known options: partition, time_min"),
    ({"slurm": {"time_min": "2h"}}, "slurm.time_min: '2h' is not allowed; expected int"),
    ({"slurm": {"cpus_per_task": 0}}, "slurm.cpus_per_task: 0 is not allowed; expected a number >= 1"),
    ({"slurm": ["gpu"]}, "slurm: expected a mapping of options"),
])
def test_bad_executor_options_refused_before_anything_runs(tmp_path, capsys, change, message):
    path = write_cfg(tmp_path, **change)
    assert main(["sweep", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "sw").exists() and calls(tmp_path) == []


def test_unknown_executor_on_the_command_line(tmp_path, capsys):
    path = write_cfg(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["sweep", str(path), "--executor", "pbs"])
    assert exc.value.code == 2
    assert "--executor: invalid choice: 'pbs' (choose from 'inline', 'local', 'slurm')" in capsys.readouterr().err


def test_missing_submitit_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    path = write_cfg(tmp_path)
    for extra in ([], ["--dry-run"]):
        assert main(["sweep", str(path), "--executor", "local", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "executor 'local' needs submitit" in err and 'pip install -e ".[slurm]"' in err
    assert not (tmp_path / "sw").exists() and calls(tmp_path) == []
    # inline needs nothing more
    assert main(["sweep", str(path), "--only", "none"]) == 0 and len(calls(tmp_path)) == 1


def test_status_of_done_failed_and_missing_points(tmp_path, capsys):
    cfg = small_cfg(tmp_path)
    none, v2drop, fastv = expand(cfg)
    run_sweep(cfg, [none, fastv], runner=FakeRunner(fail=["method=fastv"]), log=io.StringIO())
    out = cfg.output
    assert main(["status", str(out)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [NONE, "done"]
    assert lines[1].split() == [V2DROP, "pending"]
    assert lines[2].startswith(FASTV) and " failed   lmms-eval exited with status 1" in lines[2]
    assert lines[3] == f"{out}: 3 points: 1 done, 1 failed, 0 running, 0 queued, 0 pending".replace(
        "0 pending", "1 pending")
    assert main(["status", str(out), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["summary"] == {"points": 3, "done": 1, "failed": 1, "running": 0, "queued": 0, "pending": 1}
    assert [(p["id"], p["state"]) for p in data["points"]] == [(NONE, "done"), (V2DROP, "pending"), (FASTV, "failed")]
    run_sweep(cfg, expand(cfg), runner=FakeRunner(), log=io.StringIO())
    assert main(["status", str(out)]) == 0
    assert capsys.readouterr().out.endswith("3 points: 3 done, 0 failed, 0 running, 0 queued, 0 pending\n")
    assert main(["status", str(tmp_path / "nowhere")]) == 2


# -- submitit's local executor: real subprocess jobs -----------------------------------------------------
def test_local_jobs_run_points_and_a_killed_job_is_failed_then_resumed(tmp_path):
    pytest.importorskip("submitit")
    path = write_cfg(tmp_path, executor="local", jobs=2)
    out = tmp_path / "sw"
    proc = cli("sweep", str(path), env={"FAKE_LMMS_SLOW": "method=v2drop", "FAKE_LMMS_SLEEP": "60"})
    running = out / f".tmp-{V2DROP}"
    wait_for(lambda: (running / "v2drop_llava" / "partial.txt").exists() and (running / "job.json").exists())
    job = json.loads((running / "job.json").read_text())
    assert job["executor"] == "local" and job["pid"] and job["logs"].startswith(str(out / ".submitit"))
    os.kill(job["pid"], signal.SIGKILL)  # the job dies under its point, as a node or an OOM killer would do it
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, text
    assert f"submit {NONE} -> local job" in text and f"ok {NONE}" in text and f"ok {FASTV}" in text
    assert f"FAILED {V2DROP}: local job {job['job_id']} ended (its processes are gone) before its point finished" in text
    err = json.loads((out / "_failed" / V2DROP / "error.json").read_text())
    assert err["job"]["job_id"] == job["job_id"] and not running.exists()
    done = {pid: (out / pid / "point.json").stat().st_mtime_ns for pid in (NONE, FASTV)}
    assert json.loads((out / NONE / "job.json").read_text())["executor"] == "local"  # which job made it

    status = cli("status", str(out))
    text, _ = status.communicate(timeout=60)
    assert status.returncode == 1 and f"failed   local job {job['job_id']} ended" in text, text

    again = cli("sweep", str(path))
    text, _ = again.communicate(timeout=120)
    assert again.returncode == 0, text
    assert f"skip {NONE} (done)" in text and f"submit {V2DROP} -> local job" in text and "1 ran ok" in text
    ran = calls(tmp_path)
    assert [sum(f"method={m}" in c for c in ran) for m in ("none", "v2drop", "fastv")] == [1, 2, 1]
    assert {pid: (out / pid / "point.json").stat().st_mtime_ns for pid in done} == done  # nothing finished is lost
    assert all(is_done(out / p) for p in (NONE, V2DROP, FASTV)) and not list(out.glob(".tmp-*"))
    assert not (out / "_failed" / V2DROP).exists()


@pytest.mark.slow
def test_killed_sweep_leaves_its_jobs_running_and_the_rerun_waits_for_them(tmp_path):
    pytest.importorskip("submitit")
    path = write_cfg(tmp_path, executor="local", jobs=3)
    out = tmp_path / "sw"
    proc = cli("sweep", str(path), env={"FAKE_LMMS_SLOW": "method=v2drop", "FAKE_LMMS_SLEEP": "8"})
    wait_for(lambda: (out / f".tmp-{V2DROP}" / "v2drop_llava" / "partial.txt").exists() and is_done(out / NONE))
    job = json.loads((out / f".tmp-{V2DROP}" / "job.json").read_text())
    proc.kill()  # SIGKILL: the sweep cannot cancel anything; its jobs are on their own (as on a cluster)
    proc.wait(timeout=30)  # not communicate(): the jobs hold its stdout open

    status = cli("status", str(out))
    text, _ = status.communicate(timeout=60)
    assert status.returncode == 0 and f"running  local job {job['job_id']}" in text, text

    again = cli("sweep", str(path))
    text, _ = again.communicate(timeout=120)
    assert again.returncode == 0, text
    assert f"wait {V2DROP} (already submitted: local job {job['job_id']})" in text and f"ok {V2DROP}" in text
    assert f"submit {V2DROP}" not in text
    ran = calls(tmp_path)
    assert [sum(f"method={m}" in c for c in ran) for m in ("none", "v2drop", "fastv")] == [1, 1, 1]
    assert all(is_done(out / p) for p in (NONE, V2DROP, FASTV))



def test_sigterm_cancels_local_jobs_and_leaves_nothing_half_done(tmp_path):
    pytest.importorskip("submitit")
    path = write_cfg(tmp_path, executor="local", jobs=2, methods=["none", "v2drop"])
    out = tmp_path / "sw"
    proc = cli("sweep", str(path), env={"FAKE_LMMS_SLOW": "pretrained", "FAKE_LMMS_SLEEP": "60"})
    wait_for(lambda: len(list(out.glob(".tmp-*/v2drop_llava/partial.txt"))) == 2
             and len(list(out.glob(".tmp-*/job.json"))) == 2)
    jobs = [json.loads(p.read_text()) for p in out.glob(".tmp-*/job.json")]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert not list(out.glob(".tmp-*")) and not (out / "_failed").exists()
    from v2drop_eval.sweep.jobs import job_state
    from v2drop_eval.sweep.layout import JobRecord

    assert [job_state(JobRecord(**j))[0] for j in jobs] == ["ended", "ended"]
    assert len(calls(tmp_path)) == 2

# -- SLURM: stand-in sbatch / sacct / srun; the submission script is checked, not run -------------------
FAKE_SBATCH = textwrap.dedent("""\
    #!/bin/sh
    n=$(ls "$FAKE_SLURM" | grep -c '^script' || true)
    cp "$1" "$FAKE_SLURM/script$n.sh"
    echo "Submitted batch job $((4241 + n))"
""")
FAKE_SACCT = textwrap.dedent("""\
    #!/bin/sh
    echo "JobID|State|NodeList"
    cat "$FAKE_SLURM/sacct.txt" 2>/dev/null || true
""")


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir()
    state.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("sacct", FAKE_SACCT), ("srun", "#!/bin/sh\nexit 0\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(state))
    submitit.SlurmJob.watcher.clear()
    yield state
    submitit.SlurmJob.watcher.clear()


SLURM_OPTIONS = {"partition": "gpu", "time_min": 240, "cpus_per_task": 16, "mem_gb": 64, "account": "vlm-lab",
                 "qos": "normal", "array_parallelism": 2, "setup": ["module load cuda/12.4", "source .venv/bin/activate"]}


def test_slurm_submission_script_status_and_dead_jobs(tmp_path, capsys, fake_slurm):
    path = write_cfg(tmp_path, executor="slurm", num_processes=2, slurm=SLURM_OPTIONS)
    out = tmp_path / "sw"
    assert main(["sweep", str(path), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert f"[2/3] {V2DROP} (would submit)" in dry and "3 point(s) to submit" in dry
    assert "#SBATCH --array=0-2%2" in dry and not list(fake_slurm.glob("script*")) and not out.exists()

    assert main(["sweep", str(path)]) == 0
    text = capsys.readouterr().out
    assert [f"submit {p} -> slurm job 4241_{i}" in text for i, p in enumerate((NONE, V2DROP, FASTV))] == [True] * 3
    assert f"v2drop-eval status {out}" in text and calls(tmp_path) == []
    script = (fake_slurm / "script0.sh").read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --cpus-per-task=16",
                 "#SBATCH --mem=65536MB", "#SBATCH --time=240", "#SBATCH --account=vlm-lab", "#SBATCH --qos=normal",
                 "#SBATCH --array=0-2%2", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --job-name=v2drop-t", f"#SBATCH --output={out}/.submitit/%A_%a/%A_%a_0_log.out",
                 "module load cuda/12.4", "source .venv/bin/activate"):
        assert line in script.splitlines(), (line, script)
    assert f"-u -m submitit.core._submit {out}/.submitit/%j" in script and script.count("srun ") == 1
    assert dry.split("sbatch script of the job array (3 task(s)):\n")[1].strip() == script.strip()
    records = {p: json.loads((out / f".tmp-{p}" / "job.json").read_text()) for p in (NONE, V2DROP, FASTV)}
    assert [r["job_id"] for r in records.values()] == ["4241_0", "4241_1", "4241_2"]

    (fake_slurm / "sacct.txt").write_text("4241_0|PENDING|None\n4241_1|PENDING|None\n4241_2|RUNNING|node7\n")
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{V2DROP}  queued   slurm job 4241_1 (PENDING)" in text and "running  slurm job 4241_2 (RUNNING)" in text
    assert main(["sweep", str(path)]) == 0  # nothing is submitted twice
    assert "0 to submit" in capsys.readouterr().out and len(list(fake_slurm.glob("script*"))) == 1
    assert main(["sweep", str(path), "--executor", "inline"]) == 0  # nor run here while its job is queued
    text = capsys.readouterr().out
    assert f"skip {V2DROP} (submitted: slurm job 4241_1)" in text and calls(tmp_path) == []

    # The first task runs (the job's own function, here in-process); the second times out; the third runs on.
    cfg = load_config(path)
    from v2drop_eval.sweep.jobs import run_point_job

    assert run_point_job(cfg, expand(cfg)[0], out, {})["status"] == "done"
    (fake_slurm / "sacct.txt").write_text("4241_0|COMPLETED|node3\n4241_1|TIMEOUT|node4\n4241_2|RUNNING|node7\n")
    assert main(["status", str(out)]) == 1
    text = capsys.readouterr().out
    assert [line.split()[:2] for line in text.splitlines()][0] == [NONE, "done"]
    assert f"{V2DROP}  failed   slurm job 4241_1 ended (TIMEOUT) before its point finished" in text
    assert text.rstrip().endswith("3 points: 1 done, 1 failed, 1 running, 0 queued, 0 pending")

    assert main(["sweep", str(path)]) == 0  # the dead job is recorded as failed and resubmitted, alone
    text = capsys.readouterr().out
    assert f"{V2DROP}: slurm job 4241_1 ended (TIMEOUT) before its point finished; recorded as failed" in text
    assert f"submit {V2DROP} -> slurm job 4242" in text and f"submit {FASTV}" not in text
    assert "#SBATCH --array" not in (fake_slurm / "script1.sh").read_text()
    err = json.loads((out / "_failed" / V2DROP / "error.json").read_text())
    assert err["job"]["job_id"] == "4241_1" and "TIMEOUT" in err["error"]
    assert json.loads((out / f".tmp-{V2DROP}" / "job.json").read_text())["job_id"] == "4242"


def test_slurm_submission_refused_is_one_line(tmp_path, capsys, fake_slurm):
    (fake_slurm.parent / "bin" / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: invalid partition' >&2\nexit 1\n")
    path = write_cfg(tmp_path, executor="slurm", slurm={"partition": "nope"})
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # sbatch's own words come first
    assert last.startswith("error: slurm: submitting 3 point(s) failed: sbatch: error: invalid partition")
    assert not list((tmp_path / "sw").glob(".tmp-*"))


def test_readme_cluster_example_is_a_valid_slurm_config():
    text = (REPO / "README.md").read_text().split("## On a cluster", 1)[1]
    raw = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    from v2drop_eval.sweep.config import parse_config
    from v2drop_eval.sweep.jobs import slurm_parameters

    cfg = parse_config(raw, read_layers=False)
    assert cfg.executor == "slurm" and len(expand(cfg)) == 10
    params = slurm_parameters(cfg)
    assert params["gpus_per_node"] == 1 and params["partition"] == "gpu" and params["mem"] == "65536MB"
