"""The rules every entry point shares (``attach``, the plugin's model args, sweep configs, the CLI).

Light on purpose (no torch; the method registry is light too): sweep configs and ``--dry-run`` check with
these before anything loads, and the plugin and ``attach`` call the same functions, so a value is refused
with the same words wherever it is given.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from v2drop_eval.engine.families import FAMILIES, get_family, lmms_siblings
from v2drop_eval.engine.method import POSITION_RULES, Method
from v2drop_eval.engine.schedule import DropSchedule
from v2drop_eval.methods import BASELINE, METHODS, OPTIONS, get_method, parse_options
from v2drop_eval.methods.v2drop import DEFAULT_METRIC, METRICS

__all__ = ["METHODS", "METRICS", "OPTIONS", "DEFAULT_METRIC", "DEFAULT_SEED", "validate", "check_drop_method",
           "check_seed", "schedule_problem", "as_int", "local_model_problem", "checkpoint_family_problem",
           "validate_encoder", "POSITION_RULES"]

# The seed a method that takes one uses when none is given.
DEFAULT_SEED = 0


def as_int(value: Any) -> Any:
    """``value`` as an int when it is an integral number (lmms-eval turns ``seed=-1`` into ``-1.0``);
    anything else unchanged, for the caller to refuse."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def check_seed(seed: Any) -> int:
    """``seed`` as an int; ``ValueError`` unless it is an integer >= 0."""
    if isinstance(seed, bool) or not isinstance(as_int(seed), int) or as_int(seed) < 0:
        raise ValueError(f"seed={seed!r} is not allowed; a seed is an integer >= 0")
    return as_int(seed)


def _takers(flag: str) -> str:
    return ", ".join(f"method={m}" for m in METHODS if getattr(get_method(m), flag))


def schedule_problem(spec: Method, schedule: DropSchedule) -> str | None:
    """Why method ``spec`` cannot take ``schedule`` (None if it can). The same words everywhere."""
    if schedule.pre_llm is not None and not spec.pre_llm:
        return (f"a pre-LLM stage '0:{schedule.pre_llm}' is for {_takers('pre_llm')}; method {spec.name} "
                "drops inside the decoder")
    if spec.pre_llm and (schedule.pre_llm is None or schedule.llm_stages):
        budgets = ", ".join(str(b) for table in spec.presets.values() for b in table)
        return (f"method {spec.name} takes one pre-LLM stage '0:D+C' (D dominant tokens with the [CLS], C "
                f"contextual), e.g. 0:108+20, or a budget ({budgets}); got schedule {schedule}")
    if not spec.drops:
        return None  # attach() takes any schedule with it: hooks on, nothing dropped
    if schedule.is_empty:
        return (f"method {spec.name} needs a budget or a schedule that drops something; for the unpruned "
                f"baseline use method {BASELINE}")
    if not spec.multi_stage and len(schedule.stages) != 1:
        return (f"method {spec.name} drops once, at one layer: schedule {schedule} has {len(schedule.stages)} "
                "stages; give a one-stage schedule such as 2:0.3, or a budget")
    if schedule.is_adaptive and not spec.adaptive:
        takers = ", ".join(m for m in METHODS if get_method(m).adaptive)
        return (f"adaptive stages need method {takers}, not {spec.name!r}: they rank tokens by variation "
                f"({schedule})")
    return None


def check_drop_method(method: Any, metric: Any = None, seed: Any = None, options: Any = None,
                      positions: Any = None) -> frozenset[str]:
    """Raise ``ValueError`` unless ``method`` is registered, ``metric`` (None: not given) is known and
    given only to a method that takes one, ``seed`` (None: not given) is an integer >= 0 given only
    to a method that takes one, and every option is known and taken by the method. The one rule for
    metric and seed: an argument a method does not use is refused, whatever its value (``metric=l2``
    with ``method=random`` too), so that no run silently ignores it. ``positions``
    (None: the method's own rule) must be a position rule. Returns the options, parsed."""
    if positions is not None and positions not in POSITION_RULES:
        raise ValueError(f"positions={positions!r} is not allowed; allowed: {', '.join(POSITION_RULES)} "
                         "(default: the method's authors' rule)")
    spec = get_method(method)
    if metric is not None:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
        if not spec.takes_metric:
            raise ValueError(f"metric={metric} applies to {_takers('takes_metric')} only, not method={method}")
    if seed is not None:
        check_seed(seed)
        if not spec.takes_seed:
            raise ValueError(f"seed={as_int(seed)} applies to {_takers('takes_seed')} only, not method={method}")
    return parse_options(options, method)


def validate(method: Any, schedule: DropSchedule | str | None = None, metric: Any = None, seed: Any = None,
             num_layers: int | None = None, options: Any = None, positions: Any = None) -> DropSchedule | None:
    """The one rule every entry point applies (``attach``, model args, sweep configs, the bench):
    ``method``, ``metric``, ``seed`` and ``options`` as :func:`check_drop_method`; ``schedule`` (None: not
    given) parsed, taken by the method (stage count, adaptive stages) and, with ``num_layers``, within the
    model's depth. Returns the parsed schedule. Raises ``ValueError`` naming the bad value."""
    check_drop_method(method, metric, seed, options, positions)
    if schedule is None:
        return None
    parsed = DropSchedule.parse(schedule)
    problem = schedule_problem(get_method(method), parsed)
    if problem:
        raise ValueError(problem)
    if num_layers is not None:
        parsed.check_depth(num_layers)
    return parsed


def validate_encoder(encoder_schedule: Any, method: Any = None) -> DropSchedule | None:
    """``encoder_schedule`` (None, ``""`` or ``none``: not given) parsed as stages ``block:keep_ratio`` inside
    the vision encoder, and taken with ``method``. ``ValueError`` naming the bad value."""
    if encoder_schedule is None:
        return None
    try:
        parsed = DropSchedule.parse(encoder_schedule if isinstance(encoder_schedule, DropSchedule)
                                    else str(encoder_schedule))
    except ValueError as exc:
        raise ValueError(f"encoder_schedule={encoder_schedule}: {exc}") from None
    if parsed.is_empty:
        return None
    if parsed.is_adaptive or parsed.pre_llm is not None:
        raise ValueError(f"encoder_schedule={encoder_schedule}: encoder stages are 'block:keep_ratio' (e.g. "
                         "12:0.5/18:0.5); adaptive stages compare with text tokens and '0:D+C' is for "
                         f"{_takers('pre_llm')}, neither exists inside the encoder")
    if method is not None and get_method(method).pre_llm:
        raise ValueError(f"encoder_schedule={encoder_schedule} does not combine with method={method}: both choose "
                         "the tokens that leave the vision encoder")
    return parsed


def _looks_local(pretrained: str) -> bool:
    """A folder path rather than a hub id (``org/name``: at most one '/', no leading '.', '/' or '~')."""
    return pretrained.startswith(("/", ".", "~")) or pretrained.count("/") > 1 or os.sep != "/" and os.sep in pretrained


def local_model_problem(pretrained: str) -> str | None:
    """Why ``pretrained`` cannot be a model folder, or None (a hub id is left to the hub)."""
    path = Path(pretrained).expanduser()
    if path.is_dir():
        return None
    if path.exists():
        return f"pretrained={pretrained}: {path} is not a folder (give a model folder or a hub id like org/name)"
    if _looks_local(pretrained):
        return f"pretrained={pretrained}: no such folder {path}"
    return None


def checkpoint_family_problem(pretrained: str, family: str) -> str | None:
    """Why the local checkpoint ``pretrained`` is not of ``family`` (its ``config.json``'s ``model_type``
    is none of the family's lmms-eval model's), or None (the same, a hub id, or no config to read)."""
    path = Path(pretrained).expanduser() / "config.json"
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # not a local folder with a config: the plugin checks it when it loads
    accepted = tuple(t for f in lmms_siblings(family) for t in f.model_types)
    if model_type in accepted:
        return None
    others = [f.name for f in FAMILIES.values() if model_type in f.model_types]
    return (f"pretrained={pretrained} is a {model_type!r} checkpoint, not family {get_family(family).name} "
            f"(model_type {' or '.join(accepted)})" + (f"; use family {others[0]}" if others else ""))
