"""Methods on the engine: the registry of every dropping method (one file each), their presets
(``presets``), the rules every entry point applies (``rules``) and the one-call API (``api.attach``).
Imports the engine only. Light: the registry and the rules load without torch.

Adding a method: write ``v2drop_eval/methods/<name>.py`` with a :class:`~v2drop_eval.engine.method.Method`
subclass and ``METHOD = <instance>``, and add the module to ``_MODULES`` below (CONTRIBUTING.md, "Adding a
method").
"""

from __future__ import annotations

import importlib

from v2drop_eval.engine.method import Method, ScoreContext

__all__ = ["REGISTRY", "METHODS", "BASELINE", "DEFAULT_METHOD", "Method", "ScoreContext", "get_method"]

# Order is the order of tables, plots, the bench and error messages: the unpruned baseline first.
_MODULES = ("none", "v2drop", "random_drop", "fastv", "fastv_attn", "pdrop", "dart", "visionzip")

REGISTRY: dict[str, Method] = {}
for _module in _MODULES:
    _method = importlib.import_module(f"{__name__}.{_module}").METHOD
    if _method.name in REGISTRY:
        raise RuntimeError(f"two methods are named {_method.name!r}")
    REGISTRY[_method.name] = _method
METHODS: tuple[str, ...] = tuple(REGISTRY)
# The unpruned reference every table compares with: the one method that drops nothing.
(BASELINE,) = (name for name, m in REGISTRY.items() if not m.drops)
# What ``attach``, the model args and the bench run when no method is named.
DEFAULT_METHOD = REGISTRY["v2drop"].name


def get_method(name: str) -> Method:
    """The registered method ``name``; ValueError naming the allowed ones."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
    return REGISTRY[name]
