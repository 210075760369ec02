"""The lock, pyproject.toml, the Makefile's torch pins and README's tested versions say the same thing."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tools.lockdiff import locked

ROOT = Path(__file__).parents[1]
LOCK = locked(str(ROOT / "requirements.lock"))


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate()]


def test_every_declared_dependency_is_locked_inside_its_range():
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in LOCK, f"{req.name} is declared in pyproject.toml but not in requirements.lock (run make lock)"
        assert req.specifier.contains(LOCK[name], prereleases=True), (
            f"requirements.lock has {req.name}=={LOCK[name]}, outside pyproject.toml's {req.specifier} (run make lock)"
        )


def test_makefile_torch_pins_are_the_locked_ones():
    pins = re.search(r"^TORCH_PINS := (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    assert pins == [f"torch=={LOCK['torch']}", f"torchvision=={LOCK['torchvision']}"]


def test_readme_gives_the_locked_versions():
    text = " ".join((ROOT / "README.md").read_text().split())
    line = re.search(r"Tested versions, as in `requirements.lock`: (.+?)\. ", text).group(1)
    named = dict(re.findall(r"([A-Za-z][\w.-]*) (\d[\w.]*)", line))
    assert {canonicalize_name(k) for k in named} >= {"torch", "transformers", "lmms-eval", "filelock"}
    for name, version in named.items():
        if name != "Python":
            assert LOCK[canonicalize_name(name)] == version, f"README says {name} {version}, the lock {LOCK[canonicalize_name(name)]}"

