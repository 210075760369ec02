"""lmms-eval model registrations (entry point ``lmms_eval.models``: ``v2drop = ...manifest:manifests``).

lmms-eval imports this module on every ``import lmms_eval.models``: it names classes by their import
path only, so nothing heavy (torch, transformers) loads until a ``v2drop_*`` model is asked for.
``manifests`` is a callable (lmms-eval accepts one) so that this module imports nothing from
lmms-eval either: importing it first, outside lmms-eval, would otherwise start
``lmms_eval.models``, which loads the entry points, which imports this half-initialised module.
"""

from __future__ import annotations

from typing import Any

__all__ = ["manifests", "MODELS"]

_PKG = "v2drop_eval.plugin"

# model id -> (chat class path or None, simple class path or None, aliases). A class exists wherever
# lmms-eval 0.7.3 has one for the parent (chat: llava_hf, qwen2_5_vl, qwen3_vl, internvl_hf; simple: all but
# internvl_hf).
MODELS: dict[str, tuple[str | None, str | None, tuple[str, ...]]] = {
    "v2drop_llava": (f"{_PKG}.llava.V2DropLlavaChat", f"{_PKG}.llava.V2DropLlava", ("v2drop_llava_hf",)),
    "v2drop_qwen2_vl": (None, f"{_PKG}.qwen2_vl.V2DropQwen2VL", ()),
    "v2drop_qwen2_5_vl": (f"{_PKG}.qwen2_vl.V2DropQwen2_5_VLChat", f"{_PKG}.qwen2_vl.V2DropQwen2_5_VL", ()),
    "v2drop_qwen3_vl": (f"{_PKG}.qwen3_vl.V2DropQwen3VLChat", f"{_PKG}.qwen3_vl.V2DropQwen3VL", ()),
    "v2drop_internvl": (f"{_PKG}.internvl.V2DropInternVL", None, ("v2drop_internvl_hf",)),  # internvl_hf: chat only
}


def manifests() -> list[Any]:
    """The plugin's models as lmms-eval ``ModelManifest`` objects."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=model_id, chat_class_path=chat, simple_class_path=simple, aliases=aliases)
            for model_id, (chat, simple, aliases) in MODELS.items()]
