"""The pre-LLM hook point: after the projector, before the LLM decoder.

When fewer tokens leave the vision encoder than the prompt has placeholders (VisionZip; dropping inside
the encoder), the encoder hooks (``engine/encoder.py``) leave NaN in the placeholder rows of the
dropped tokens. A forward pre-hook on the decoder (``LlamaModel``, ``Qwen2VLTextModel``, ...) then
removes those rows from its inputs at the prefill, so the decoder runs a shorter sequence from layer 0:

- ``inputs_embeds`` gathered at the kept slots; rows keeping fewer slots than the longest are filled on
  the left with padding slots (zero embeddings, 0 in the attention mask), as left padding;
- the 2D ``attention_mask`` gathered (built, ones and the padding slots, when the model passed None);
- ``position_ids`` (``[B, S]``, or M-RoPE's ``[3 | 4, B, S]``) gathered, so every kept token keeps the
  position it had in the full prompt (``positions="keep"``), or renumbered ``0..L-1`` from each row's
  first real token (``positions="renumber"``, 1-D RoPE only: what LLaVA's and VisionZip's own code do);
- the decoder then builds its mask and cache over the shorter sequence; every decoder layer's
  ``DynamicCache`` holds the kept tokens only.

At each decode step the 2D mask that ``generate`` extended over the full prompt is gathered at the kept
slots plus the new tokens, and the new tokens' positions continue from the full prompt (``keep``)
or from the shortened one (``renumber``, each row shifted by its own count of dropped tokens). A
prefill with nothing dropped leaves every input untouched (bit-identical to the plain model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from v2drop_eval.engine import contract
from v2drop_eval.engine.method import POSITION_RULES, RENUMBER

__all__ = ["PreLLMGather"]


@dataclass
class _Kept:
    """The slots the decoder got at the last prefill."""

    seq_len: int  # S: the full prompt
    idx: torch.Tensor  # [B, S'] original slot of each slot
    valid: torch.Tensor  # [B, S'] a real slot (False: padding, surplus)
    dropped: torch.Tensor  # [B] placeholders removed per row


class PreLLMGather:
    """The decoder pre-hook described above. ``on_prefill(idx, valid)`` is told the kept slots of each
    prefill that dropped something (the LLM dropper rebases its layout on them)."""

    def __init__(self, decoder: nn.Module, positions: str, on_prefill: Callable[[torch.Tensor, torch.Tensor], None]):
        if positions not in POSITION_RULES:
            raise ValueError(f"positions={positions!r} is not allowed; allowed: {', '.join(POSITION_RULES)}")
        self.positions = positions
        self.on_prefill = on_prefill
        self.kept: _Kept | None = None
        self._hook = decoder.register_forward_pre_hook(self._hook_fn, with_kwargs=True)

    def remove(self) -> None:
        self._hook.remove()
        self.kept = None

    def _hook_fn(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                raise contract.contract_error("the decoder got its input embeddings by position, not as inputs_embeds")
            self.kept = None if contract.cache_of(kwargs) is None else self.kept
            return None
        cache = contract.cache_of(kwargs)
        if cache is None or cache.get_seq_length() == 0:
            out = self._prefill(embeds, kwargs)
        elif self.kept is None:
            return None
        else:
            out = self._decode(embeds, cache, kwargs)
        return None if out is None else (args, out)

    # -- prefill ---------------------------------------------------------------------------------
    def _prefill(self, embeds: torch.Tensor, kwargs: dict) -> dict | None:
        self.kept = None
        drop = torch.isnan(embeds).any(dim=-1)  # [B, S]: placeholders whose token was dropped
        if not bool(drop.any()):
            return None
        B, S, _ = embeds.shape
        mask = kwargs.get("attention_mask")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            raise contract.contract_error("the decoder got a prepared attention mask (4D or per layer type) at the "
                                          "prefill; removing tokens before the LLM needs the 2D padding mask")
        # Padding goes too: a shorter row's free slots are masked like padding anyway.
        keep = ~drop if mask is None else ~drop & mask.bool()
        n_new = int(keep.sum(1).max())
        # Kept slots in their order, right-aligned; dropped ones fill the left as surplus (masked like padding).
        sort_key = keep.long() * (S + torch.arange(S, device=embeds.device))
        idx = sort_key.argsort(dim=1, stable=True)[:, S - n_new:]
        real = keep.gather(1, idx)
        new = embeds.gather(1, idx[..., None].expand(-1, -1, embeds.shape[-1]))
        new = torch.where(real[..., None], new, torch.zeros((), dtype=new.dtype, device=new.device))
        out = dict(kwargs, inputs_embeds=new, attention_mask=real.to(mask.dtype if mask is not None else torch.long))
        out["position_ids"] = self._positions_prefill(kwargs.get("position_ids"), idx, real, S)
        if isinstance(kwargs.get("cache_position"), torch.Tensor):  # transformers before 5.24
            out["cache_position"] = torch.arange(n_new, device=embeds.device)
        self.kept = _Kept(seq_len=S, idx=idx, valid=real, dropped=drop.sum(1))
        self.on_prefill(idx, real)
        return out

    def _positions_prefill(self, pid: torch.Tensor | None, idx: torch.Tensor, real: torch.Tensor,
                           S: int) -> torch.Tensor:
        B, n = idx.shape
        if self.positions == RENUMBER:
            if pid is not None and pid.dim() == 3:
                raise ValueError(f"positions={RENUMBER} is not defined for M-RoPE (3-D) positions; use keep")
            return (real.long().cumsum(1) - 1).clamp(min=0) * real
        if pid is None:  # the decoder would number the full prompt 0..S-1
            pid = torch.arange(S, device=idx.device)[None]
        if pid.dim() == 3:  # M-RoPE [k, B|1, S]
            k = pid.shape[0]
            return pid.expand(k, B, S).gather(2, idx[None].expand(k, B, n))
        return pid.expand(B, S).gather(1, idx)

    # -- decode ----------------------------------------------------------------------------------
    def _decode(self, embeds: torch.Tensor, cache: Any, kwargs: dict) -> dict:
        kept = self.kept
        B, q, _ = embeds.shape
        n = kept.idx.shape[1]
        extra = cache.get_seq_length() - n + q  # tokens since the prefill, the current ones included
        mask = kwargs.get("attention_mask")
        tail = torch.arange(kept.seq_len, kept.seq_len + extra, device=embeds.device).expand(B, extra)
        if mask is None:
            new_mask = torch.cat([kept.valid, torch.ones_like(tail, dtype=torch.bool)], 1).long()
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == kept.seq_len + extra:
            new_mask = torch.cat([mask.gather(1, kept.idx) * kept.valid, mask.gather(1, tail)], 1)
        else:
            raise contract.contract_error(
                f"a decode step's attention mask has shape {tuple(getattr(mask, 'shape', ()))}; removing tokens "
                f"before the LLM needs the 2D mask over the {kept.seq_len} prompt and {extra} new positions")
        out = dict(kwargs, attention_mask=new_mask)
        pid = kwargs.get("position_ids")
        if pid is None:
            pid = (kept.seq_len + extra - q + torch.arange(q, device=embeds.device))[None].expand(B, q)
        if self.positions == RENUMBER:
            pid = pid.expand(B, q) - kept.dropped[:, None]
        out["position_ids"] = pid
        if isinstance(kwargs.get("cache_position"), torch.Tensor):
            out["cache_position"] = kwargs["cache_position"] - (kept.seq_len - n)
        return out
