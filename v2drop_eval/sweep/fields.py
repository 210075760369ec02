"""The checks of each sweep-config key: every problem is appended to ``errors`` with its location, so one
run of :func:`v2drop_eval.sweep.config.parse_config` names them all. Also the executor and SLURM options."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from v2drop_eval.engine.families import FAMILY_NAMES, LMMS_MODELS, get_family
from v2drop_eval.methods import BASELINE, get_method, options_text, parse_options
from v2drop_eval.methods.presets import DropSchedule
from v2drop_eval.methods.rules import METHODS, METRICS, POSITION_RULES, check_seed, validate_encoder
from v2drop_eval.sweep.points import ModelSpec

__all__ = ["EVERY_METHOD", "EXECUTORS", "SLURM_KEYS", "FAMILY_MODELS", "MODEL_KEYS", "METHOD_KEYS", "OWN_MODEL_ARGS", "ID_RE",
           "substitute", "as_list", "int_at_least", "parse_metrics", "parse_seeds", "parse_model_names", "parse_option_sets", "parse_budgets", "parse_methods",
           "parse_encoder_schedules",
           "parse_models", "parse_schedules", "parse_executor", "parse_slurm"]

EXECUTORS = {
    "inline": "points run here, one lmms-eval process each (`jobs` at a time); no extra dependency",
    "local": "each point a submitit job on this machine (`jobs` at a time); needs submitit",
    "slurm": "each point a task of a SLURM job array, options under `slurm:`; needs submitit",
}
# key: (accepted types, default, meaning). GPUs per point are the config's num_processes.
SLURM_KEYS: dict[str, tuple[tuple[type, ...], Any, str]] = {
    "partition": ((str,), None, "partition (sbatch --partition); default: the cluster's"),
    "time_min": ((int,), 720, "time limit of one point in minutes (sbatch --time)"),
    "cpus_per_task": ((int,), 8, "CPU cores per point"),
    "mem_gb": ((int, float), None, "memory per point in GB (sbatch --mem); default: the cluster's"),
    "gpus": ((int,), None, "GPUs per point; default: num_processes"),
    "account": ((str,), None, "account to charge (sbatch --account)"),
    "qos": ((str,), None, "quality of service (sbatch --qos)"),
    "constraint": ((str,), None, "node features (sbatch --constraint), e.g. a100"),
    "array_parallelism": ((int,), 64, "points of the job array running at the same time"),
    "job_name": ((str,), None, "job name; default v2drop-<sweep name>"),
    "setup": ((list,), [], "shell lines run before each point, e.g. [module load cuda, source .venv/bin/activate]"),
    "additional": ((dict,), {}, "other sbatch options as a mapping, e.g. {mail_type: END}"),
}
# ``{method: "*", ...}`` in a config's methods: every registered dropping method the list does not name, on
# that entry's grid; so a method registered later joins a sweep such as the demo's without an edit.
EVERY_METHOD = "*"
# lmms-eval model name registered by the plugin for each family (``model:`` in a config overrides it).
FAMILY_MODELS = {name: get_family(name).lmms_model for name in FAMILY_NAMES}
METHOD_KEYS = ("budgets", "schedules", "encoder_schedules", "metrics", "seeds", "options", "positions", "models")
MODEL_KEYS = {
    "name": "model id used in point ids (letters, digits, '.', '-', single '_')",
    "family": f"model family, one of {', '.join(sorted(FAMILY_MODELS))}",
    "pretrained": "hub id or local folder (model arg pretrained=)",
    "model": "lmms-eval model name; default by family (v2drop_llava, v2drop_qwen2_vl, ...)",
    "num_layers": "decoder layer count, for the depth check; default: read offline with AutoConfig",
    "model_args": "extra model args (mapping), e.g. {device_map: cpu, attn_implementation: sdpa}",
}
OWN_MODEL_ARGS = {"pretrained", "budget", "schedule", "method", "metric", "seed", "options", "positions", "encoder_schedule"}
ID_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.\-]|_(?!_))*$")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute(value: Any, where: str, errors: list[str]) -> Any:
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
        return [substitute(v, f"{where}[{i}]", errors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: substitute(v, f"{where}.{k}", errors) for k, v in value.items()}
    return value


def as_list(value: Any, key: str, errors: list[str]) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [value]
    if not isinstance(value, list):
        errors.append(f"{key}: expected a list, got {type(value).__name__}")
        return []
    return value


def int_at_least(value: Any, key: str, errors: list[str], minimum: int = 1) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        errors.append(f"{key}: expected an integer >= {minimum}, got {value!r}")
        return None
    return value


def parse_metrics(value: Any, where: str, errors: list[str]) -> list[str]:
    metrics = [str(m) for m in as_list(value, where, errors)]
    for m in metrics:
        if m not in METRICS:
            errors.append(f"{where}: unknown metric {m!r}; known metrics: {', '.join(METRICS)}")
    if not metrics:
        errors.append(f"{where}: at least one metric is needed (default [l2])")
    return metrics


def parse_seeds(value: Any, where: str, errors: list[str]) -> list[int]:
    seeds = []
    for s in as_list(value, where, errors):
        try:
            check_seed(s)
        except ValueError as exc:
            errors.append(f"{where}: {exc}")
        else:
            seeds.append(int(s))
    return seeds


def parse_encoder_schedules(value: Any, where: str, errors: list[str]) -> list[str | None]:
    """``[none, "12:0.5/18:0.5"]`` -> ``[None, "12:0.5/18:0.5"]`` (each checked as an encoder schedule)."""
    out: list[str | None] = []
    items = [None] if value is None else as_list(value, where, errors)
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


def parse_position_rules(value: Any, where: str, errors: list[str]) -> list[str | None]:
    """``positions: [null, keep]``: one point per rule; null is the method's authors' rule (the default)."""
    rules: list[str | None] = []
    for item in as_list(value, where, errors):
        rule = None if item is None else str(item).strip().lower()
        if rule is not None and rule not in POSITION_RULES:
            errors.append(f"{where}: positions={item!r} is not allowed; allowed: {', '.join(POSITION_RULES)} "
                          "(null: the method's authors' rule)")
        elif rule in rules:
            errors.append(f"{where}: positions={rule} is listed twice")
        else:
            rules.append(rule)
    return rules or [None]


def parse_model_names(value: Any, where: str, errors: list[str]) -> list[str]:
    """``models: [scenes_llava]``: the entry runs on these of the config's models only (checked against
    ``models`` once both are read)."""
    names: list[str] = []
    for item in as_list(value, where, errors):
        if not isinstance(item, str) or not item:
            errors.append(f"{where}: {item!r} is not a model name (a models[].name of this config)")
        elif item in names:
            errors.append(f"{where}: model {item!r} is listed twice")
        else:
            names.append(item)
    if not names:
        errors.append(f"{where}: expected at least one model name (leave the key out to run on every model)")
    return names


def parse_option_sets(value: Any, method: str, where: str, errors: list[str]) -> list[str | None]:
    """``options: [[], [float32_scores], float32_scores+exact_counts]``: one point per set; an empty set (or
    null) is the authors' rule."""
    if not isinstance(value, list):
        errors.append(f"{where}: expected a list of option sets, e.g. [[], [float32_scores]]")
        return [None]
    sets: list[str | None] = []
    for i, item in enumerate(value):
        try:
            chosen = parse_options(item, method) if method in METHODS else frozenset()
        except ValueError as exc:
            errors.append(f"{where}[{i}]: {exc}")
            continue
        text = options_text(chosen) or None
        if text in sets:
            errors.append(f"{where}[{i}]: the option set {text or '[]'} is listed twice")
        sets.append(text)
    if not sets and not errors:
        errors.append(f"{where}: at least one option set is needed ([] for the authors' rule)")
    return sets or [None]


def parse_budgets(value: Any, where: str, errors: list[str]) -> list[int | str]:
    budgets: list[int | str] = []
    for b in as_list(value, where, errors):
        if isinstance(b, bool) or not isinstance(b, (int, str)):
            errors.append(f"{where}: {b!r} is not a budget (an integer such as 128, or 'default')")
        elif isinstance(b, str) and not re.fullmatch(r"[A-Za-z0-9]+", b):
            errors.append(f"{where}: {b!r} is not a budget name")
        else:
            budgets.append(int(b) if isinstance(b, str) and b.isdigit() else b)
    return budgets


def parse_methods(value: Any, errors: list[str]) -> tuple[list[str], dict[str, dict[str, list[Any]]], list[str]]:
    """``[none, v2drop, {method: fastv, budgets: [192], schedules: []}, {method: "*", schedules: [...]}]``:
    names, per-method grids, and the names the ``"*"`` entry brought in (in registry order)."""
    methods: list[str] = []
    overrides: dict[str, dict[str, list[Any]]] = {}
    every: dict[str, list[Any]] | None = None
    for i, item in enumerate(as_list(value, "methods", errors)):
        where = f"methods[{i}]"
        if isinstance(item, Mapping):
            unknown = sorted(set(item) - {"method", *METHOD_KEYS})
            if unknown or "method" not in item:
                errors.append(f"{where}: expected {{method: NAME, {': [...], '.join(METHOD_KEYS)}: [...]}}"
                              + (f"; unknown key(s) {', '.join(map(repr, unknown))}" if unknown else ""))
                continue
            name = str(item["method"])
            if name == EVERY_METHOD and "options" in item:
                errors.append(f"{where}: options belong to one method; name it instead of {EVERY_METHOD!r}")
                continue
            grid: dict[str, list[Any]] = {}
            if "budgets" in item:
                grid["budgets"] = parse_budgets(item["budgets"], f"{where}.budgets", errors)
            if "schedules" in item:
                grid["schedules"] = parse_schedules(item["schedules"], errors, f"{where}.schedules")
            if "encoder_schedules" in item:
                grid["encoder_schedules"] = parse_encoder_schedules(item["encoder_schedules"],
                                                                    f"{where}.encoder_schedules", errors)
            if "metrics" in item:
                grid["metrics"] = parse_metrics(item["metrics"], f"{where}.metrics", errors)
            if "seeds" in item:
                grid["seeds"] = parse_seeds(item["seeds"], f"{where}.seeds", errors)
            if "options" in item:
                grid["options"] = parse_option_sets(item["options"], name, f"{where}.options", errors)
            if "positions" in item:
                grid["positions"] = parse_position_rules(item["positions"], f"{where}.positions", errors)
            if "models" in item:
                grid["models"] = parse_model_names(item["models"], f"{where}.models", errors)
            if name == EVERY_METHOD:
                if every is not None:
                    errors.append(f"methods: {EVERY_METHOD!r} is listed twice")
                every = grid
                continue
            overrides[name] = grid
        else:
            name = str(item)
            if name == EVERY_METHOD:
                errors.append(f"{where}: {EVERY_METHOD!r} needs its grid: {{method: '{EVERY_METHOD}', schedules: [...]}}")
                continue
        if name not in METHODS:
            errors.append(f"methods: unknown method {name!r}; known methods: {', '.join(METHODS)}")
        elif name in methods:
            errors.append(f"methods: {name!r} is listed twice")
        methods.append(name)
    joined: list[str] = []
    if every is not None:
        joined = [m for m in METHODS if m not in methods and get_method(m).drops]
        overrides.update({m: dict(every) for m in joined})
        methods += joined
    if not methods:
        errors.append("methods: at least one method is needed")
    return methods, overrides, joined


def parse_models(value: Any, errors: list[str]) -> list[ModelSpec]:
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
        if not isinstance(name, str) or not ID_RE.match(name):
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
        if "," in pretrained or "=" in pretrained:
            errors.append(f"{where}: pretrained={pretrained!r}: lmms-eval splits model args on ',' and '=', so a "
                          "path with either cannot be passed; rename or link the folder")
        model = m.get("model")
        served = [n for lm in LMMS_MODELS.values() if lm.id == FAMILY_MODELS[family] for n in (lm.id, *lm.aliases)]
        if model is not None and model not in served:
            errors.append(f"{where}: model {model!r} is not an lmms-eval model of family {family}; allowed: "
                          f"{', '.join(served)} (or leave model out)")
        num_layers = m.get("num_layers")
        if num_layers is not None:
            num_layers = int_at_least(num_layers, f"{where}: num_layers", errors)
        margs = m.get("model_args") or {}
        if not isinstance(margs, Mapping):
            errors.append(f"{where}: model_args must be a mapping")
            margs = {}
        for k, v in margs.items():
            if k == "sidecar":
                errors.append(f"{where}: model_args.sidecar: the sweep keeps each point's side-car beside its "
                              "results, where it checks it")
            elif k in OWN_MODEL_ARGS:
                errors.append(f"{where}: model_args.{k} is set by the sweep; use the config keys instead")
            if "," in str(v) or "=" in str(k) or "," in str(k):
                errors.append(f"{where}: model_args.{k}={v!r}: lmms-eval splits model args on ',' and '='")
        models.append(ModelSpec(
            name=name, family=str(family), pretrained=pretrained,
            model=str(m.get("model") or FAMILY_MODELS[family]), num_layers=num_layers,
            model_args=tuple((str(k), v) for k, v in margs.items()),
        ))
    return models


def parse_schedules(value: Any, errors: list[str], key: str = "schedules") -> list[str]:
    out: list[str] = []
    for i, item in enumerate(as_list(value, key, errors)):
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
                errors.append(f"{where}: empty schedule {text!r}; use method {BASELINE!r} for the unpruned model")
                continue
            out.append(str(sched))
    return out


def _is_list_of_lists(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, list) for v in value)


def parse_executor(value: Any, errors: list[str]) -> str:
    name = "inline" if value is None else value
    if name not in EXECUTORS:
        errors.append(f"executor: unknown executor {value!r}; known executors: {', '.join(EXECUTORS)}")
        return "inline"
    return str(name)


def parse_slurm(value: Any, errors: list[str]) -> dict[str, Any]:
    """The ``slurm:`` mapping, checked key by key; defaults filled in."""
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        errors.append("slurm: expected a mapping of options (" + ", ".join(SLURM_KEYS) + ")")
        return {k: d for k, (_, d, _) in SLURM_KEYS.items()}
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key not in SLURM_KEYS:
            errors.append(f"slurm: unknown option {key!r}; known options: {', '.join(SLURM_KEYS)}")
            continue
        types, _, meaning = SLURM_KEYS[key]
        if isinstance(item, bool) or not isinstance(item, types):
            errors.append(f"slurm.{key}: {item!r} is not allowed; expected {'/'.join(t.__name__ for t in types)} "
                          f"({meaning})")
        elif isinstance(item, (int, float)) and item < (0 if key == "gpus" else 1):
            errors.append(f"slurm.{key}: {item!r} is not allowed; expected a number >= {0 if key == 'gpus' else 1}")
        elif key == "setup" and not all(isinstance(s, str) for s in item):
            errors.append(f"slurm.setup: expected a list of shell lines (strings), got {item!r}")
        else:
            out[key] = item
    return {k: out.get(k, d) for k, (_, d, _) in SLURM_KEYS.items()}


