"""make test-next's verdicts (tools/canary.py) from canned index answers: nothing to try, not tried (a local
pip constraint, a torch without its torchvision), and what would be tried."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tools import canary

ROOT = Path(__file__).resolve().parents[1]


def test_verdicts_without_installing(tmp_path, monkeypatch, capsys):
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("# local\ntorch<=2.14.1\n")
    newest = {"transformers": "9.0.0", "lmms-eval": "0.0.1", "accelerate": "9.0.0", "filelock": "9.0.0",
              "torch": "2.15.0", "torchvision": "0.29.2"}

    def pip(python, *args, check=False):
        if args[:2] == ("index", "versions"):
            out = f"{args[2]} ({newest[args[2]]})\nAvailable versions: ...\n"
        else:
            out = f"global.constraint='{constraints}'\n"
        return subprocess.CompletedProcess(args, 0, out, "")

    monkeypatch.setattr(canary, "_pip", pip)
    assert canary.main(["--dry-run", "--lock", str(ROOT / "requirements.lock"),
                        "--pyproject", str(ROOT / "pyproject.toml")]) == 0
    out = capsys.readouterr().out
    assert "lmms-eval 0.0.1: the locked release is the newest: nothing to try" in out
    assert ("torch 2.15.0: NOT TRIED: no torchvision of its line (0.30) is released yet (newest 0.29.2); this "
            f"machine's pip configuration allows only torch<=2.14.1 ({constraints})") in out
    for name in ("transformers", "accelerate", "filelock"):
        assert f"{name} 9.0.0: would be tried ({name}==9.0.0)" in out
