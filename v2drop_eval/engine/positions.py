"""Renumbered rotary positions after a drop (``Method.positions == "renumber"``; docs/design.md §2).

SparseVLM and PyramidDrop, as published, cut their position ids to the shortened sequence: from a drop
layer on, a row's tokens are numbered 0, 1, ... again, and a new token takes the next number, which is the
length of that layer's own cache. Here, per row and per layer: a slot's position is the row's first
position plus the count of real slots before it; a decode step's position is the one the model gave it
minus the tokens the row lost before that layer. At batch size 1 without padding that is exactly the
originals' ``arange(len)`` and cache length; a left-padded row gets what it gets alone.

The (cos, sin) pair is recomputed with the decoder's own rotary module, so no rotary code is copied. Only
for one-dimensional positions: multimodal rotary (M-RoPE) has no sequence to renumber
(``ModelAdapter.rotary`` is None there and the engine keeps positions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from v2drop_eval.engine import contract
from v2drop_eval.engine.gather import Layout

__all__ = ["Rotary", "prefill_positions", "decode_positions", "removed_per_row"]

# The decoder's rotary module: (hidden states, position ids [B, n]) -> (cos, sin).
Rotary = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _position_ids(kwargs: dict, B: int, length: int, layer: int) -> torch.Tensor | None:
    pid = kwargs.get("position_ids")
    if pid is None:
        return None
    if not isinstance(pid, torch.Tensor) or pid.dim() != 2 or pid.shape[-1] != length:
        raise contract.contract_error(
            f"decoder layer {layer} got position_ids {getattr(pid, 'shape', pid)}; renumbered positions need "
            f"one position per token, [batch, {length}]"
        )
    return pid.expand(B, -1)


def prefill_positions(initial: Layout, lay: Layout, kwargs: dict, rotary: Rotary, hidden: torch.Tensor,
                      layer: int) -> dict[str, Any]:
    """``position_embeddings`` (and ``position_ids`` if the layer got them) for the slots of ``lay``, numbered
    along each row from the position of its first real token; ``kwargs`` are the layer's ungathered inputs."""
    B, S = initial.idx.shape
    first = initial.valid.long().argmax(dim=1, keepdim=True)  # the row's first real position
    pid = _position_ids(kwargs, B, S, layer)
    base = pid.gather(1, first) if pid is not None else first
    new = base + (lay.valid.long().cumsum(dim=1) - 1).clamp(min=0)
    out: dict[str, Any] = {"position_embeddings": rotary(hidden, new)}
    if pid is not None:
        out["position_ids"] = new
    return out


def removed_per_row(initial: Layout, lay: Layout) -> torch.Tensor:
    """``[B]``: each row's real tokens that ``lay`` no longer holds."""
    return initial.valid.sum(dim=1) - lay.valid.sum(dim=1)


def decode_positions(removed: torch.Tensor, kwargs: dict, rotary: Rotary, hidden: torch.Tensor,
                     layer: int) -> dict[str, Any]:
    """A decode step's ``position_embeddings`` and ``position_ids`` at a layer whose rows lost ``removed``."""
    B, q = hidden.shape[:2]
    pid = _position_ids(kwargs, B, q, layer)
    if pid is None:
        raise contract.contract_error(f"decoder layer {layer} got no position_ids at a decode step")
    new = pid - removed[:, None].to(pid.device)
    return {"position_embeddings": rotary(hidden, new), "position_ids": new}
