"""Token scorers: which vision tokens matter. Higher score = more worth keeping.

- ``variation``: V2Drop's signal, how much a token changed through the previous layer.
- ``random_scores``: the seeded random baseline.
- ``FastVRecorder``: FastV's signal, the attention the last query token pays each token at layer K-1,
  recorded inside transformers' attention call so that it also works under sdpa and flash attention.
"""

from __future__ import annotations

import copy
import sys
import zlib
from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from v2drop_eval.validate import METRICS

__all__ = ["METRICS", "variation", "random_scores", "FastVRecorder"]


def variation(h_now: torch.Tensor, h_prev: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """V2Drop's token variation ``v_i = dist(h_i(l), h_i(l-1))`` over the hidden dim -> ``[B, n]``.

    ``h(l)`` is the residual stream entering layer l, ``h(l-1)`` the one entering layer l-1, so the
    variation is the size of layer l-1's whole update to the token.
    """
    now, prev = h_now.float(), h_prev.float()
    if metric == "l2":
        return (now - prev).norm(dim=-1)
    if metric == "l1":
        return (now - prev).abs().sum(dim=-1)
    if metric == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(now, prev, dim=-1)
    raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")


def random_scores(row_keys: list[bytes], n: int, seed: int, layer: int, device: torch.device) -> torch.Tensor:
    """Seeded uniform scores ``[B, n]``; each row's stream depends only on (seed, layer, the row's
    real tokens), so a sample drops the same tokens whatever batch it is run in."""
    rows = []
    for key in row_keys:
        gen = torch.Generator().manual_seed(zlib.crc32(key, (seed * 1_000_003 + layer) & 0xFFFFFFFF))
        rows.append(torch.rand(n, generator=gen))
    return torch.stack(rows).to(device)


FASTV_ATTENTION = "v2drop_fastv_recording"


def _recording_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any):
    rec: FastVRecorder = module._v2drop_fastv
    mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
    if rec.armed:
        rec.record(query, key, mask, kwargs.get("scaling"))
    return rec.inner(module, query, key, *args, **kwargs)


AttentionInterface.register(FASTV_ATTENTION, _recording_attention)


class FastVRecorder:
    """Records head-averaged attention of the last query row at one attention module.

    The module gets a private copy of its config whose attention implementation is the recording
    wrapper; the wrapper calls the model's own kernel (sdpa, eager, flash), so outputs are unchanged.
    """

    def __init__(self, attn_module: torch.nn.Module) -> None:
        self.module = attn_module
        self.original_config = attn_module.config
        impl = self.original_config._attn_implementation or "eager"
        # The model's own eager function lives in its modeling file; other kernels are registered.
        own_eager = sys.modules[type(attn_module).__module__].eager_attention_forward
        self.inner: Callable = own_eager if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
        self.armed = False
        self.scores: torch.Tensor | None = None
        cfg = copy.copy(self.original_config)
        cfg._attn_implementation_internal = FASTV_ATTENTION
        attn_module.config = cfg
        attn_module._v2drop_fastv = self

    def record(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float | None) -> None:
        q = query[:, :, -1:, :].float()  # [B, H, 1, hd]
        k = key.float()  # [B, Hkv, S, hd]
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        logits = (q @ k.transpose(-1, -2)) * scale  # [B, H, 1, S]
        if mask is not None:
            if mask.dim() == 2:  # flash-attention padding mask [B, S]
                logits = logits.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
            else:
                row = mask[:, :, -1:, : k.shape[-2]]
                if row.dtype == torch.bool:
                    logits = logits.masked_fill(~row, float("-inf"))
                else:
                    logits = logits + row.float()
        self.scores = logits.softmax(dim=-1).mean(dim=1)[:, 0, :]  # [B, S]
        self.armed = False

    def remove(self) -> None:
        self.module.config = self.original_config
        del self.module._v2drop_fastv
