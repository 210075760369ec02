"""Checks of a sweep config that need the files it names: run once before the first point (after the
config's ``prepare`` step, which may build those files), so that a typo costs seconds, not one failed
lmms-eval process (or one queued SLURM job) per point.

- Tasks: every name must be a task, group or tag of lmms-eval's own task YAMLs or of the config's
  ``include_path``. The YAMLs are read as text (their ``task:``/``group:``/``tag:`` lines), without
  importing lmms-eval, whose task index takes many seconds to build.
- Checkpoints: a local model folder's ``config.json`` must name a ``model_type`` of the model's family
  (:func:`v2drop_eval.methods.rules.checkpoint_family_problem`; parse_config checks folders that
  already exist, this checks them again once ``prepare`` has built them).
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from v2drop_eval.methods.rules import checkpoint_family_problem

__all__ = ["lmms_task_dir", "known_tasks", "task_problems", "checkpoint_problems"]

# ``task: name`` / ``group: name`` / ``tag: name``, or the key alone with ``- name`` items below it.
_KEY = re.compile(r"^[\"']?(task|group|tag)[\"']?\s*:\s*(.*?)\s*(?:#.*)?$")
_ITEM = re.compile(r"^\s*-\s+([^\s#\[\]{}]+)\s*(?:#.*)?$")
_NAME = re.compile(r"^[^\s\[\]{}!]+$")


def lmms_task_dir() -> Path | None:
    """The folder of lmms-eval's task YAMLs, found without importing lmms-eval (None: not installed)."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "tasks"
    return folder if folder.is_dir() else None


def _names_in(text: str) -> Iterable[str]:
    key = None
    for line in text.splitlines():
        match = _KEY.match(line)
        if match:
            key, value = match.groups()
            if value and _NAME.match(value.strip("'\"")):
                yield value.strip("'\"")
            elif value.startswith("["):
                yield from (v.strip(" '\"") for v in value.strip("[]").split(",") if v.strip(" '\""))
            if value:
                key = None
            continue
        if key and (item := _ITEM.match(line)):
            yield item.group(1).strip("'\"")
        elif line and not line[0].isspace() and not line.startswith("-"):
            key = None


def known_tasks(folders: Sequence[Path]) -> set[str]:
    """Task, group and tag names declared by the YAMLs under ``folders``."""
    names: set[str] = set()
    for folder in folders:
        for path in folder.rglob("*yaml"):  # also _default_template_yaml
            try:
                names.update(_names_in(path.read_text(errors="replace")))
            except OSError:
                continue
    return names


def task_problems(tasks: Sequence[str], include_path: str | None) -> list[str]:
    """One message per task that no YAML declares ([]: all known, or lmms-eval's tasks not found)."""
    builtin = lmms_task_dir()
    if builtin is None:
        return []  # lmms-eval is not installed here; the points' own runs will say so
    folders = [builtin]
    if include_path:
        extra = Path(include_path).expanduser()
        if not extra.is_dir():
            return [f"include_path: no such folder {include_path}"]
        folders.append(extra)
    names = known_tasks(folders)
    problems = []
    for task in tasks:
        if task not in names:
            close = difflib.get_close_matches(task, sorted(names), n=3)
            where = "lmms-eval's tasks" + (f" or include_path {include_path}" if include_path else "")
            problems.append(f"tasks: unknown task {task!r} (not in {where})"
                            + (f"; did you mean {', '.join(close)}?" if close else ""))
    return problems


def checkpoint_problems(models: Iterable[tuple[str, str, str]]) -> list[str]:
    """``(name, family, pretrained)`` of each model -> one message per local checkpoint of another family."""
    out = []
    for name, family, pretrained in models:
        problem = checkpoint_family_problem(pretrained, family)
        if problem:
            out.append(f"model {name}: {problem}")
    return out
