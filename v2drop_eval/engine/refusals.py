"""What the engine refuses, and the words it refuses with (docs/design.md §2): each case would
otherwise give silently wrong output."""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import DynamicCache

__all__ = ["check_attention", "check_cache_type", "INPUTS_EMBEDS", "LABELS", "FOREIGN_CACHE", "CHUNKED"]

INPUTS_EMBEDS = "inputs_embeds without input_ids is not supported: vision tokens are found from input_ids; pass input_ids"
LABELS = ("labels= with dropping is not supported: logits exist only for the kept positions; compute the loss "
          "without a dropper attached (or with the unpruned baseline method)")
FOREIGN_CACHE = ("continuing generation from a cache this dropper did not prefill is not supported (chunked prefill, "
                 "a pre-filled cache from another run)")
CHUNKED = "vision tokens after the prefill (chunked prefill) are not supported"


def check_attention(impl: str) -> None:
    if impl == "flex_attention":
        raise ValueError("attn_implementation 'flex_attention' is not supported (its BlockMask cannot be gathered); "
                         "use 'sdpa', 'eager' or 'flash_attention_2'")


def check_cache_type(cache: Any) -> None:
    if cache is not None and not isinstance(cache, DynamicCache):
        raise ValueError(f"cache type {type(cache).__name__} is not supported: the dropped layers need per-layer "
                         "lengths; use the default DynamicCache (no cache_implementation='static', no torch.compile cache)")
