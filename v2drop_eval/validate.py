"""The rules every entry point shares (``attach``, the plugin's model args, sweep configs, the CLI).

Light on purpose (no torch): sweep configs and ``--dry-run`` check with these before anything loads,
and the plugin and the engine call the same functions, so a value is refused with the same words
wherever it is given.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

__all__ = ["METHODS", "METRICS", "DEFAULT_METRIC", "DEFAULT_SEED", "check_drop_method", "as_int",
           "local_model_problem"]

METHODS = ("v2drop", "random", "fastv", "none")
METRICS = ("l2", "l1", "cosine")
# ``attach``'s defaults: a method that does not use them may still be handed them.
DEFAULT_METRIC = "l2"
DEFAULT_SEED = 0


def as_int(value: Any) -> Any:
    """``value`` as an int when it is an integral number (lmms-eval turns ``seed=-1`` into ``-1.0``);
    anything else unchanged, for the caller to refuse."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def check_drop_method(method: Any, metric: Any = None, seed: Any = None) -> None:
    """Raise ``ValueError`` unless ``method`` is known, ``metric`` (None: not given) is known and only
    given to ``v2drop``, and ``seed`` (None: not given) is an integer >= 0 given only to ``random``.
    ``attach``'s defaults (metric ``l2``, seed 0) count as not given."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    if metric is not None:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
        if method != "v2drop" and metric != DEFAULT_METRIC:
            raise ValueError(f"metric={metric} applies to method=v2drop only, not method={method}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(as_int(seed), int) or as_int(seed) < 0:
            raise ValueError(f"seed={seed!r} is not allowed; a seed is an integer >= 0")
        if method != "random" and as_int(seed) != DEFAULT_SEED:
            raise ValueError(f"seed={as_int(seed)} applies to method=random only, not method={method}")


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
