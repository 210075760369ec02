"""The command line's manners: user errors are one line and exit 2, --debug shows the traceback,
and ``compare`` tells a sweep's scores from a reference's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sweep_fakes import write_point

from v2drop_eval.cli import main


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "v2drop_eval.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["bench", "--shape", "nope"], "error: unknown shape 'nope'; allowed: "),
    (["sweep", "no-such-config.yaml"], "error: no-such-config.yaml: cannot read the config"),
])
def test_user_errors_are_one_line(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") <= 2 and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine(capsys):
    assert main(["bench", "--shape", "tiny", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: device 'cuda' requested") and "Traceback" not in err


def test_debug_shows_the_traceback():
    quiet = _cli("bench", "--shape", "nope")
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr and quiet.stderr.count("\n") == 1
    loud = _cli("--debug", "bench", "--shape", "nope")
    assert loud.returncode == 2 and "Traceback (most recent call last)" in loud.stderr
    assert "unknown shape 'nope'" in loud.stderr


def test_compare_same_and_different(tmp_path: Path, capsys):
    meta = {"model_name": "m", "family": "llava", "method": "none"}
    for sweep, score in (("a", 0.5), ("b", 0.5)):
        write_point(tmp_path / sweep, "m__none", meta, {"gqa": score})
    v2 = {**meta, "method": "v2drop", "schedule": "2:0.5", "metric": "l2"}
    write_point(tmp_path / "a", "m__v2drop__s2-0.5__l2", v2, {"gqa": 0.4})
    write_point(tmp_path / "b", "m__v2drop__s2-0.5__l2", v2, {"gqa": 0.41})
    write_point(tmp_path / "b", "m__fastv__s2-0.5", {**meta, "method": "fastv", "schedule": "2:0.5"}, {"gqa": 0.3})
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 1  # scores differ: make demo fails
    captured = capsys.readouterr()
    out = captured.out
    assert "error: the sweeps differ" in captured.err
    lines = {line.split()[0]: line for line in out.splitlines()[2:-1]}
    assert lines["m__none"].endswith("50.00     50.00  same")
    assert lines["m__v2drop__s2-0.5__l2"].endswith("41.00     40.00  different")
    assert lines["m__fastv__s2-0.5"].endswith("missing here")
    assert out.splitlines()[-1] == "3 scores: 1 same, 1 different, 1 missing here"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "nope")]) == 2
    # within a tolerance of 1.5 points v2drop is the same, but fastv is still missing here
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--tolerance", "1.5"]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "3 scores: 2 same, 1 missing here"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "a")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 scores: 2 same"
    # a folder of sweeps is not a sweep
    for d in ("a", "b"):
        (tmp_path / d / "sweep.json").write_text("{}")
    assert main(["compare", str(tmp_path), str(tmp_path / "b")]) == 2
    assert "is a folder of sweeps (a, b), not one sweep" in capsys.readouterr().err
    assert main(["tables", str(tmp_path), "--allow-missing"]) == 2
    assert "is a folder of sweeps (a, b)" in capsys.readouterr().err and not (tmp_path / "tables").exists()
    assert json.loads((tmp_path / "a" / "m__none" / "point.json").read_text())["status"] == "ok"
