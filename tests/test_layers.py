"""The package's structure (CONTRIBUTING.md, "Layers"): the import-layer contract in pyproject.toml holds,
no module imports another's private name, and modules stay small."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "v2drop_eval"
MAX_LINES = 400  # "~350": a module past this wants splitting (demo/train.py, the training script, excepted)


def test_import_layer_contract_holds():
    # lint-imports' entry point through this interpreter: a venv layered over the locked one (make
    # test-oldest, test-next) has no bin/lint-imports of its own
    lint = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"]
    proc = subprocess.run([*lint, "--config", str(REPO / "pyproject.toml"), "--no-cache"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_private_name_is_imported_across_modules():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("v2drop_eval"):
                found += [f"{_module_name(path)}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
            elif isinstance(node, ast.Import):
                found += [f"{_module_name(path)}: import {a.name}" for a in node.names
                          if any(p.startswith("_") and not p.startswith("__") for p in a.name.split("."))]
    assert not found, "\n".join(found)


def test_modules_stay_small():
    big = [f"{p.relative_to(REPO)}: {n} lines" for p in sorted(PACKAGE.rglob("*.py"))
           if (n := len(p.read_text().splitlines())) > MAX_LINES and p.name != "train.py"]
    assert not big, "\n".join(big)
