"""The masking reference: nothing removed, dropped tokens masked out as keys from their drop layer on.

It reuses only the kept positions a dropping run recorded (``handle.last_layouts``), so it checks
the gathering mechanics (masks, rotary, cache, decode) independently of how tokens were chosen.

With ``renumber=True`` it also gives every layer the positions PyramidDrop's rule gives (the gaps that
dropped tokens leave closed per row, decode positions moved down alike), computed here one row and one
value at a time, and hands the layer the rotary pair the decoder's own rotary module makes of them.
"""

from __future__ import annotations

from bisect import bisect_left
from contextlib import contextmanager

import torch

from v2drop_eval.engine.contract import cache_of


def allowed_keys(layouts: dict, attention_mask: torch.Tensor, num_layers: int) -> dict[int, torch.Tensor]:
    """Per decoder layer, ``[B, S]`` bool: which prefill positions are still keys at that layer."""
    real = attention_mask.bool()
    out, current = {}, real
    for layer in range(num_layers):
        if layer in layouts:
            idx, valid = layouts[layer]
            current = torch.zeros_like(real)
            current.scatter_(1, idx, valid)
            current &= real
        out[layer] = current
    return out


def closed_values(ids: torch.Tensor, real: torch.Tensor, keep: torch.Tensor) -> list[list[int]]:
    """Per row, the sorted position values only dropped tokens held (``ids [A, B, S]``)."""
    out = []
    for b in range(real.shape[0]):
        held = {int(v) for a in range(ids.shape[0]) for v, r in zip(ids[a, b], real[b], strict=True) if r}
        kept = {int(v) for a in range(ids.shape[0]) for v, k in zip(ids[a, b], keep[b], strict=True) if k}
        out.append(sorted(held - kept))
    return out


def renumbered(ids: torch.Tensor, closed: list[list[int]]) -> torch.Tensor:
    """Each value moved down by the closed values below it (``ids [A, B, n]``)."""
    out = ids.clone()
    for a in range(ids.shape[0]):
        for b in range(ids.shape[1]):
            out[a, b] = torch.tensor([v - bisect_left(closed[b], v) for v in ids[a, b].tolist()])
    return out


def slot_mask(mask, cols: torch.Tensor, q: int, k_len: int, attn: str, hidden: torch.Tensor) -> torch.Tensor:
    """The layer's attention mask with only the allowed key columns ``cols`` (B, k_len): causal from a
    missing or 2-D padding mask, else the model's 4-D mask; each query always sees itself at prefill; additive
    for eager."""
    B = cols.shape[0]
    if mask is None or mask.dim() == 2:
        q_pos = torch.arange(k_len - q, k_len)
        m = (torch.arange(k_len)[None, :] <= q_pos[:, None])[None, None].expand(B, 1, q, k_len)
        if mask is not None:
            m = m & mask.bool()[:, None, None, :k_len]
    elif mask.dtype == torch.bool:
        m = mask.expand(B, -1, -1, -1)
    else:
        m = mask.expand(B, -1, -1, -1) == 0
    m = m & cols[:, None, None, :]
    if q == k_len:
        m = m | torch.eye(q, dtype=torch.bool)[None, None]
    if attn == "eager":
        m = torch.zeros(m.shape, dtype=hidden.dtype).masked_fill(~m, torch.finfo(hidden.dtype).min)
    return m


@contextmanager
def masking_reference(model, layers, allowed: dict[int, torch.Tensor], attn: str, renumber: bool = False):
    """Hooks that AND each layer's attention mask with ``allowed[layer]`` (plus new decode tokens), and
    with ``renumber`` give each layer PyramidDrop's renumbered positions."""
    hooks = []
    rotary = model.model.language_model.rotary_emb
    seen: dict = {"ids": None, "prefill": {}, "busy": False}

    def record(module, args, kwargs):
        if not seen["busy"]:
            seen["ids"] = args[1] if len(args) > 1 else kwargs["position_ids"]

    def axes(ids, B):
        ids = ids[None] if ids.dim() == 2 else ids
        return ids.expand(ids.shape[0], B, ids.shape[-1])

    def positions(layer, kwargs, hidden):
        """The layer's rotary pair and position ids, renumbered by the keys it keeps."""
        B, q = hidden.shape[:2]
        real, keep = allowed[0], allowed[layer]
        if q == real.shape[1]:  # a prefill: what the ids held before anything was dropped
            seen["prefill"] = {"rotary": axes(seen["ids"], B).clone()}
            if isinstance(kwargs.get("position_ids"), torch.Tensor):
                seen["prefill"]["text"] = axes(kwargs["position_ids"], B).clone()
        out = {}
        for key, ids in (("rotary", seen["ids"]), ("text", kwargs.get("position_ids"))):
            if not isinstance(ids, torch.Tensor):
                continue
            new = renumbered(axes(ids, B), closed_values(seen["prefill"][key], real, keep))
            new = new[0] if ids.dim() == 2 else new
            if key == "text":
                out["position_ids"] = new
                continue
            seen["busy"] = True
            out["position_embeddings"] = rotary(hidden, position_ids=new)
            seen["busy"] = False
        return out

    def make(layer: int):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            B, q = hidden.shape[:2]
            keep = allowed[layer]
            S = keep.shape[1]
            cache = cache_of(kwargs)
            k_len = (cache.layers[layer].get_seq_length() + q) if cache is not None and layer < len(cache.layers) else q
            k_len = max(k_len, q)
            cols = torch.cat([keep, torch.ones(B, k_len - S, dtype=torch.bool)], 1) if k_len > S else keep
            kwargs = dict(kwargs, attention_mask=slot_mask(kwargs.get("attention_mask"), cols, q, k_len, attn, hidden))
            if renumber and not torch.equal(allowed[layer], allowed[0]):
                kwargs.update(positions(layer, kwargs, hidden))
            return args, kwargs

        return hook

    changed = [layer for layer in allowed if not torch.equal(allowed[layer], allowed[0])]
    first = min(changed, default=len(layers))
    if renumber:
        hooks.append(rotary.register_forward_pre_hook(record, with_kwargs=True))
    for layer in range(first, len(layers)):
        hooks.append(layers[layer].register_forward_pre_hook(make(layer), with_kwargs=True))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def layouts_and_hosts(handle) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``handle.last_layouts`` with each slot's mask position (its host, where merged tokens moved slots)."""
    out = dict(handle.last_layouts)
    for layer, transfer in handle.last_transfers.items():
        out[layer] = (transfer.layout.keys, transfer.layout.valid)
    return out


@contextmanager
def drop_reference(model, layers, allowed: dict[int, torch.Tensor], attn: str, transfers: dict | None = None,
                   rotary=None):
    """The masking reference for methods that merge tokens and renumber positions: nothing removed; at a drop
    layer with merged tokens, each new slot's value is written into its host position (a copied token's
    value from its previous host, a merged token's as the weighted sum over the previous hosts); from each
    drop layer on, only allowed positions are keys; with ``rotary`` (renumbered positions), from the first
    drop layer on a row's allowed positions are numbered along the row from its first real position (rotary
    pair recomputed by ``rotary``), and a decode token takes the position the model gives it minus the
    row's tokens no longer allowed at that layer."""
    transfers = transfers or {}
    real = allowed[0]

    def make(layer: int):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            B, q = hidden.shape[:2]
            keep = allowed[layer]
            S = keep.shape[1]
            if layer in transfers and q == S:
                hidden = _write_transfer(hidden, transfers[layer])
                if "hidden_states" in kwargs:
                    kwargs = dict(kwargs, hidden_states=hidden)
                else:
                    args = (hidden, *args[1:])
            if rotary is not None:
                pid = kwargs["position_ids"].expand(B, -1)
                if q == S:
                    base = pid.gather(1, real.long().argmax(dim=1, keepdim=True))
                    new = torch.where(keep, base + keep.long().cumsum(dim=1) - 1, pid)
                else:
                    new = pid - (real.sum(1) - keep.sum(1))[:, None]
                kwargs = dict(kwargs, position_ids=new, position_embeddings=rotary(hidden, new))
            cache = cache_of(kwargs)
            cached = cache is not None and layer < len(cache.layers)
            k_len = max((cache.layers[layer].get_seq_length() + q) if cached else q, q)
            cols = torch.cat([keep, torch.ones(B, k_len - S, dtype=torch.bool)], 1) if k_len > S else keep
            kwargs = dict(kwargs, attention_mask=slot_mask(kwargs.get("attention_mask"), cols, q, k_len, attn, hidden))
            return args, kwargs

        return hook

    changed = [layer for layer in allowed if not torch.equal(allowed[layer], allowed[0])]
    first = min(changed, default=len(layers))
    hooks = [layers[layer].register_forward_pre_hook(make(layer), with_kwargs=True)
             for layer in range(first, len(layers))]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _write_transfer(hidden: torch.Tensor, transfer) -> torch.Tensor:
    """The full-length hidden states with each new slot's value written into its host position."""
    prev_hosts = transfer.prev.keys  # [B, n_prev]
    new_hosts = transfer.layout.keys
    out = hidden.clone()
    for b in range(hidden.shape[0]):
        before = hidden[b, prev_hosts[b]]  # [n_prev, D]: the values of the previous slots
        for s in range(new_hosts.shape[1]):
            if not transfer.layout.valid[b, s]:
                continue
            if transfer.source[b, s] >= 0:
                value = before[transfer.source[b, s]]
            else:
                value = transfer.weights[b, transfer.merged[b, s]].to(hidden.dtype) @ before
            out[b, new_hosts[b, s]] = value
    return out
