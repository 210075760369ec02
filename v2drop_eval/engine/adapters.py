"""Model adapters: the only place that knows where each model family keeps its decoder and vision ids.

The engine sees a :class:`ModelAdapter` and nothing of LLaVA or Qwen. Where a family's decoder does
more between layers than pass the hidden states on (Qwen3-VL's DeepStack additions), the adapter
installs what follows the dropped sequence there (:meth:`ModelAdapter.install_extras`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

from v2drop_eval.engine.contract import contract_error
from v2drop_eval.engine.deepstack import Positions, install_deepstack
from v2drop_eval.engine.families import FAMILIES, family_for_class, family_of_class

__all__ = ["ModelAdapter", "adapter_for", "SUPPORTED_CLASSES", "family_of_class", "forward_takes"]

# class name -> the adapter's family (``llava``, ``qwen2_vl``, ``qwen3_vl``), from the one family table.
SUPPORTED_CLASSES: dict[str, str] = {c: f.adapter_family for f in FAMILIES.values() for c in f.classes}


@dataclass
class ModelAdapter:
    family: str
    top: nn.Module  # the *ForConditionalGeneration model: sees input_ids, labels, the cache
    decoder: nn.Module  # the LLM decoder (LlamaModel, Qwen2VLTextModel, ...)
    layers: nn.ModuleList
    text_config: Any
    vision_token_ids: tuple[int, ...]  # every droppable id: images and videos
    video_token_ids: tuple[int, ...] = ()  # the subset that marks video (counted apart in the stats)
    # Family-specific wrappers: (decoder, model config, positions, drop layers) -> objects with remove().
    extras: tuple[Callable[[nn.Module, Any, Positions, tuple[int, ...]], list[Any]], ...] = ()
    # The decoder's rotary module, (hidden, position ids [B, n]) -> (cos, sin), where positions are one number
    # per token; None for multimodal rotary (M-RoPE: Qwen2-VL, Qwen2.5-VL, Qwen3-VL), which cannot be renumbered.
    rotary: Callable[[Any, Any], Any] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def attn_implementation(self) -> str:
        return str(self.text_config._attn_implementation or "eager")

    @property
    def mask_format(self) -> str:
        """How the decoder's attention takes its mask: ``padding2d`` (flash kernels: [B, S] or None),
        ``additive`` (eager: float 4D) or ``bool`` (sdpa and the like: bool 4D or None)."""
        impl = self.attn_implementation
        if "flash" in impl or ALL_MASK_ATTENTION_FUNCTIONS.get(impl) is flash_attention_mask:
            return "padding2d"
        return "additive" if impl == "eager" else "bool"

    def install_extras(self, positions: Positions, drop_layers: tuple[int, ...]) -> list[Any]:
        """Install the family's wrappers for a dropper with stages at ``drop_layers``. ``positions()`` gives
        the original positions of the hidden states now between decoder layers (None: the whole sequence).
        Returns objects with ``remove()``."""
        return [obj for install in self.extras
                for obj in install(self.decoder, self.top.config, positions, drop_layers)]


def forward_takes(model: nn.Module | type, name: str) -> bool:
    """Whether the model's ``forward`` has the argument ``name``: Qwen-VL forwards take
    ``mm_token_type_ids`` in recent transformers releases and refuse it in older ones (5.0)."""
    cls = model if isinstance(model, type) else type(model)
    return name in inspect.signature(cls.forward).parameters


def adapter_for(model: nn.Module) -> ModelAdapter:
    """Build the adapter for a loaded model, or raise TypeError naming the supported classes."""
    fam = family_for_class(type(model).__name__)
    config = model.config
    decoder = model.model.language_model
    # Images and videos are both vision tokens (dropped alike). llava-hf configs call the ids
    # image_token_index / video_token_index in older releases, *_id in newer; LLaVA-1.5 and LLaVA-NeXT
    # have no video id, LLaVA-OneVision and LLaVA-NeXT-Video do, as do the Qwen-VLs. InternVL has none: its
    # processor writes each video frame as a run of image tokens.
    image_id = _token_id(config, "image")
    if image_id is None:
        raise contract_error(f"{type(model).__name__}'s config has no image_token_id (nor image_token_index)")
    video_id = _token_id(config, "video")
    videos = () if video_id is None else (video_id,)
    extras = (install_deepstack,) if fam.deepstack else ()
    # Renumbering needs one position per token; M-RoPE (three per token) is known from the family, since
    # transformers 5.0's rotary module does not carry mrope_section.
    rotary = None if fam.mrope else getattr(decoder, "rotary_emb", None)
    return ModelAdapter(
        family=fam.adapter_family,
        top=model,
        decoder=decoder,
        layers=decoder.layers,
        text_config=decoder.config,
        vision_token_ids=(image_id, *videos),
        video_token_ids=videos,
        extras=extras,
        rotary=rotary,
    )


def _token_id(config: Any, kind: str) -> int | None:
    for name in (f"{kind}_token_id", f"{kind}_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None
