"""The method registry: every dropping method, declared once. Light (no torch).

Adding a method: write ``v2drop_eval/methods/<name>.py`` with a :class:`~v2drop_eval.methods.base.Method`
subclass and ``METHOD = <instance>``, and add the module to ``_MODULES`` below (README, "Adding a method").
"""

from __future__ import annotations

import importlib

from v2drop_eval.methods.base import Method, ScoreContext

__all__ = ["REGISTRY", "METHODS", "Method", "ScoreContext", "get_method"]

# Order is the order of tables, plots and error messages; ``none`` (the baseline) last.
_MODULES = ("v2drop", "random_drop", "fastv", "fastv_attn", "pdrop", "dart", "visionzip", "none")

REGISTRY: dict[str, Method] = {}
for _module in _MODULES:
    _method = importlib.import_module(f"{__name__}.{_module}").METHOD
    if _method.name in REGISTRY:
        raise RuntimeError(f"two methods are named {_method.name!r}")
    REGISTRY[_method.name] = _method
METHODS: tuple[str, ...] = tuple(REGISTRY)


def get_method(name: str) -> Method:
    """The registered method ``name``; ValueError naming the allowed ones."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
    return REGISTRY[name]
