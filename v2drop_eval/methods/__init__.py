"""Methods on the engine: the registry of every dropping method (one file each), their presets
(``presets``), the rules every entry point applies (``rules``) and the one-call API (``api.attach``).
Imports the engine only. Light: the registry and the rules load without torch.

Adding a method: write ``v2drop_eval/methods/<name>.py`` with a :class:`~v2drop_eval.engine.method.Method`
subclass and ``METHOD = <instance>``, and add the module to ``_MODULES`` below (CONTRIBUTING.md, "Adding a
method").
"""

from __future__ import annotations

import importlib

from v2drop_eval.engine.method import OPTION_SEPARATOR, Method, Option, ScoreContext
from v2drop_eval.engine.schedule import install_method_lookup

__all__ = ["REGISTRY", "METHODS", "BASELINE", "DEFAULT_METHOD", "OPTIONS", "Method", "Option", "ScoreContext",
           "get_method", "parse_options", "options_text"]

# Order is the order of tables, plots, the bench and error messages: the unpruned baseline first.
_MODULES = ("none", "v2drop", "random_drop", "fastv", "fastv_attn", "pdrop", "dart", "sparsevlm", "visionzip")

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


# Schedules count as a named method counts (``DropSchedule.tokens_per_layer(..., method)``; "": the default).
install_method_lookup(lambda name: get_method(name or DEFAULT_METHOD))


# Every named option (a deliberate departure from a method's published rule, off by default) -> the
# methods that take it, in registry order; each option is declared once (engine/method.py or its method's file).
OPTIONS: dict[str, Option] = {o.name: o for m in REGISTRY.values() for o in m.options}
_TAKERS: dict[str, tuple[str, ...]] = {
    name: tuple(m.name for m in REGISTRY.values() if any(o.name == name for o in m.options)) for name in OPTIONS
}


def parse_options(value: object, method: str | None = None) -> frozenset[str]:
    """Option names from ``value`` (None, ``"a+b"``, or a list of names), checked against the known options
    and, with ``method``, against the ones that method takes; ValueError naming the bad one."""
    if value is None:
        return frozenset()
    if isinstance(value, str):
        names = [v.strip() for v in value.split(OPTION_SEPARATOR)]
        names = [] if names == [""] else names
    elif isinstance(value, (list, tuple, set, frozenset)):
        names = [str(v).strip() for v in value]
    else:
        raise ValueError(f"options={value!r} is not a list of option names (e.g. float32_scores+exact_counts)")
    for name in names:
        if name not in OPTIONS:
            known = ", ".join(OPTIONS) or "none"
            raise ValueError(f"unknown option {name!r}; known options: {known}")
        if method is not None and name not in (o.name for o in get_method(method).options):
            takers = ", ".join(f"method={m}" for m in _TAKERS[name])
            raise ValueError(f"option {name} applies to {takers} only, not method={method}")
    return frozenset(names)


def options_text(options: frozenset[str] | tuple[str, ...] | None) -> str:
    """The canonical text of a set of options (``a+b`` in declaration order; "" for none)."""
    chosen = set(options or ())
    return OPTION_SEPARATOR.join(name for name in OPTIONS if name in chosen)
