"""Gathering a layer's inputs at the kept positions, and the masks for a rectangular batch
(docs/design.md §2). Pure tensor functions; the engine decides when they apply."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from v2drop_eval.engine.schedule import Adaptive

__all__ = ["Layout", "adaptive_counts", "gather_seq", "prefill_inputs", "prefill_mask", "decode_mask", "new_mask", "select"]


@dataclass
class Layout:
    """Which original positions occupy the slots of the (rectangular) gathered batch."""

    idx: torch.Tensor  # [B, n] original positions (a merged token: its anchor's; see ``v2drop_eval.engine.merging``)
    valid: torch.Tensor  # [B, n] a real token (False for padding and surplus slots)
    vision: torch.Tensor  # [B, n] droppable vision token (never the row's last position)
    # [B, n] the prompt positions whose mask rows and columns the slots take, increasing along each row's
    # real slots; None: ``idx``. They differ only where merged tokens are placed out of position order
    # (renumbered positions, ``v2drop_eval.engine.merging``).
    host: torch.Tensor | None = None

    @property
    def keys(self) -> torch.Tensor:
        """``[B, n]`` the prompt position whose mask row and column each slot takes."""
        return self.idx if self.host is None else self.host


def select(lay: Layout, scores: torch.Tensor, keep_k: torch.Tensor) -> tuple[Layout, torch.Tensor]:
    """The layout keeping each row's text and its ``keep_k`` best-scored alive vision tokens, and the
    slot of each new slot in ``lay`` (``pos [B, n_new]``, to gather the hidden states with)."""
    candidates = lay.valid & lay.vision
    scores = scores.masked_fill(~candidates, float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    # Padding goes too: a shorter row's free slots are masked like padding anyway.
    keep = lay.valid & (~lay.vision | (candidates & (rank < keep_k[:, None])))
    n_new = int(keep.sum(1).max())
    n_cur = keep.shape[1]
    # Kept slots in their original order, right-aligned; dropped slots fill the left as surplus.
    sort_key = keep.long() * (n_cur + torch.arange(n_cur, device=keep.device))
    pos = sort_key.argsort(dim=1, stable=True)[:, n_cur - n_new :]
    kept = keep.gather(1, pos)
    host = None if lay.host is None else lay.host.gather(1, pos)
    return Layout(idx=lay.idx.gather(1, pos), valid=kept, vision=lay.vision.gather(1, pos) & kept, host=host), pos


def adaptive_counts(
    scores: torch.Tensor, candidates: torch.Tensor, text: torch.Tensor, alive: torch.Tensor, stage: Adaptive
) -> torch.Tensor:
    """Per row: vision tokens whose score >= threshold x the row's mean text-token score, clamped to
    [floor(alive x min), floor(alive x max)]. The reference does not depend on the image, so a plain
    image (small variations) keeps fewer tokens than a busy one."""
    text_mean = (scores * text).sum(1) / text.sum(1).clamp(min=1)
    passing = ((scores >= stage.threshold * text_mean[:, None]) & candidates).sum(1)
    lo = (alive * Fraction(repr(stage.min_ratio)).numerator) // Fraction(repr(stage.min_ratio)).denominator
    hi = (alive * Fraction(repr(stage.max_ratio)).numerator) // Fraction(repr(stage.max_ratio)).denominator
    return torch.minimum(torch.maximum(passing, lo), hi)


def gather_seq(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather ``t[..., B|1, S, D]`` along the sequence dim (-2) with per-row ``idx [B, n]``."""
    B, n = idx.shape
    lead = t.shape[:-3]
    t = t.expand(*lead, B, t.shape[-2], t.shape[-1])
    index = idx[..., None].expand(*lead, B, n, t.shape[-1])
    return t.gather(-2, index)


def prefill_inputs(lay: Layout, kwargs: dict, fmt: str, dtype: torch.dtype,
                   cached: Callable[[Any, Callable[[], Any]], Any]) -> dict:
    """A decoder layer's prefill keyword inputs for the slots of ``lay``: mask, rotary (cos, sin) and
    position ids gathered. ``cached(obj, build)`` reuses a copy already built from the same object."""
    out = dict(kwargs)
    mask = kwargs.get("attention_mask")
    out["attention_mask"] = cached(mask, lambda: prefill_mask(lay, mask, fmt, dtype))
    pe = kwargs.get("position_embeddings")
    if pe is not None:
        out["position_embeddings"] = cached(pe, lambda: tuple(gather_seq(t, lay.idx) for t in pe))
    pid = kwargs.get("position_ids")
    if isinstance(pid, torch.Tensor):
        out["position_ids"] = cached(pid, lambda: gather_seq(pid[..., None], lay.idx)[..., 0])
    return out


def prefill_mask(lay: Layout, mask: torch.Tensor | None, fmt: str, dtype: torch.dtype) -> torch.Tensor | None:
    """The prefill mask over the slots of ``lay``: the model's mask gathered on rows and columns
    (a 2D flash padding mask on columns), surplus slots masked out as keys."""
    B, n = lay.idx.shape
    surplus = not bool(lay.valid.all())
    if mask is None:
        if not surplus:
            return None  # causal over the kept slots, which keep their order
        return new_mask(lay.valid, q_len=n, extra=0, fmt=fmt, dtype=dtype)
    keys = lay.keys
    if mask.dim() == 2:  # flash-attention padding mask [B, S]
        return mask.expand(B, -1).gather(1, keys) * lay.valid
    m = mask.expand(B, -1, -1, -1)
    m = m.gather(2, keys[:, None, :, None].expand(B, m.shape[1], n, m.shape[-1]))
    m = m.gather(3, keys[:, None, None, :].expand(B, m.shape[1], n, n))
    return _mask_surplus(m, lay.valid, n) if surplus else m


def decode_mask(lay: Layout, mask: torch.Tensor | None, seq_len: int, q_len: int, extra: int, fmt: str,
                dtype: torch.dtype) -> torch.Tensor | None:
    """A decode step's mask for a pruned layer: its kept prefill columns plus the ``extra`` new ones."""
    B, n = lay.idx.shape
    if mask is None:
        if bool(lay.valid.all()):
            return None
        return new_mask(lay.valid, q_len=q_len, extra=extra, fmt=fmt, dtype=dtype)
    tail = torch.arange(seq_len, seq_len + extra, device=lay.idx.device).expand(B, extra)
    cols = torch.cat([lay.keys, tail], dim=1)
    valid = torch.cat([lay.valid, torch.ones_like(tail, dtype=torch.bool)], dim=1)
    if mask.dim() == 2:
        return mask.expand(B, -1).gather(1, cols) * valid
    m = mask.expand(B, -1, -1, -1)
    m = m.gather(3, cols[:, None, None, :].expand(B, m.shape[1], m.shape[2], cols.shape[1]))
    return _mask_keys(m, valid)


def new_mask(valid: torch.Tensor, q_len: int, extra: int, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """A mask from scratch, in the format of the model's attention (``padding2d``, ``additive`` or
    ``bool``; see ``ModelAdapter.mask_format``), when the model passed None."""
    B, n = valid.shape
    device = valid.device
    keys = torch.cat([valid, torch.ones(B, extra, dtype=torch.bool, device=device)], dim=1)
    if fmt == "padding2d":
        return keys.long()
    k_len = n + extra
    # Query i sits at key position k_len - q_len + i (prefill: extra=0, q_len=n).
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    causal = torch.arange(k_len, device=device)[None, :] <= q_pos[:, None]
    m = (causal[None, None] & keys[:, None, None, :]).clone()
    if extra == 0:
        m |= torch.eye(n, dtype=torch.bool, device=device)[None, None]
    if fmt == "additive":
        return torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(~m, torch.finfo(dtype).min)
    return m


def _mask_keys(m: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """Mask out invalid key columns of a 4D mask (bool: True = attend; float: additive)."""
    cols = key_valid[:, None, None, :]
    if m.dtype == torch.bool:
        return m & cols
    return m.masked_fill(~cols, torch.finfo(m.dtype).min)


def _mask_surplus(m: torch.Tensor, valid: torch.Tensor, n: int) -> torch.Tensor:
    """Mask surplus slots as keys, and let each surplus query see itself so no row is empty."""
    m = _mask_keys(m, valid)
    diag = torch.eye(n, dtype=torch.bool, device=m.device)[None, None] & ~valid[:, None, :, None]
    if m.dtype == torch.bool:
        return m | diag
    return m.masked_fill(diag, 0.0)
