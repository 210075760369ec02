"""v2drop-eval: V2Drop vision-token dropping for transformers VLMs, lmms-eval models, sweeps and tables."""

from __future__ import annotations

from typing import Any

__all__ = ["DropSchedule", "DropHandle", "attach", "flops"]
__version__ = "0.1.0"

# Lazy: lmms-eval imports ``v2drop_eval.plugin.manifest`` on every ``import lmms_eval.models``, and
# ``v2drop-eval --help`` should not wait for torch. The public names load on first use.
_LAZY = {
    "DropSchedule": ("v2drop_eval.methods.presets", "DropSchedule"),  # with its presets installed
    "DropHandle": ("v2drop_eval.engine.hooks", "DropHandle"),
    "attach": ("v2drop_eval.methods.api", "attach"),
    "flops": ("v2drop_eval.engine.flops", None),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'v2drop_eval' has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
