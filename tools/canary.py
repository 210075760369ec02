"""`make test-next`: the fast tier on the newest upstream releases, one verdict a package.

    python tools/canary.py --base .venv --venv .venv-next [--lock requirements.lock] [--pyproject pyproject.toml]

For transformers, lmms-eval, accelerate, filelock and torch (with the torchvision of its release line) it
asks the index for the newest release (``pip index versions``). A package whose newest release is the
locked one has nothing to test. The others are installed together into VENV, a layer over the locked
venv BASE (a .pth to its site-packages, as `make test-oldest` does), and the fast tier runs there.
Green: each of them gets "raise the cap" (or, already inside pyproject.toml's range, "take it in with
make lock"). Red: the failing tests run again with one package at a time over the lock, and each verdict
names the tests that fail with that package alone. A release that this machine's pip configuration
forbids (a constraints file), or a torch without a torchvision of its line, is reported, not tried.

Information only: the exit status is 0 whatever the verdicts (--strict: 1 when one is red).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lockdiff import locked  # noqa: E402  (tools/ is not a package)

PACKAGES = ("transformers", "lmms-eval", "accelerate", "filelock", "torch")
FAST_TIER = ["-m", "not slow and not grid_full"]
# torchvision 0.N pairs with torch 2.(N-15) since torch 2.0 / torchvision 0.15 (pytorch/vision's
# compatibility table); its wheels are built against that torch.
TORCHVISION_OFFSET = 15


@dataclass
class Candidate:
    name: str
    newest: str
    locked: str
    spec: SpecifierSet
    pins: list[str] = field(default_factory=list)  # what pip installs for it (torch: torch and torchvision)
    verdict: str = ""

    @property
    def inside_range(self) -> bool:
        return self.spec.contains(self.newest, prereleases=True)


def _pip(python: Path | str, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "pip", *args], capture_output=True, text=True, check=check)


def newest_release(python: Path | str, name: str) -> str | None:
    out = _pip(python, "index", "versions", name).stdout
    m = re.search(rf"^{re.escape(name)} \(([^)]+)\)", out, re.M | re.I)
    return m.group(1) if m else None


def local_constraints(python: Path | str) -> dict[str, tuple[str, SpecifierSet]]:
    """``name -> (file, specifier)`` from the constraint files of this machine's pip configuration."""
    out: dict[str, tuple[str, SpecifierSet]] = {}
    for line in _pip(python, "config", "list").stdout.splitlines():
        m = re.match(r"^[\w:.-]*constraint='(.+)'$", line.strip())
        if not m:
            continue
        for path in m.group(1).split():
            try:
                text = Path(path).read_text()
            except OSError:
                continue
            for raw in text.splitlines():
                raw = raw.split("#", 1)[0].strip()
                if raw:
                    req = Requirement(raw)
                    out[canonicalize_name(req.name)] = (path, req.specifier)
    return out


def declared(pyproject: Path) -> dict[str, SpecifierSet]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return {canonicalize_name(r.name): r.specifier for r in map(Requirement, deps)}


def layer_venv(venv: Path, base: Path) -> Path:
    """A fresh venv at ``venv`` that sees the locked venv ``base``'s packages behind its own."""
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = lambda py: subprocess.run(  # noqa: E731
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip()
    base_lib = Path(purelib(base / "bin" / "python")).resolve()
    Path(purelib(python), "locked-venv.pth").write_text(f"import site; site.addsitedir({str(base_lib)!r})\n")
    return python


def run_tests(python: Path, tests: list[str] | None = None) -> tuple[int, list[str], str]:
    """The fast tier (or ``tests``) under ``python``: (exit status, failing test ids, the summary line)."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *FAST_TIER, f"--junitxml={junit}",
               *(tests or [])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        failed = []
        if junit.is_file():
            for case in ET.parse(junit).iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    path = case.get("classname", "").replace(".", "/") + ".py"
                    failed.append(f"{path}::{case.get('name')}")
        summary = next((ln for ln in reversed(proc.stdout.splitlines()) if " in " in ln and "=" not in ln[:1]), "")
        return proc.returncode, failed, summary.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=Path(".venv"), help="the locked venv (make install)")
    ap.add_argument("--venv", type=Path, default=Path(".venv-next"))
    ap.add_argument("--lock", type=Path, default=Path("requirements.lock"))
    ap.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    ap.add_argument("--strict", action="store_true", help="exit 1 when a verdict is red")
    ap.add_argument("--dry-run", action="store_true", help="say what would be tried; install and run nothing")
    ap.add_argument("--tests", nargs="+", default=None, metavar="PATH",
                    help="run these test files (their fast tier) instead of the whole fast tier")
    args = ap.parse_args(argv)
    base_py = args.base / "bin" / "python"
    lock, spec, constraints = locked(str(args.lock)), declared(args.pyproject), local_constraints(base_py)

    lines: list[str] = []
    todo: list[Candidate] = []
    for name in PACKAGES:
        key = canonicalize_name(name)
        newest = newest_release(base_py, name)
        if newest is None:
            lines.append(f"{name}: the index gives no release (offline?): not tried")
            continue
        c = Candidate(name, newest, lock[key], spec.get(key, SpecifierSet()), pins=[f"{name}=={newest}"])
        if Version(newest) <= Version(c.locked):
            lines.append(f"{name} {newest}: the locked release is the newest: nothing to try")
            continue
        ver = {name: newest}
        reasons = []
        if name == "torch":  # torch goes with the torchvision of its line, or not at all
            line = Version(newest).minor + TORCHVISION_OFFSET
            tv_newest = newest_release(base_py, "torchvision")
            if tv_newest and Version(tv_newest).minor == line:
                c.pins.append(f"torchvision=={tv_newest}")
                ver["torchvision"] = tv_newest
            else:
                reasons.append(f"no torchvision of its line (0.{line}) is released yet (newest {tv_newest})")
        reasons += [f"this machine's pip configuration allows only {n}{constraints[n][1]} ({constraints[n][0]})"
                    for n, v in ver.items() if n in constraints and not constraints[n][1].contains(v, prereleases=True)]
        if reasons:
            lines.append(f"{name} {newest}: NOT TRIED: {'; '.join(reasons)}; keep the lock's {c.locked}")
            continue
        todo.append(c)
    if todo and args.dry_run:
        lines += [f"{c.name} {c.newest}: would be tried ({' '.join(c.pins)})" for c in todo]
        todo = []
    if todo:
        python = layer_venv(args.venv, args.base)
        pins = [p for c in todo for p in c.pins]
        print("canary: installing", " ".join(pins), flush=True)
        inst = _pip(python, "install", "-q", *pins)
        if inst.returncode != 0:
            err = next((ln for ln in inst.stderr.splitlines() if "ERROR" in ln), inst.stderr.strip()[-300:])
            for c in todo:
                lines.append(f"{c.name} {c.newest}: does not install with {' '.join(pins)}: {err}")
            todo = []
    if todo:
        print(f"canary: the fast tier on {' '.join(pins)} (over the lock)", flush=True)
        code, failed, summary = run_tests(python, args.tests)
        print(f"canary: {summary}", flush=True)
        if code == 0:
            for c in todo:
                lines.append(f"{c.name} {c.newest}: passes: " + ("take it in with make lock" if c.inside_range else
                             f"raise the cap (pyproject {c.spec}, lock {c.locked})"))
        elif len(todo) == 1:
            lines.append(f"{todo[0].name} {todo[0].newest}: RED: {', '.join(failed) or summary}")
        else:
            for c in todo:  # which package breaks which test: the failing ones again, one package at a time
                alone = layer_venv(args.venv.with_name(args.venv.name + "-" + c.name), args.base)
                if _pip(alone, "install", "-q", *c.pins).returncode != 0:
                    lines.append(f"{c.name} {c.newest}: RED with the others ({', '.join(failed) or summary}); "
                                 "does not install alone over the lock")
                    continue
                _, own, _ = run_tests(alone, sorted({f.split("[")[0] for f in failed}) or None)
                own = [f for f in own if f in failed] or own
                lines.append(f"{c.name} {c.newest}: RED: {', '.join(own)}" if own else
                             f"{c.name} {c.newest}: passes alone: raise the cap (pyproject {c.spec}, lock {c.locked})")
                shutil.rmtree(alone.parents[1], ignore_errors=True)
            if all("RED" not in ln for ln in lines):
                lines.append(f"together they fail {', '.join(failed) or summary}, each alone passes")

    print("\nmake test-next verdicts (information; they do not fail CI):")
    for line in lines:
        print("  " + line)
    red = any("RED" in ln or "does not install" in ln or "together they fail" in ln for ln in lines)
    return 1 if (args.strict and red) else 0


if __name__ == "__main__":
    sys.exit(main())
