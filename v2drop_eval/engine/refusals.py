"""What the engine refuses, and the words it refuses with (docs/design.md §2): each case would
otherwise give silently wrong output."""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import DynamicCache

from v2drop_eval.engine.method import KEEP, RENUMBER

__all__ = ["check_attention", "check_cache_type", "check_encoder", "check_renumbering",
           "patches_per_crop", "INPUTS_EMBEDS", "LABELS",
           "FOREIGN_CACHE", "CHUNKED", "check_decode_tokens"]

INPUTS_EMBEDS = "inputs_embeds without input_ids is not supported: vision tokens are found from input_ids; pass input_ids"
LABELS = ("labels= with dropping is not supported: logits exist only for the kept positions; compute the loss "
          "without a dropper attached (or with the unpruned baseline method)")
FOREIGN_CACHE = ("continuing generation from a cache this dropper did not prefill is not supported (chunked prefill, "
                 "a pre-filled cache from another run)")
CHUNKED = "vision tokens after the prefill (chunked prefill) are not supported"


def check_decode_tokens(input_ids: Any, vision_token_ids: tuple[int, ...]) -> None:
    """Refuse vision tokens in a call after the prefill (a chunked prefill: nothing was dropped for them)."""
    import torch

    if input_ids.shape[1] > 1 and torch.isin(input_ids, torch.tensor(vision_token_ids, device=input_ids.device)).any():
        raise ValueError(CHUNKED)


def check_attention(impl: str) -> None:
    if impl == "flex_attention":
        raise ValueError("attn_implementation 'flex_attention' is not supported (its BlockMask cannot be gathered); "
                         "use 'sdpa', 'eager' or 'flash_attention_2'")


def check_cache_type(cache: Any) -> None:
    if cache is not None and not isinstance(cache, DynamicCache):
        raise ValueError(f"cache type {type(cache).__name__} is not supported: the dropped layers need per-layer "
                         "lengths; use the default DynamicCache (no cache_implementation='static', no torch.compile cache)")


def check_encoder(model_class: str, spec: Any, encoder_schedule: Any, zip_counts: Any) -> None:
    """Refuse ``encoder_schedule`` or VisionZip on a model whose encoder cannot take it, naming why."""
    if encoder_schedule is not None:
        why = "its vision encoder is not described for dropping" if spec is None else spec.refusal
        if why:
            raise ValueError(f"encoder_schedule={encoder_schedule} cannot run on {model_class}: {why}")
        try:
            encoder_schedule.check_depth(spec.depth)
        except ValueError:
            raise ValueError(f"encoder_schedule={encoder_schedule} does not fit {model_class}'s vision encoder: stages "
                             f"are before its blocks 1..{spec.depth - 1} (the blocks whose output the model reads)") \
                from None
    if zip_counts is not None:
        why = "its vision encoder is not described for VisionZip" if spec is None else spec.zip_refusal
        if why:
            raise ValueError(f"method=visionzip cannot run on {model_class}: {why}")


def check_renumbering(positions: str, mrope: bool) -> None:
    """Refuse renumbered positions on a model whose positions are M-RoPE (time / height / width per patch)."""
    if positions == RENUMBER and mrope:
        raise ValueError(f"positions={RENUMBER} is for 1-D rotary positions; this model's M-RoPE positions are the "
                         f"time / height / width of each patch, so its tokens keep their own (positions={KEEP})")


def patches_per_crop(spec: Any) -> int:
    """Patches of one crop of a ``batched`` encoder (CLIP: (image_size / patch_size) ** 2)."""
    cfg = spec.config
    return (int(cfg.image_size) // int(cfg.patch_size)) ** 2
