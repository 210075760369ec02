"""The method registry: every dropping method, declared once. Light (no torch).

Adding a method: write ``v2drop_eval/methods/<name>.py`` with a :class:`~v2drop_eval.methods.base.Method`
subclass and ``METHOD = <instance>``, and add the module to ``_MODULES`` below (README, "Adding a method").
"""

from __future__ import annotations

import importlib

from v2drop_eval.methods.base import Method, Option, ScoreContext

__all__ = ["REGISTRY", "METHODS", "OPTIONS", "Method", "Option", "ScoreContext", "get_method", "parse_options",
           "options_text"]

# Order is the order of tables, plots and error messages; ``none`` (the baseline) last.
_MODULES = ("v2drop", "random_drop", "fastv", "fastv_attn", "pdrop", "dart", "none")

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

# Every named option (a deliberate departure from a method's published rule, off by default) -> the
# methods that take it, in registry order; each option is declared once (methods/base.py or its method's file).
OPTIONS: dict[str, Option] = {o.name: o for m in REGISTRY.values() for o in m.options}
_TAKERS: dict[str, tuple[str, ...]] = {
    name: tuple(m.name for m in REGISTRY.values() if any(o.name == name for o in m.options)) for name in OPTIONS
}
OPTION_SEPARATOR = "+"  # lmms-eval splits model args on commas


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
