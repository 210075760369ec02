"""Which sweep a results folder belongs to, and where it ran.

A run saves its config as ``OUT/sweep.yaml`` and, beside it, ``OUT/sweep.origin.json``: the sweep's name,
the config file it came from and the folder it ran in. A folder belongs to one sweep: a run of another
sweep (another ``name``) into it is refused, naming both, unless forced (``--force``), which says what it
mixes. The same sweep with an edited grid is the same sweep (its points are checked one by one).
``status`` (and anything else that reads the saved config) resolves its relative paths (``pretrained``,
``include_path``, a ``prepare`` file) against the folder the sweep ran in, not the current one.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from v2drop_eval.engine.atomic import write_json_atomic, write_text_atomic
from v2drop_eval.sweep.config import SweepConfig, parse_config
from v2drop_eval.sweep.layout import CONFIG_FILE, POINT_FILE, STATUS_FILE, now

__all__ = ["ORIGIN_FILE", "read_origin", "folder_sweep", "owner_problem", "save_config", "load_saved_config"]

ORIGIN_FILE = "sweep.origin.json"


def read_origin(out: Path) -> dict[str, Any]:
    """``{name, config, cwd, saved}`` of the sweep that last ran in ``out`` ({} if none was recorded)."""
    try:
        data = json.loads((out / ORIGIN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def folder_sweep(out: Path) -> tuple[str | None, str]:
    """The name of the sweep whose folder ``out`` is (None: no sweep has run there), and where it came from."""
    origin = read_origin(out)
    if origin.get("name"):
        return str(origin["name"]), f"{origin.get('config') or 'its config'}, run in {origin.get('cwd') or '?'}"
    for name, how in ((CONFIG_FILE, "its saved config"), (STATUS_FILE, "its sweep.json")):
        try:
            data = (yaml.safe_load if name == CONFIG_FILE else json.loads)((out / name).read_text())
        except (OSError, ValueError, yaml.YAMLError):
            continue
        if isinstance(data, dict) and data.get("name"):
            return str(data["name"]), how
    return None, ""


def owner_problem(cfg: SweepConfig, out: Path, force: bool = False) -> tuple[str | None, str | None]:
    """``(error, note)``: the error that refuses a run of ``cfg`` into a folder of another sweep; with
    ``force``, the note that says what the run mixes instead. ``(None, None)``: the folder is this sweep's."""
    name, how = folder_sweep(out)
    if name is None or name == cfg.name:
        return None, None
    done = sum(1 for _ in out.glob(f"*/{POINT_FILE}"))
    if not force:
        return (f"{out} holds sweep {name!r} ({how}), not {cfg.name!r} ({cfg.source}); give this sweep its own "
                f"--output, or pass --force to run it into that folder beside the {done} finished point(s) of "
                f"{name!r}"), None
    return None, (f"--force: running sweep {cfg.name!r} into {out}, which holds sweep {name!r} ({how}): its {done} "
                  f"finished point(s) stay and `tables` reads them beside {cfg.name!r}'s; `status` follows "
                  f"{cfg.name!r}'s grid from now on")


def save_config(cfg: SweepConfig, out: Path) -> None:
    """``sweep.yaml`` (the config as given) and ``sweep.origin.json`` (name, config file, the folder it ran in)."""
    write_text_atomic(out / CONFIG_FILE, yaml.safe_dump(cfg.raw, sort_keys=False))
    source = cfg.source if cfg.source.startswith("<") else str(Path(cfg.source).resolve())
    write_json_atomic(out / ORIGIN_FILE, {"name": cfg.name, "config": source, "cwd": os.getcwd(), "saved": now()})


def load_saved_config(out: Path) -> SweepConfig:
    """The config a run saved in ``out``, its relative paths read from the folder that run was started in.
    Raises OSError, ValueError (ConfigError) or yaml.YAMLError when there is none or it does not parse."""
    raw = yaml.safe_load((out / CONFIG_FILE).read_text())
    cwd = read_origin(out).get("cwd")
    where = contextlib.chdir(cwd) if cwd and Path(cwd).is_dir() else contextlib.nullcontext()
    with where:
        return parse_config(raw, output=out, source=str(out / CONFIG_FILE), read_layers=False)
