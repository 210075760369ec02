"""lmms-eval model registrations (entry point ``lmms_eval.models``: ``v2drop = ...manifest:manifests``).

lmms-eval imports this module on every ``import lmms_eval.models``: it names classes by their import
path only (from the one table, ``v2drop_eval.engine.families.LMMS_MODELS``), so nothing heavy (torch,
transformers) loads until a ``v2drop_*`` model is asked for. ``manifests`` is a callable (lmms-eval accepts
one) so that this module imports nothing from lmms-eval either: importing it first, outside lmms-eval,
would otherwise start ``lmms_eval.models``, which loads the entry points, which imports this
half-initialised module.
"""

from __future__ import annotations

from typing import Any

from v2drop_eval.engine.families import LMMS_MODELS

__all__ = ["manifests"]

_PKG = __name__.rpartition(".")[0]  # v2drop_eval.plugin


def _path(cls: str | None) -> str | None:
    return f"{_PKG}.{cls}" if cls else None


def manifests() -> list[Any]:
    """The plugin's models as lmms-eval ``ModelManifest`` objects."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=m.id, chat_class_path=_path(m.chat), simple_class_path=_path(m.simple),
                          aliases=m.aliases) for m in LMMS_MODELS.values()]
