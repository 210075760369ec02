"""Merged tokens: joining a method's :class:`~v2drop_eval.engine.method.Merge` to the layout it kept
(docs/design.md §2, "Merged tokens").

A merged token is a weighted sum of the hidden states entering the drop layer. It has no prompt position
of its own, so it borrows one:

- positions kept: it takes the position of its ``anchor`` (a token dropped at this layer) and sits in
  position order. Its mask row and column, rotary position and DeepStack feature are the anchor's, so the
  masking reference is "write the merged value into the anchor's hidden state, mask the other dropped
  tokens as keys".
- positions renumbered (``positions.py``): it sits right after the row's last vision token, as SparseVLM
  appends its recycled tokens after the kept ones. Rotary positions are then counted along the slots, so
  a slot only needs a prompt position for its mask row and column (``Layout.host``): the kept tokens'
  hosts and those of the dropped vision tokens with the largest positions, one per merged token, sorted
  and handed out along the new order. The reference writes each slot's value into its host.

Everything is per row, so a row gets the same layout alone and in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from v2drop_eval.engine.clock import DropperClock
from v2drop_eval.engine.gather import Layout
from v2drop_eval.engine.method import Merge, Method, ScoreContext

__all__ = ["Transfer", "next_slots", "join", "joined_hidden"]


@dataclass
class Transfer:
    """How the slots after one drop layer get their hidden states from the slots before it."""

    prev: Layout  # the layout entering the drop layer
    layout: Layout  # the layout after it
    source: torch.Tensor  # [B, n] slot of ``prev`` each slot copies (-1: a merged token, or a surplus slot)
    merged: torch.Tensor  # [B, n] merged token each slot holds (-1: a copied token, or a surplus slot)
    weights: torch.Tensor  # [B, M, n_prev] the merged tokens' weights over the slots of ``prev``
    order: torch.Tensor  # [B, n] entry of each slot: kept slots 0..n_k-1, then merged tokens n_k..n_k+M-1


def next_slots(method: Method, ctx: ScoreContext, scores: torch.Tensor, prev: Layout, kept: Layout,
               kept_pos: torch.Tensor, hidden: torch.Tensor, renumber: bool,
               clock: DropperClock) -> tuple[torch.Tensor, Layout, Transfer | None]:
    """After ``gather.select`` kept ``kept`` (its slots ``kept_pos`` in ``prev``) by ``scores``: the hidden
    states and layout of the slots from the drop layer on, and how merged tokens were placed (None where the
    method merges none: the kept slots only). The method's :meth:`Method.merge` is timed as scoring."""
    merge = None
    if method.merges:
        kept_mask = torch.zeros_like(prev.valid).scatter_(1, kept_pos, kept.valid)
        clock.open("score")
        try:
            merge = method.merge(ctx, scores, kept_mask)
        finally:
            clock.close()
    if merge is None or not bool(merge.valid.any()):
        return hidden.gather(1, kept_pos[..., None].expand(-1, -1, hidden.shape[-1])), kept, None
    transfer = join(prev, kept, kept_pos, kept_mask, merge, renumber)
    return joined_hidden(hidden, transfer, kept_pos), transfer.layout, transfer


def join(prev: Layout, kept: Layout, kept_pos: torch.Tensor, kept_mask: torch.Tensor, merge: Merge,
         renumber: bool) -> Transfer:
    """The layout holding ``kept`` (``gather.select``'s, with ``kept_pos`` its slots in ``prev`` and
    ``kept_mask [B, n_prev]`` the kept slots of ``prev``) and ``merge``'s tokens."""
    B, n_k = kept_pos.shape
    n_prev = prev.idx.shape[1]
    M = merge.valid.shape[1]
    device = kept_pos.device
    dropped = prev.valid & prev.vision & ~kept_mask
    if bool((merge.valid.sum(1) > dropped.sum(1)).any()):
        raise ValueError("a method merged more tokens in a row than it dropped there")
    anchor = merge.anchor.clamp(0, n_prev - 1)
    if bool((merge.valid & ~dropped.gather(1, anchor)).any()):
        raise ValueError("a merged token's anchor is not a token dropped at this layer")
    ent_idx = torch.cat([kept.idx, prev.idx.gather(1, anchor)], dim=1)
    ent_valid = torch.cat([kept.valid, merge.valid], dim=1)
    ent_source = torch.cat([kept_pos.masked_fill(~kept.valid, -1), torch.full((B, M), -1, device=device)], dim=1)
    ent_merged = torch.cat([torch.full((B, n_k), -1, device=device),
                            torch.arange(M, device=device).expand(B, M).masked_fill(~merge.valid, -1)], dim=1)
    if renumber:
        # Kept slots keep their order; merged tokens go before the first text slot after the last vision slot.
        slots = torch.arange(n_prev, device=device)
        last_vision = torch.where(prev.vision & prev.valid, slots, -1).max(dim=1).values
        after = prev.valid & ~prev.vision & (slots > last_vision[:, None])
        first_text = torch.where(after, slots, n_prev).min(dim=1).values  # exists: a row's last token is text
        at = ((kept_pos == first_text[:, None]) & kept.valid).long().argmax(dim=1)
        key = torch.cat([(torch.arange(n_k, device=device) * (M + 1) + M).expand(B, n_k),
                         at[:, None] * (M + 1) + torch.arange(M, device=device)], dim=1)
    else:
        key = ent_idx
    key = torch.where(ent_valid, key, -1)
    n_new = int(ent_valid.sum(1).max())
    order = key.argsort(dim=1, stable=True)[:, key.shape[1] - n_new:]  # real slots right-aligned, in order
    valid = ent_valid.gather(1, order)
    layout = Layout(idx=ent_idx.gather(1, order), valid=valid,
                    vision=torch.cat([kept.vision, merge.valid], dim=1).gather(1, order) & valid)
    if renumber:
        layout.host = _hosts(prev, kept_mask, dropped, merge.valid.sum(1), valid)
    return Transfer(prev=prev, layout=layout, source=ent_source.gather(1, order), merged=ent_merged.gather(1, order),
                    weights=merge.weights, order=order)


def _hosts(prev: Layout, kept_mask: torch.Tensor, dropped: torch.Tensor, merged: torch.Tensor,
           valid: torch.Tensor) -> torch.Tensor:
    """[B, n] prompt positions for the real slots of the new layout, increasing along each row."""
    keys = prev.keys
    # The dropped vision tokens with the largest positions lend theirs to the merged tokens.
    masked = torch.where(dropped, keys, -1)
    order = masked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    pool = (kept_mask & prev.valid) | (dropped & (rank < merged[:, None]))
    big = int(keys.max()) + 1
    pooled = torch.where(pool, keys, big).sort(dim=1).values
    n_new = valid.shape[1]
    first = n_new - valid.sum(1)  # real slots are the rightmost ones
    rank_new = (torch.arange(n_new, device=valid.device)[None, :] - first[:, None]).clamp(min=0)
    host = pooled.gather(1, rank_new.clamp(max=pooled.shape[1] - 1))
    return torch.where(valid, host, pooled[:, :1])  # surplus slots: a real position of the row (masked anyway)


def joined_hidden(hidden: torch.Tensor, transfer: Transfer, kept_pos: torch.Tensor) -> torch.Tensor:
    """``[B, n, D]``: the hidden states of ``transfer.layout``'s slots from ``hidden`` (``transfer.prev``'s)."""
    D = hidden.shape[-1]
    kept = hidden.gather(1, kept_pos[..., None].expand(-1, -1, D))
    merged = torch.bmm(transfer.weights.to(hidden.dtype), hidden)
    entries = torch.cat([kept, merged], dim=1)
    return entries.gather(1, transfer.order[..., None].expand(-1, -1, D))
