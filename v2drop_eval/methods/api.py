"""The one-call Python API: ``attach(model, schedule, method=...)`` returns a handle with ``detach()``."""

from __future__ import annotations

from torch import nn

from v2drop_eval.engine.hooks import DropHandle
from v2drop_eval.engine.schedule import DropSchedule
from v2drop_eval.methods import DEFAULT_METHOD, get_method
from v2drop_eval.methods.rules import DEFAULT_METRIC, DEFAULT_SEED, validate

__all__ = ["attach", "DropHandle"]


def attach(
    model: nn.Module,
    schedule: DropSchedule | str,
    method: str = DEFAULT_METHOD,
    metric: str | None = None,
    seed: int | None = None,
) -> DropHandle:
    """Make ``model`` drop vision tokens by ``schedule`` at every prefill; returns a handle to detach.

    ``method``: any registered method (``v2drop_eval.methods.METHODS``: ``v2drop`` with ``metric`` l2 |
    l1 | cosine (default l2), ``random`` with ``seed`` (default 0), ``fastv``, ``fastv_attn``, ``pdrop``, ``dart``), or ``none`` (nothing
    changes; the unpruned baseline with the same accounting). Bad arguments raise ``ValueError`` naming
    them (the rules of ``v2drop_eval.methods.rules``: a ``metric`` or ``seed`` the method does not use is
    refused); an unsupported model ``TypeError``.
    """
    parsed = validate(method, schedule, metric, seed)
    return DropHandle(model, parsed, get_method(method), metric=metric or DEFAULT_METRIC,
                      seed=DEFAULT_SEED if seed is None else seed)
