"""The one-call Python API: ``attach(model, schedule, method=...)`` returns a handle with ``detach()``."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from v2drop_eval.engine.hooks import DropHandle
from v2drop_eval.engine.schedule import DropSchedule
from v2drop_eval.methods import DEFAULT_METHOD, get_method
from v2drop_eval.methods.rules import (
    DEFAULT_METRIC,
    DEFAULT_SEED,
    check_drop_method,
    validate,
    validate_encoder,
)

__all__ = ["attach", "DropHandle"]


def attach(
    model: nn.Module,
    schedule: DropSchedule | str,
    method: str = DEFAULT_METHOD,
    metric: str | None = None,
    seed: int | None = None,
    options: str | Iterable[str] | None = None,
    encoder_schedule: DropSchedule | str | None = None,
    positions: str | None = None,
) -> DropHandle:
    """Make ``model`` drop vision tokens by ``schedule`` at every prefill; returns a handle to detach.

    ``method``: any registered method (``v2drop_eval.methods.METHODS``: ``v2drop`` with ``metric`` l2 |
    l1 | cosine (default l2), ``random`` with ``seed`` (default 0), ``fastv``, ``fastv_attn``, ``pdrop``,
    ``dart``, ``sparsevlm``, ``visionzip`` with its one pre-LLM stage ``0:D+C``), or ``none`` (nothing changes;
    the unpruned baseline with the same accounting). Each method picks what its authors' code picks;
    ``options`` (names, or ``"a+b"``; ``v2drop_eval.methods.OPTIONS``) turn on the method's named departures
    from that rule, e.g. ``float32_scores``, ``exact_counts`` (docs/methods.md). Bad arguments raise
    ``ValueError`` naming them (the rules of ``v2drop_eval.methods.rules``: a ``metric`` or ``seed`` the
    method does not use is refused); an unsupported model ``TypeError``.

    ``encoder_schedule`` (e.g. ``"12:0.5/18:0.5"``): V2Drop's stages inside the vision encoder (its blocks),
    with any LLM method. ``positions``: how rotary positions follow tokens removed, in the decoder and before
    it, ``keep`` or ``renumber`` (docs/design.md §2); None: the method's authors' rule (``pdrop``,
    ``sparsevlm`` and ``visionzip`` renumber, the others keep; before the LLM on M-RoPE every method keeps,
    and ``renumber`` is refused there).
    """
    if options is not None and not isinstance(options, str):
        options = list(options)
    parsed = validate(method, schedule, metric, seed, options=options, positions=positions)
    chosen = check_drop_method(method, options=options)
    encoder = validate_encoder(encoder_schedule, method)
    return DropHandle(model, parsed, get_method(method), metric=metric or DEFAULT_METRIC,
                      seed=DEFAULT_SEED if seed is None else seed, options=chosen,
                      encoder_schedule=encoder, positions=positions)
