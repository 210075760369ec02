"""A CPU stand-in for flash_attention_2's semantics, to test the engine's flash path without a GPU.

It receives exactly what transformers hands a flash kernel (a 2D padding mask or None, and
``position_ids`` that switch batch-1 inputs to the packed/varlen path) and computes what the kernel
would: bottom-right-aligned causal attention over unpadded keys, block-diagonal per packed sequence.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
from transformers.modeling_flash_attention_utils import (
    _is_packed_sequence,
    prepare_fa_kwargs_from_position_ids,
)

NAME = "v2drop_fa2_cpu_emulation"  # no "flash" in the name: transformers would try to load a kernel


def _flash_like(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_ids=None, **kwargs):
    B, H, Q, D = query.shape
    K = key.shape[2]
    key = key.repeat_interleave(H // key.shape[1], dim=1)
    value = value.repeat_interleave(H // value.shape[1], dim=1)
    allowed = torch.arange(K)[None, :] <= (torch.arange(Q)[:, None] + K - Q)
    if not getattr(module, "is_causal", True):  # vision towers attend both ways
        allowed = torch.ones(Q, K, dtype=torch.bool)
    allowed = allowed[None].expand(B, Q, K).clone()
    query_ok = torch.ones(B, Q, dtype=torch.bool)
    if attention_mask is not None:
        keys = attention_mask.bool()
        allowed &= keys[:, None, :]
        query_ok = keys[:, K - Q :]
    elif _is_packed_sequence(position_ids, B):
        (cu, _), _ = prepare_fa_kwargs_from_position_ids(position_ids)
        seg = torch.zeros(K, dtype=torch.long)
        for start in cu[1:-1].tolist():
            seg[start:] += 1
        allowed &= seg[None, :, None] == seg[None, None, :]
    allowed |= ~query_ok[:, :, None]  # rows flash never computes: keep them finite, zero them below
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=allowed[:, None], scale=scaling
    )
    out = out * query_ok[:, None, :, None]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, _flash_like)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, flash_attention_mask)
