"""Sweep configs: load a YAML grid, validate it, and expand it into evaluation points.

A config names models, methods, budgets and/or explicit schedules, metrics and tasks; every point is
one ``lmms_eval`` run (one process, or ``accelerate launch`` when ``num_processes > 1``). Everything
is checked before anything runs: an unknown key, method, metric or family, a budget without a preset,
or a schedule the model cannot hold is refused with its location named. See ``docs/sweeps.md``.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from v2drop_eval.executors import EXECUTORS, SLURM_KEYS, parse_executor, parse_slurm
from v2drop_eval.families import ENCODER_DROP_TYPES, FAMILY_NAMES, VISIONZIP_TYPES, get_family
from v2drop_eval.methods import get_method
from v2drop_eval.schedule import DropSchedule, fitted_preset
from v2drop_eval.validate import (
    METHODS,
    METRICS,
    check_drop_method,
    check_positions,
    local_model_problem,
    validate,
    validate_encoder,
)

__all__ = [
    "METHODS",
    "METRICS",
    "FAMILY_MODELS",
    "ConfigError",
    "ModelSpec",
    "Point",
    "SweepConfig",
    "load_config",
    "parse_config",
    "expand",
    "schedule_slug",
]

# lmms-eval model name registered by the plugin for each family (``model:`` in a config overrides it).
FAMILY_MODELS = {name: get_family(name).lmms_model for name in FAMILY_NAMES}
TOP_KEYS = {
    "name": "sweep name; default: the config file's stem",
    "description": "free text, ignored",
    "output": "sweep output directory; default results/<name>",
    "models": "list of models (keys below)",
    "methods": f"methods, any of {', '.join(METHODS)}; or {{method: NAME, budgets/schedules/metrics/seeds: [...]}}",
    "budgets": "preset budgets (192, 128, 64; 'default' for qwen2_vl; 'paper' for pdrop and dart)",
    "schedules": "explicit schedules: 'layer:ratio/...' strings, or {layers: [[...]], keep_ratios: [[...]]}",
    "encoder_schedules": "V2Drop stages inside the vision encoder, 'block:ratio/...' strings or none (no stage); "
                         "each combines with every budget/schedule of a method; default [none]",
    "metrics": f"variation metrics for v2drop, any of {', '.join(METRICS)}; default [l2]",
    "seeds": "seeds for the random method; default [0]",
    "tasks": "lmms-eval task names",
    "limit": "lmms-eval --limit (int, or a fraction < 1); default none",
    "batch_size": "lmms-eval --batch_size; default 1",
    "num_processes": "processes per point; > 1 runs `accelerate launch --multi_gpu --num_processes N`; default 1",
    "jobs": "points run at the same time (CPU sweeps; mind GPU memory); default 1; --jobs overrides",
    "include_path": "lmms-eval --include_path (a folder of local task YAMLs)",
    "lmms_eval_args": "extra lmms-eval command-line arguments (list of strings)",
    "env": "extra environment variables for every point (mapping)",
    "timeout": "seconds one point may run before it is killed and failed; default none",
    "prepare": "{call: 'module:function' or 'path/to/file.py:function', args: {...}}: called once before the "
               "sweep runs (not on --dry-run)",
    "executor": f"where points run: {', '.join(EXECUTORS)}; default inline; --executor overrides",
    "slurm": f"options of the slurm executor: {', '.join(SLURM_KEYS)}",
}
METHOD_KEYS = ("budgets", "schedules", "encoder_schedules", "metrics", "seeds")
MODEL_KEYS = {
    "name": "model id used in point ids (letters, digits, '.', '-', single '_')",
    "family": f"model family, one of {', '.join(sorted(FAMILY_MODELS))}",
    "pretrained": "hub id or local folder (model arg pretrained=)",
    "model": "lmms-eval model name; default by family (v2drop_llava, v2drop_qwen2_vl, ...)",
    "num_layers": "decoder layer count, for the depth check; default: read offline with AutoConfig",
    "model_args": "extra model args (mapping), e.g. {device_map: cpu, attn_implementation: sdpa}",
}
_OWN_MODEL_ARGS = {"pretrained", "budget", "schedule", "method", "metric", "seed", "encoder_schedule"}
_ID_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.\-]|_(?!_))*$")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    """A sweep config that cannot run; the message names every problem found."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    pretrained: str
    model: str
    num_layers: int | None = None
    model_args: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Point:
    """One evaluation: a model under one method and budget or schedule, over all the config's tasks."""

    id: str
    model: ModelSpec
    method: str
    budget: int | str | None = None
    schedule: str | None = None
    metric: str | None = None
    seed: int | None = None
    encoder_schedule: str | None = None

    @property
    def label(self) -> str:
        """``b128``, ``s3-0.5_17-0.3_22-0`` or ``full`` (the budget/schedule part of the id)."""
        if self.budget is not None:
            return f"b{self.budget}"
        if self.schedule is not None:
            return schedule_slug(self.schedule)
        return "full"

    def model_args(self) -> str:
        args: dict[str, Any] = {"pretrained": self.model.pretrained, "method": self.method}
        if self.budget is not None:
            args["budget"] = self.budget
        if self.schedule is not None:
            args["schedule"] = self.schedule
        if self.metric is not None:
            args["metric"] = self.metric
        if self.seed is not None:
            args["seed"] = self.seed
        if self.encoder_schedule is not None:
            args["encoder_schedule"] = self.encoder_schedule
        args.update(dict(self.model.model_args))
        return ",".join(f"{k}={v}" for k, v in args.items())

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model_name": self.model.name,
            "family": self.model.family,
            "pretrained": self.model.pretrained,
            "lmms_model": self.model.model,
            "method": self.method,
            "budget": self.budget,
            "schedule": self.schedule,
            "metric": self.metric,
            "seed": self.seed,
            "encoder_schedule": self.encoder_schedule,
            "model_args": self.model_args(),
        }


@dataclass
class SweepConfig:
    name: str
    output: Path
    models: list[ModelSpec]
    methods: list[str]
    tasks: list[str]
    overrides: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    budgets: list[int | str] = field(default_factory=list)
    schedules: list[str] = field(default_factory=list)
    encoder_schedules: list[str | None] = field(default_factory=lambda: [None])
    metrics: list[str] = field(default_factory=lambda: ["l2"])
    seeds: list[int] = field(default_factory=lambda: [0])
    limit: int | float | None = None
    batch_size: int = 1
    num_processes: int = 1
    jobs: int = 1
    include_path: str | None = None
    lmms_eval_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None
    prepare: dict[str, Any] | None = None
    executor: str = "inline"
    slurm: dict[str, Any] = field(default_factory=lambda: parse_slurm(None, []))
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def grid(self, method: str) -> dict[str, list[Any]]:
        """``budgets``, ``schedules``, ``encoder_schedules``, ``metrics``, ``seeds`` of ``method`` (its own,
        else the config's)."""
        own = self.overrides.get(method, {})
        return {
            "budgets": own.get("budgets", self.budgets),
            "schedules": own.get("schedules", self.schedules),
            "encoder_schedules": own.get("encoder_schedules", self.encoder_schedules),
            "metrics": own.get("metrics", self.metrics),
            "seeds": own.get("seeds", self.seeds),
        }

    def command(self, point: Point, output_path: str | Path) -> list[str]:
        """The exact command that evaluates ``point`` and writes its results under ``output_path``."""
        if self.num_processes > 1:
            # --multi_gpu: always torch.distributed's launcher (gloo on CPU, NCCL on GPUs). Without it,
            # accelerate on a machine without GPUs starts one process and ignores --num_processes.
            head = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                    str(self.num_processes), "-m", "lmms_eval"]
        else:
            head = [sys.executable, "-m", "lmms_eval"]
        cmd = head + [
            "--model", point.model.model,
            "--model_args", point.model_args(),
            "--tasks", ",".join(self.tasks),
            "--batch_size", str(self.batch_size),
            "--output_path", str(output_path),
            "--log_samples",  # per-item scores: the tables' intervals and paired comparisons
        ]
        if self.limit is not None:
            cmd += ["--limit", str(self.limit)]
        if self.include_path:
            cmd += ["--include_path", self.include_path]
        return cmd + [a for a in self.lmms_eval_args if a != "--log_samples"]  # on already

    def shell_command(self, point: Point, output_path: str | Path) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.command(point, output_path))


def schedule_slug(schedule: str) -> str:
    """``3:0.5/17:0.3/22:0`` -> ``s3-0.5_17-0.3_22-0`` (readable, filesystem-safe, stable)."""
    return "s" + DropSchedule.parse(schedule).slug()


# -- loading ----------------------------------------------------------------------------------------
def load_config(path: str | Path, output: str | Path | None = None) -> SweepConfig:
    """Read, substitute ``${VAR}``/``${VAR:-default}`` from the environment, and validate a config."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the config: {exc}") from None
    return parse_config(raw, default_name=path.stem, output=output, source=str(path))


def _substitute(value: Any, where: str, errors: list[str]) -> Any:
    if isinstance(value, str):
        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            errors.append(f"{where}: environment variable ${{{name}}} is not set and has no default")
            return m.group(0)
        return _VAR_RE.sub(repl, value)
    if isinstance(value, list):
        return [_substitute(v, f"{where}[{i}]", errors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _substitute(v, f"{where}.{k}", errors) for k, v in value.items()}
    return value


def _as_list(value: Any, key: str, errors: list[str]) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [value]
    if not isinstance(value, list):
        errors.append(f"{key}: expected a list, got {type(value).__name__}")
        return []
    return value


def _int(value: Any, key: str, errors: list[str], minimum: int = 1) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        errors.append(f"{key}: expected an integer >= {minimum}, got {value!r}")
        return None
    return value


def parse_config(
    raw: Any,
    default_name: str = "sweep",
    output: str | Path | None = None,
    source: str = "<config>",
    read_layers: bool = True,
) -> SweepConfig:
    """Validate a config mapping and return a :class:`SweepConfig`; raise :class:`ConfigError` naming
    every problem. ``read_layers=False`` skips reading layer counts with ``AutoConfig``."""
    errors: list[str] = []
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: a sweep config must be a mapping of keys (see docs/sweeps.md)")
    raw = _substitute(dict(raw), "config", errors)
    for key in raw:
        if key not in TOP_KEYS:
            errors.append(f"unknown key {key!r}; known keys: {', '.join(TOP_KEYS)}")

    name = str(raw.get("name") or default_name)
    if not _ID_RE.match(name):
        errors.append(f"name: {name!r} is not a plain identifier (letters, digits, '.', '-', '_')")
    out = Path(output) if output is not None else Path(raw.get("output") or Path("results") / name)

    models = _parse_models(raw.get("models"), errors)

    metrics = _parse_metrics(raw.get("metrics", ["l2"]), "metrics", errors)
    seeds = _parse_seeds(raw.get("seeds", [0]), "seeds", errors)
    budgets = _parse_budgets(raw.get("budgets"), "budgets", errors)
    schedules = _parse_schedules(raw.get("schedules"), errors)
    encoder_schedules = _parse_encoder_schedules(raw.get("encoder_schedules", [None]), "encoder_schedules", errors)
    methods, overrides = _parse_methods(raw.get("methods"), errors)

    tasks = [str(t) for t in _as_list(raw.get("tasks"), "tasks", errors)]
    if not tasks:
        errors.append("tasks: at least one lmms-eval task is needed")
    for t in tasks:
        if "," in t or not t.strip():
            errors.append(f"tasks: {t!r} is not a task name")

    limit = raw.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        errors.append(f"limit: expected a positive number, got {limit!r}")
    batch_size = _int(raw.get("batch_size", 1), "batch_size", errors) or 1
    num_processes = _int(raw.get("num_processes", 1), "num_processes", errors) or 1
    jobs = _int(raw.get("jobs", 1), "jobs", errors) or 1
    include_path = raw.get("include_path")
    if include_path is not None and not isinstance(include_path, str):
        errors.append("include_path: expected one folder path (a string)")
    extra = [str(a) for a in _as_list(raw.get("lmms_eval_args"), "lmms_eval_args", errors)]
    for flag in ("--model", "--model_args", "--tasks", "--output_path", "--batch_size", "--limit"):
        if flag in extra:
            errors.append(f"lmms_eval_args: {flag} is set by the sweep itself; use the config key instead")
    env = raw.get("env") or {}
    if not isinstance(env, Mapping):
        errors.append("env: expected a mapping of variable names to values")
        env = {}
    timeout = raw.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        errors.append(f"timeout: expected a positive number of seconds, got {timeout!r}")
    prepare = raw.get("prepare")
    if prepare is not None:
        if not isinstance(prepare, Mapping) or set(prepare) - {"call", "args"} or ":" not in str(prepare.get("call", "")):
            errors.append("prepare: expected {call: 'module:function', args: {...}}")
            prepare = None
        else:
            prepare = {"call": str(prepare["call"]), "args": dict(prepare.get("args") or {})}
            target = prepare["call"].rpartition(":")[0]
            if target.endswith(".py") and not Path(target).is_file():
                errors.append(f"prepare: no such file {target} (a .py path is relative to the current folder)")

    executor = parse_executor(raw.get("executor"), errors)
    slurm = parse_slurm(raw.get("slurm"), errors)

    cfg = SweepConfig(
        name=name, output=out, models=models, methods=methods, overrides=overrides, tasks=tasks, budgets=budgets,
        schedules=schedules, encoder_schedules=encoder_schedules, metrics=metrics, seeds=seeds, limit=limit,
        batch_size=batch_size,
        num_processes=num_processes, jobs=jobs, include_path=include_path, lmms_eval_args=extra,
        env={str(k): str(v) for k, v in env.items()}, timeout=timeout, prepare=prepare, executor=executor,
        slurm=slurm, raw=raw,
    )
    for i, model in enumerate(models):
        problem = local_model_problem(model.pretrained)
        if problem and prepare:  # the prepare step may build it; the runner checks again after it
            cfg.notes.append(f"model {model.name}: {problem} yet (prepare {prepare['call']} is to build it)")
        elif problem:
            errors.append(f"models[{i}] ({model.name}): {problem}")
    for m in methods:
        if m in METHODS and get_method(m).drops and not cfg.grid(m)["budgets"] and not cfg.grid(m)["schedules"]:
            errors.append(f"budgets/schedules: method {m!r} needs at least one budget or schedule")
    if not errors:
        _check_grid(cfg, errors, read_layers)
    if errors:
        raise ConfigError(f"{source}: invalid sweep config:\n  - " + "\n  - ".join(errors))
    return cfg


def _parse_metrics(value: Any, where: str, errors: list[str]) -> list[str]:
    metrics = [str(m) for m in _as_list(value, where, errors)]
    for m in metrics:
        if m not in METRICS:
            errors.append(f"{where}: unknown metric {m!r}; known metrics: {', '.join(METRICS)}")
    if not metrics:
        errors.append(f"{where}: at least one metric is needed (default [l2])")
    return metrics


def _parse_seeds(value: Any, where: str, errors: list[str]) -> list[int]:
    seeds = []
    for s in _as_list(value, where, errors):
        try:
            check_drop_method("random", seed=s)
        except ValueError as exc:
            errors.append(f"{where}: {exc}")
        else:
            seeds.append(int(s))
    return seeds


def _parse_encoder_schedules(value: Any, where: str, errors: list[str]) -> list[str | None]:
    """``[none, "12:0.5/18:0.5"]`` -> ``[None, "12:0.5/18:0.5"]`` (each checked as an encoder schedule)."""
    out: list[str | None] = []
    items = [None] if value is None else _as_list(value, where, errors)
    for item in items:
        text = None if item is None or str(item).strip().lower() in ("", "none") else str(item)
        if text is not None:
            try:
                parsed = validate_encoder(text)
            except ValueError as exc:
                errors.append(f"{where}: {exc}")
                continue
            text = str(parsed)
        if text in out:
            errors.append(f"{where}: {text or 'none'} is listed twice")
        out.append(text)
    if not items:
        errors.append(f"{where}: at least one entry is needed (none: no stage in the encoder)")
    return out


def _parse_budgets(value: Any, where: str, errors: list[str]) -> list[int | str]:
    budgets: list[int | str] = []
    for b in _as_list(value, where, errors):
        if isinstance(b, bool) or not isinstance(b, (int, str)):
            errors.append(f"{where}: {b!r} is not a budget (an integer such as 128, or 'default')")
        elif isinstance(b, str) and not re.fullmatch(r"[A-Za-z0-9]+", b):
            errors.append(f"{where}: {b!r} is not a budget name")
        else:
            budgets.append(int(b) if isinstance(b, str) and b.isdigit() else b)
    return budgets


def _parse_methods(value: Any, errors: list[str]) -> tuple[list[str], dict[str, dict[str, list[Any]]]]:
    """``[none, v2drop, {method: fastv, budgets: [192], schedules: []}]``: names, and per-method grids."""
    methods: list[str] = []
    overrides: dict[str, dict[str, list[Any]]] = {}
    for i, item in enumerate(_as_list(value, "methods", errors)):
        where = f"methods[{i}]"
        if isinstance(item, Mapping):
            unknown = sorted(set(item) - {"method", *METHOD_KEYS})
            if unknown or "method" not in item:
                errors.append(f"{where}: expected {{method: NAME, {': [...], '.join(METHOD_KEYS)}: [...]}}"
                              + (f"; unknown key(s) {', '.join(map(repr, unknown))}" if unknown else ""))
                continue
            name = str(item["method"])
            grid: dict[str, list[Any]] = {}
            if "budgets" in item:
                grid["budgets"] = _parse_budgets(item["budgets"], f"{where}.budgets", errors)
            if "schedules" in item:
                grid["schedules"] = _parse_schedules(item["schedules"], errors, f"{where}.schedules")
            if "encoder_schedules" in item:
                grid["encoder_schedules"] = _parse_encoder_schedules(item["encoder_schedules"],
                                                                     f"{where}.encoder_schedules", errors)
            if "metrics" in item:
                grid["metrics"] = _parse_metrics(item["metrics"], f"{where}.metrics", errors)
            if "seeds" in item:
                grid["seeds"] = _parse_seeds(item["seeds"], f"{where}.seeds", errors)
            overrides[name] = grid
        else:
            name = str(item)
        if name not in METHODS:
            errors.append(f"methods: unknown method {name!r}; known methods: {', '.join(METHODS)}")
        elif name in methods:
            errors.append(f"methods: {name!r} is listed twice")
        methods.append(name)
    if not methods:
        errors.append("methods: at least one method is needed")
    return methods, overrides


def _parse_models(value: Any, errors: list[str]) -> list[ModelSpec]:
    if not isinstance(value, list) or not value:
        errors.append("models: expected a non-empty list of models")
        return []
    models, names = [], set()
    for i, m in enumerate(value):
        where = f"models[{i}]"
        if not isinstance(m, Mapping):
            errors.append(f"{where}: expected a mapping with keys {', '.join(MODEL_KEYS)}")
            continue
        where = f"models[{i}] ({m.get('name', '?')})"
        for key in m:
            if key not in MODEL_KEYS:
                errors.append(f"{where}: unknown key {key!r}; known keys: {', '.join(MODEL_KEYS)}")
        name, family, pretrained = m.get("name"), m.get("family"), m.get("pretrained")
        if not isinstance(name, str) or not _ID_RE.match(name):
            errors.append(f"{where}: name {name!r} must be letters, digits, '.', '-' or single '_'")
            continue
        if name in names:
            errors.append(f"{where}: model name {name!r} is used twice")
        names.add(name)
        if family not in FAMILY_MODELS:
            errors.append(f"{where}: unknown family {family!r}; known families: {', '.join(sorted(FAMILY_MODELS))}")
            continue
        if not isinstance(pretrained, str) or not pretrained:
            errors.append(f"{where}: pretrained (a hub id or a local folder) is required")
            continue
        num_layers = m.get("num_layers")
        if num_layers is not None:
            num_layers = _int(num_layers, f"{where}: num_layers", errors)
        margs = m.get("model_args") or {}
        if not isinstance(margs, Mapping):
            errors.append(f"{where}: model_args must be a mapping")
            margs = {}
        for k, v in margs.items():
            if k == "sidecar":
                errors.append(f"{where}: model_args.sidecar: the sweep keeps each point's side-car beside its "
                              "results, where it checks it")
            elif k in _OWN_MODEL_ARGS:
                errors.append(f"{where}: model_args.{k} is set by the sweep; use the config keys instead")
            if "," in str(v) or "=" in str(k) or "," in str(k):
                errors.append(f"{where}: model_args.{k}={v!r}: lmms-eval splits model args on ',' and '='")
        models.append(ModelSpec(
            name=name, family=str(family), pretrained=pretrained,
            model=str(m.get("model") or FAMILY_MODELS[family]), num_layers=num_layers,
            model_args=tuple((str(k), v) for k, v in margs.items()),
        ))
    return models


def _parse_schedules(value: Any, errors: list[str], key: str = "schedules") -> list[str]:
    out: list[str] = []
    for i, item in enumerate(_as_list(value, key, errors)):
        where = f"{key}[{i}]"
        if isinstance(item, str):
            texts = [item]
        elif isinstance(item, Mapping) and set(item) == {"layers", "keep_ratios"}:
            layer_sets = item["layers"]
            ratio_sets = item["keep_ratios"]
            if not _is_list_of_lists(layer_sets) or not _is_list_of_lists(ratio_sets):
                errors.append(f"{where}: layers and keep_ratios must be lists of lists, e.g. [[3, 17, 22]]")
                continue
            texts = []
            for layers in layer_sets:
                for ratios in ratio_sets:
                    if len(layers) != len(ratios):
                        errors.append(f"{where}: layers {layers} and keep_ratios {ratios} differ in length")
                        continue
                    texts.append("/".join(f"{la}:{r}" for la, r in zip(layers, ratios, strict=True)))
        else:
            errors.append(f"{where}: expected 'layer:ratio/...' or {{layers: [[...]], keep_ratios: [[...]]}}")
            continue
        for text in texts:
            try:
                sched = DropSchedule.parse(text)
            except ValueError as exc:
                errors.append(f"{where}: impossible schedule {text!r}: {exc}")
                continue
            if sched.is_empty:
                errors.append(f"{where}: empty schedule {text!r}; use method 'none' for the unpruned model")
                continue
            out.append(str(sched))
    return out


def _is_list_of_lists(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, list) for v in value)


def _read_num_layers(model: ModelSpec) -> tuple[int | None, str | None]:
    """Layer count from the model's config, offline only; ``(None, note)`` when it cannot be read."""
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model.pretrained, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not available offline"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"model {model.name}: depth check skipped, {model.pretrained} is not readable offline ({first[:120]})"
    text = getattr(cfg, "text_config", None) or cfg
    n = getattr(text, "num_hidden_layers", None)
    if not isinstance(n, int):
        return None, f"model {model.name}: depth check skipped, no num_hidden_layers in its config"
    return n, None


def _check_grid(cfg: SweepConfig, errors: list[str], read_layers: bool) -> None:
    """Every budget must have a preset for each model's family and method; every schedule must fit."""
    for model in cfg.models:
        depth = model.num_layers
        if depth is None and read_layers:
            depth, note = _read_num_layers(model)
            if note:
                cfg.notes.append(note)
        elif depth is None:
            cfg.notes.append(f"model {model.name}: depth check skipped (no num_layers)")
        positions = dict(model.model_args).get("positions")
        for method in cfg.methods:
            grid = cfg.grid(method)
            for enc in grid["encoder_schedules"]:
                why = family_skips(model.family, method, enc)
                if why:
                    cfg.notes.append(f"model {model.name} ({model.family}): skips method {method}"
                                     + (f" at encoder_schedule {enc}" if enc else "") + f": {why}")
                    continue
                try:
                    encoder = validate_encoder(enc, method)
                    check_positions(positions, method, encoder)
                except ValueError as exc:
                    errors.append(f"model {model.name}, method {method}: {exc}")
            if not get_method(method).drops or family_skips(model.family, method, None):
                continue
            for budget in grid["budgets"]:
                try:
                    # a preset too deep for the model is scaled to its depth, as the plugin does
                    validate(method, fitted_preset(model.family, budget, method, depth)[0], num_layers=depth)
                except ValueError as exc:
                    errors.append(f"model {model.name}, method {method}, budget {budget}: {exc}")
            for text in grid["schedules"]:
                try:
                    validate(method, text, num_layers=depth)
                except ValueError as exc:
                    errors.append(f"model {model.name}, method {method}, schedule {text}: {exc}")
    if not errors:
        ids = [p.id for p in expand(cfg)]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            errors.append(f"the grid names the same point twice: {', '.join(dup)}")


# -- expansion --------------------------------------------------------------------------------------
def expand(cfg: SweepConfig) -> list[Point]:
    """All points, in a stable order: per model, ``none`` once, then each method over budgets, schedules;
    each of them once per encoder schedule (``__e<slug>`` in the id; none: no suffix)."""
    points: list[Point] = []
    for model in cfg.models:
        for method in cfg.methods:
            spec = get_method(method)
            grid = cfg.grid(method)
            for enc in grid["encoder_schedules"]:
                if family_skips(model.family, method, enc):
                    continue
                tail = "" if enc is None else "__e" + DropSchedule.parse(enc).slug()
                if not spec.drops:
                    points.append(Point(id=f"{model.name}__{method}{tail}", model=model, method=method,
                                        encoder_schedule=enc))
                    continue
                settings: list[tuple[int | str | None, str | None]] = [(b, None) for b in grid["budgets"]]
                settings += [(None, s) for s in grid["schedules"]]
                for budget, schedule in settings:
                    base = Point(id="", model=model, method=method, budget=budget, schedule=schedule, encoder_schedule=enc)
                    stem = f"{model.name}__{method}__{base.label}{tail}"
                    if spec.takes_metric:
                        for metric in grid["metrics"]:
                            points.append(_with(base, id=f"{stem}__{metric}", metric=metric))
                    elif spec.takes_seed:
                        for seed in grid["seeds"]:
                            suffix = f"__seed{seed}" if seed != 0 else ""
                            points.append(_with(base, id=stem + suffix, seed=seed))
                    else:
                        points.append(_with(base, id=stem))
    return points


def family_skips(family: str, method: str, encoder_schedule: str | None) -> str | None:
    """Why a model of ``family`` skips ``method`` at ``encoder_schedule`` (None: it runs it): VisionZip and
    stages inside the vision encoder run on the checkpoint types of ``families.VISIONZIP_TYPES`` and
    ``ENCODER_DROP_TYPES`` only, so a config may list them beside families that cannot."""
    types = get_family(family).model_types
    if get_method(method).pre_llm and not set(types) & set(VISIONZIP_TYPES):
        return f"method {method} runs on {', '.join(VISIONZIP_TYPES)} checkpoints (a CLIP [CLS])"
    if encoder_schedule is not None and not set(types) & set(ENCODER_DROP_TYPES):
        return f"encoder_schedule runs on {', '.join(ENCODER_DROP_TYPES)} checkpoints"
    return None


def _with(point: Point, **changes: Any) -> Point:
    data = {**point.__dict__, **changes}
    return Point(**data)
