"""What the engine relies on inside transformers, checked where it is used (docs/design.md §3, "The
transformers contract").

The engine never copies a transformers ``forward``; it reads the keyword arguments that the decoder
hands each layer and that ``generate`` hands the top model. Those are internals and they move between
releases (5.24 renamed ``past_key_values`` to ``cache``). Each check here turns a broken assumption into
a :class:`TransformersContractError` that names the installed version and the tested range, instead of
an ``IndexError`` deep inside the engine or, worse, a silently wrong answer.
"""

from __future__ import annotations

import functools
import re
from importlib.metadata import PackageNotFoundError, requires
from typing import Any

import torch
import transformers

__all__ = ["TransformersContractError", "tested_range", "contract_error", "cache_of", "layer_hidden",
           "check_layer_kwargs", "check_prefill_call", "check_cache", "CACHE_KWARGS"]

# The cache keyword: ``cache`` from transformers 5.24 on, ``past_key_values`` before (and still accepted
# from callers, who reach the hooks before transformers renames it).
CACHE_KWARGS = ("cache", "past_key_values")


class TransformersContractError(RuntimeError):
    """The installed transformers does not behave as the engine was tested against."""


@functools.cache
def tested_range() -> str:
    """The transformers range this package declares (pyproject.toml is the one place it is written)."""
    try:
        for req in requires("v2drop-eval") or []:
            m = re.match(r"^transformers\s*([^;]*)", req)
            if m:
                return m.group(1).strip() or "any"
    except PackageNotFoundError:
        pass
    return "unknown (v2drop-eval is not installed as a package)"


def contract_error(what: str) -> TransformersContractError:
    return TransformersContractError(
        f"transformers {transformers.__version__} does not match what the dropping engine relies on: {what}. "
        f"v2drop-eval is tested with transformers {tested_range()}; install a version in that range "
        f"(pip install 'transformers{tested_range()}'), or report this with the versions above."
    )


def cache_of(kwargs: dict) -> Any:
    """The KV cache passed in ``kwargs`` under either of its names (None if absent)."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def layer_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer is called with: ``[B, q, D]``."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise contract_error(
            f"a decoder layer was called without hidden states of shape [batch, seq, hidden] "
            f"(got {type(hidden).__name__}{'' if hidden is None else ' ' + str(tuple(getattr(hidden, 'shape', ())))})"
        )
    return hidden


def check_layer_kwargs(layer: int, kwargs: dict, q: int, key_len: int) -> None:
    """The decoder hands every layer the same model-wide mask, rotary pair and position ids, by
    keyword, for ``q`` query positions (prefill: the prompt length S, whatever was dropped before; decode:
    the new tokens); the engine swaps them for gathered copies.

    ``key_len`` is the number of key positions the mask must span (prefill: S; decode: S plus every
    token generated so far, the current ones included).
    """
    if "attention_mask" not in kwargs:
        raise contract_error(f"decoder layer {layer} was called without an attention_mask keyword argument")
    pe = kwargs.get("position_embeddings")
    if not (isinstance(pe, tuple) and len(pe) == 2 and all(isinstance(t, torch.Tensor) for t in pe)):
        raise contract_error(
            f"decoder layer {layer} did not get position_embeddings as a (cos, sin) tuple (got {type(pe).__name__})"
        )
    if pe[0].shape[-2] != q:
        raise contract_error(
            f"decoder layer {layer}'s rotary cos has {pe[0].shape[-2]} positions on dim -2; expected {q}"
        )
    pid = kwargs.get("position_ids")
    if isinstance(pid, torch.Tensor) and pid.shape[-1] != q:
        raise contract_error(f"decoder layer {layer}'s position_ids span {pid.shape[-1]} positions; expected {q}")
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        ok = (mask.dim() == 2 and mask.shape[-1] == key_len) or (
            mask.dim() == 4 and mask.shape[-2] == q and mask.shape[-1] == key_len
        )
        if not ok:
            raise contract_error(
                f"decoder layer {layer}'s attention_mask has shape {tuple(mask.shape)}; expected [batch, {key_len}] "
                f"or [batch, heads, {q}, {key_len}]"
            )


def check_prefill_call(input_ids: torch.Tensor, attention_mask: Any) -> None:
    """At prefill (empty cache) the top model gets the whole prompt: ``input_ids`` as long as the mask."""
    if input_ids.dim() != 2:
        raise contract_error(f"the top model's input_ids have shape {tuple(input_ids.shape)}, not [batch, seq]")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        if attention_mask.shape != input_ids.shape:
            raise contract_error(
                f"the prefill call (empty cache) got input_ids of shape {tuple(input_ids.shape)} beside an "
                f"attention_mask of shape {tuple(attention_mask.shape)}; the engine expects the whole prompt at prefill"
            )


def check_cache(cache: Any, num_layers: int) -> None:
    """The engine reads each layer's own length: a cache with one entry per decoder layer."""
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(lay, "get_seq_length") for lay in layers):
        raise contract_error(
            f"{type(cache).__name__} has no per-layer entries with get_seq_length() (cache.layers)"
        )
    if len(layers) not in (0, num_layers):
        raise contract_error(f"{type(cache).__name__} holds {len(layers)} layers; the decoder has {num_layers}")
