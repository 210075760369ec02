"""VisionZip's tap on one vision-encoder attention: the [CLS] row's attention over the patches and the keys
of that block, read through a registered attention function that records them and then calls the block's
own kernel (no attention code copied, the block's output unchanged)."""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from v2drop_eval.engine import contract

__all__ = ["ClsTap", "ZIP_TAP"]

ZIP_TAP = "v2drop_visionzip_tap"


def _tapped(module: nn.Module, query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any):
    tap: ClsTap = module._v2drop_zip_tap
    tap.record(query, key, kwargs.get("scaling"))
    return tap.inner(module, query, key, *args, **kwargs)


AttentionInterface.register(ZIP_TAP, _tapped)


class ClsTap:
    """At VisionZip's block: the [CLS] row's attention over the patches, summed over heads (query scaled
    before the product, as the reference's ``CLIPAttention_forward``), and the keys averaged over heads."""

    def __init__(self, attn: nn.Module) -> None:
        self.module = attn
        self.original = attn.config
        impl = self.original._attn_implementation or "eager"
        fn = ALL_ATTENTION_FUNCTIONS.get(impl)
        if fn is None:
            fn = getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None)
        if fn is None:
            raise contract.contract_error(f"no attention function {impl!r} for {type(attn).__name__}")
        self.inner = fn
        cfg = copy.copy(self.original)
        cfg._attn_implementation_internal = ZIP_TAP
        attn.config = cfg
        attn._v2drop_zip_tap = self
        self.cls_attention: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None

    def record(self, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        logits = (query[:, :, :1] * scale) @ key.transpose(-1, -2)  # [B, H, 1, T]
        self.cls_attention = logits.softmax(dim=-1)[:, :, 0, 1:].sum(dim=1)  # [B, T - 1]
        self.keys = key.mean(dim=1)  # [B, T, hd]

    def remove(self) -> None:
        self.module.config = self.original
        del self.module._v2drop_zip_tap
