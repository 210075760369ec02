"""The masking reference: nothing removed, dropped tokens masked out as keys from their drop layer on.

It reuses only the kept positions a dropping run recorded (``handle.last_layouts``), so it checks
the gathering mechanics (masks, rotary, cache, decode) independently of how tokens were chosen.
"""

from __future__ import annotations

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


@contextmanager
def masking_reference(model, layers, allowed: dict[int, torch.Tensor], attn: str):
    """Hooks that AND each layer's attention mask with ``allowed[layer]`` (plus new decode tokens)."""
    hooks = []

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
            mask = kwargs.get("attention_mask")
            if mask is None:
                q_pos = torch.arange(k_len - q, k_len)
                m = (torch.arange(k_len)[None, :] <= q_pos[:, None])[None, None].expand(B, 1, q, k_len)
            elif mask.dtype == torch.bool:
                m = mask.expand(B, -1, -1, -1)
            else:
                m = mask.expand(B, -1, -1, -1) == 0
            m = m & cols[:, None, None, :]
            if q == k_len:
                m = m | torch.eye(q, dtype=torch.bool)[None, None]
            if attn == "eager":
                m = torch.zeros(m.shape, dtype=hidden.dtype).masked_fill(~m, torch.finfo(hidden.dtype).min)
            kwargs = dict(kwargs, attention_mask=m)
            return args, kwargs

        return hook

    changed = [layer for layer in allowed if not torch.equal(allowed[layer], allowed[0])]
    first = min(changed, default=len(layers))
    for layer in range(first, len(layers)):
        hooks.append(layers[layer].register_forward_pre_hook(make(layer), with_kwargs=True))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
