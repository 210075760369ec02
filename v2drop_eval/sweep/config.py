"""Sweep configs: load a YAML grid, validate it, and expand it into evaluation points.

A config names models, methods, budgets and/or explicit schedules, metrics and tasks; every point is
one ``lmms_eval`` run (one process, or ``accelerate launch`` when ``num_processes > 1``). Everything
is checked before anything runs: an unknown key, method, metric or family, a budget without a preset,
or a schedule the model cannot hold is refused with its location named. See ``docs/sweeps.md``.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from v2drop_eval.engine.families import ENCODER_DROP_TYPES, VISIONZIP_TYPES, get_family
from v2drop_eval.engine.schedule import DropSchedule
from v2drop_eval.methods import METHODS, get_method
from v2drop_eval.methods.presets import fitted_preset
from v2drop_eval.methods.rules import (
    METRICS,
    checkpoint_family_problem,
    local_model_problem,
    validate,
    validate_encoder,
)
from v2drop_eval.sweep.fields import (
    EVERY_METHOD,
    EXECUTORS,
    ID_RE,
    SLURM_KEYS,
    as_list,
    int_at_least,
    parse_budgets,
    parse_encoder_schedules,
    parse_executor,
    parse_methods,
    parse_metrics,
    parse_models,
    parse_schedules,
    parse_seeds,
    parse_slurm,
    substitute,
)
from v2drop_eval.sweep.points import ModelSpec, Point

__all__ = ["ConfigError", "SweepConfig", "TOP_KEYS", "load_config", "parse_config", "expand"]


def _takers(flag: str) -> str:
    return ", ".join(m for m in METHODS if getattr(get_method(m), flag))


TOP_KEYS = {
    "name": "sweep name; default: the config file's stem",
    "description": "free text, ignored",
    "output": "sweep output directory; default results/<name>",
    "models": "list of models (keys below)",
    "methods": f"methods, any of {', '.join(METHODS)}; or {{method: NAME, budgets/schedules/metrics/seeds/options/"
               f"positions: [...]}}; {{method: '{EVERY_METHOD}', ...}}: every other registered method that drops",
    "budgets": "preset budgets (192, 128, 64; 'default' for qwen2_vl; a method's own named presets such as 'paper')",
    "schedules": "explicit schedules: 'layer:ratio/...' strings, or {layers: [[...]], keep_ratios: [[...]]}",
    "encoder_schedules": "V2Drop stages inside the vision encoder, 'block:ratio/...' strings or none (no stage); "
                         "each combines with every budget/schedule of a method; default [none]",
    "metrics": f"variation metrics for {_takers('takes_metric')}, any of {', '.join(METRICS)}; default [l2]",
    "seeds": f"seeds for {_takers('takes_seed')}; default [0]",
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
class ConfigError(ValueError):
    """A sweep config that cannot run; the message names every problem found."""


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
    source: str = "<config>"  # the config file it was read from
    joined: list[str] = field(default_factory=list)  # the methods ``{method: "*"}`` brought in

    def grid(self, method: str) -> dict[str, list[Any]]:
        """``budgets``, ``schedules``, ``encoder_schedules``, ``metrics``, ``seeds`` of ``method`` (its own, else
        the config's), and its ``options`` sets and ``positions`` rules (its own only; default: the authors'
        rule alone)."""
        own = self.overrides.get(method, {})
        return {
            "budgets": own.get("budgets", self.budgets),
            "schedules": own.get("schedules", self.schedules),
            "encoder_schedules": own.get("encoder_schedules", self.encoder_schedules),
            "metrics": own.get("metrics", self.metrics),
            "seeds": own.get("seeds", self.seeds),
            "options": own.get("options", [None]),
            "positions": own.get("positions", [None]),
            "models": own.get("models", [m.name for m in self.models]),
        }

    def runs_on(self, method: str, model: ModelSpec) -> bool:
        """Whether ``method``'s entry runs on ``model`` (its ``models:`` list; default every model)."""
        return model.name in self.grid(method)["models"]

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


# -- loading ----------------------------------------------------------------------------------------
def load_config(path: str | Path, output: str | Path | None = None) -> SweepConfig:
    """Read, substitute ``${VAR}``/``${VAR:-default}`` from the environment, and validate a config."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the config: {exc}") from None
    return parse_config(raw, default_name=path.stem, output=output, source=str(path))


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
    raw = substitute(dict(raw), "config", errors)
    for key in raw:
        if key not in TOP_KEYS:
            errors.append(f"unknown key {key!r}; known keys: {', '.join(TOP_KEYS)}")

    name = str(raw.get("name") or default_name)
    if not ID_RE.match(name):
        errors.append(f"name: {name!r} is not a plain identifier (letters, digits, '.', '-', '_')")
    out = Path(output) if output is not None else Path(raw.get("output") or Path("results") / name)

    models = parse_models(raw.get("models"), errors)

    metrics = parse_metrics(raw.get("metrics", ["l2"]), "metrics", errors)
    seeds = parse_seeds(raw.get("seeds", [0]), "seeds", errors)
    budgets = parse_budgets(raw.get("budgets"), "budgets", errors)
    schedules = parse_schedules(raw.get("schedules"), errors)
    encoder_schedules = parse_encoder_schedules(raw.get("encoder_schedules", [None]), "encoder_schedules", errors)
    methods, overrides, joined = parse_methods(raw.get("methods"), errors)

    tasks = [str(t) for t in as_list(raw.get("tasks"), "tasks", errors)]
    if not tasks:
        errors.append("tasks: at least one lmms-eval task is needed")
    for t in tasks:
        if "," in t or not t.strip():
            errors.append(f"tasks: {t!r} is not a task name")

    limit = raw.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        errors.append(f"limit: expected a positive number, got {limit!r}")
    batch_size = int_at_least(raw.get("batch_size", 1), "batch_size", errors) or 1
    num_processes = int_at_least(raw.get("num_processes", 1), "num_processes", errors) or 1
    jobs = int_at_least(raw.get("jobs", 1), "jobs", errors) or 1
    include_path = raw.get("include_path")
    if include_path is not None and not isinstance(include_path, str):
        errors.append("include_path: expected one folder path (a string)")
    extra = [str(a) for a in as_list(raw.get("lmms_eval_args"), "lmms_eval_args", errors)]
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
        slurm=slurm, raw=raw, source=source, joined=joined,
    )
    for i, model in enumerate(models):
        problem = local_model_problem(model.pretrained)
        if problem and prepare:  # the prepare step may build it; the runner checks again after it
            cfg.notes.append(f"model {model.name}: {problem} yet (prepare {prepare['call']} is to build it)")
        elif problem:
            errors.append(f"models[{i}] ({model.name}): {problem}")
        elif problem := checkpoint_family_problem(model.pretrained, model.family):
            errors.append(f"models[{i}] ({model.name}): {problem}")
    known = [model.name for model in models]
    for m in methods:
        if unknown := [n for n in cfg.grid(m)["models"] if n not in known]:
            errors.append(f"methods ({m}): models {', '.join(map(repr, unknown))} not in this config; "
                          f"its models: {', '.join(known)}")
        if m in METHODS and get_method(m).drops and not cfg.grid(m)["budgets"] and not cfg.grid(m)["schedules"]:
            errors.append(f"budgets/schedules: method {m!r} needs at least one budget or schedule")
    if not errors:
        _check_grid(cfg, errors, read_layers)
    if errors:
        raise ConfigError(f"{source}: invalid sweep config:\n  - " + "\n  - ".join(errors))
    return cfg


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
        for method in list(cfg.methods):
            if not cfg.runs_on(method, model):
                continue
            grid = cfg.grid(method)
            for enc in grid["encoder_schedules"]:
                why = family_skips(model.family, method, enc)
                if why:
                    cfg.notes.append(f"model {model.name} ({model.family}): skips method {method}"
                                     + (f" at encoder_schedule {enc}" if enc else "") + f": {why}")
                    continue
                try:
                    validate_encoder(enc, method)
                except ValueError as exc:
                    errors.append(f"model {model.name}, method {method}: {exc}")
            if not get_method(method).drops or family_skips(model.family, method, None):
                continue
            problems = []
            for budget in grid["budgets"]:
                try:
                    # a preset too deep for the model is scaled to its depth, as the plugin does
                    validate(method, fitted_preset(model.family, budget, method, depth)[0], num_layers=depth)
                except ValueError as exc:
                    problems.append(f"model {model.name}, method {method}, budget {budget}: {exc}")
            for text in grid["schedules"]:
                try:
                    validate(method, text, num_layers=depth)
                except ValueError as exc:
                    problems.append(f"model {model.name}, method {method}, schedule {text}: {exc}")
            if problems and method in cfg.joined:
                # Brought in by "*": a method that cannot run this grid is left out of the sweep, and said so.
                cfg.methods.remove(method)
                cfg.notes.append(f"method {method} (from {EVERY_METHOD!r}) left out: {problems[0]}")
            else:
                errors.extend(problems)
    if not errors:
        ids = [p.id for p in expand(cfg)]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            errors.append(f"the grid names the same point twice: {', '.join(dup)}")


# -- expansion ----------------------------------------------------------------------------------------
def expand(cfg: SweepConfig) -> list[Point]:
    """All points, in a stable order: per model, ``none`` once, then each method over budgets, schedules;
    each of them once per encoder schedule (``__e<slug>`` in the id; none: no suffix)."""
    points: list[Point] = []
    for model in cfg.models:
        for method in cfg.methods:
            if not cfg.runs_on(method, model):
                continue
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
                variants = [(o, p) for o in grid["options"] for p in grid["positions"]]
                for (budget, schedule), (options, positions) in ((s, v) for s in settings for v in variants):
                    base = Point(id="", model=model, method=method, budget=budget, schedule=schedule, options=options,
                                 positions=positions, encoder_schedule=enc)
                    stem = f"{model.name}__{method}__{base.label}{tail}"
                    # the authors' rule keeps its id
                    opt = (f"__{options}" if options else "") + (f"__positions-{positions}" if positions else "")
                    if spec.takes_metric:
                        for metric in grid["metrics"]:
                            points.append(_with(base, id=f"{stem}__{metric}{opt}", metric=metric))
                    elif spec.takes_seed:
                        for seed in grid["seeds"]:
                            suffix = f"__seed{seed}" if seed != 0 else ""
                            points.append(_with(base, id=stem + suffix + opt, seed=seed))
                    else:
                        points.append(_with(base, id=stem + opt))
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
