"""Analytic FLOPs of the LLM prefill and of the vision encoder (docs/design.md §4).

Per decoder layer with ``n`` tokens, hidden ``d``, MLP width ``m``, heads ``h``, kv heads ``h_kv``:
``MACs(n) = 2nd^2 + 2nd^2 (h_kv/h) + 2n^2 d + 3ndm``. FLOPs = 2 x MACs. This equals
``torch.utils.flop_counter.FlopCounterMode`` under eager attention (lm_head and norms not counted).
The vision encoder (:func:`vision_flops`) is counted apart, each block with the tokens it ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["layer_macs", "prefill_flops", "paper_macs", "CONVENTION", "PAPER_CONVENTION", "VISION_CONVENTION",
           "vision_block_macs", "vision_flops"]

CONVENTION = "FLOPs = 2 x MACs of the LLM decoder layers at prefill, every token of the sequence counted"
PAPER_CONVENTION = "MACs of the LLM decoder layers at prefill, vision tokens only (the papers' TFLOPs)"


def _dims(text_config: Any) -> tuple[int, int, int, float]:
    d = int(text_config.hidden_size)
    m = int(text_config.intermediate_size)
    h = int(text_config.num_attention_heads)
    h_kv = int(getattr(text_config, "num_key_value_heads", None) or h)
    head_dim = int(getattr(text_config, "head_dim", None) or d // h)
    # q/o project d -> h*head_dim, k/v project d -> h_kv*head_dim; usually h*head_dim == d.
    return d, m, h * head_dim, h_kv * head_dim


def layer_macs(text_config: Any, n: int) -> int:
    """Multiply-accumulates of one decoder layer over ``n`` tokens (attention over all ``n``)."""
    d, m, q_dim, kv_dim = _dims(text_config)
    return 2 * n * d * q_dim + 2 * n * d * kv_dim + 2 * n * n * q_dim + 3 * n * d * m


def prefill_flops(text_config: Any, tokens_per_layer: Sequence[int]) -> int:
    """FLOPs (2 x MACs) of the prefill, given the number of tokens (text + vision) entering each layer."""
    return sum(2 * layer_macs(text_config, int(n)) for n in tokens_per_layer)


def paper_macs(text_config: Any, vision_tokens_per_layer: Sequence[int]) -> int:
    """The papers' convention: MACs with only the vision tokens counted (3.82e12 for LLaVA-1.5-7B at 576)."""
    return sum(layer_macs(text_config, int(n)) for n in vision_tokens_per_layer)


# -- the vision encoder ------------------------------------------------------------------------------
VISION_CONVENTION = ("FLOPs = 2 x MACs of the vision encoder at prefill: patch embedding, every block with the "
                     "tokens it really ran (attention within each of its segments: crop, image, frame or "
                     "window), and the projector (LLaVA) or patch merger (Qwen-VL); norms not counted")


def _vision_dims(kind: str, cfg: Any) -> tuple[int, int, int, bool]:
    """(width, MLP width, input values per patch, gated MLP) of a vision encoder of ``kind``."""
    if kind == "clip":
        p = int(cfg.patch_size)
        return int(cfg.hidden_size), int(cfg.intermediate_size), int(getattr(cfg, "num_channels", 3)) * p * p, False
    p, tp, ch = int(cfg.patch_size), int(cfg.temporal_patch_size), int(cfg.in_channels)
    if kind == "qwen2_vl":
        d = int(cfg.embed_dim)
        return d, int(d * cfg.mlp_ratio), ch * tp * p * p, False
    if kind == "qwen2_5_vl":
        return int(cfg.hidden_size), int(cfg.intermediate_size), ch * tp * p * p, True
    raise ValueError(f"unknown vision encoder kind {kind!r}; known: clip, qwen2_vl, qwen2_5_vl")


def vision_block_macs(kind: str, cfg: Any, n: int, attention_sq: int) -> int:
    """MACs of one encoder block over ``n`` tokens whose attention segments' squared lengths sum to
    ``attention_sq`` (one segment of n: n^2): ``4nd^2 + 2 sq d + 2ndm`` (``3ndm`` for a gated MLP)."""
    d, m, _, gated = _vision_dims(kind, cfg)
    return 4 * n * d * d + 2 * attention_sq * d + (3 if gated else 2) * n * d * m


def vision_flops(kind: str, cfg: Any, text_hidden: int, tokens_per_block: Sequence[int],
                 attention_sq_per_block: Sequence[int], patches: int, merged: int, group: int = 1) -> int:
    """FLOPs (2 x MACs) of the vision encoder for ``patches`` input patches (``VISION_CONVENTION``).

    ``tokens_per_block`` / ``attention_sq_per_block``: what each block ran (``encoder.EncoderRun``);
    ``merged``: the tokens after the encoder, each made of ``group`` patches: through LLaVA's projector
    (to ``text_hidden``) or Qwen-VL's patch merger."""
    d, _, per_patch, _ = _vision_dims(kind, cfg)
    macs = patches * per_patch * d
    macs += sum(vision_block_macs(kind, cfg, int(n), int(sq))
                for n, sq in zip(tokens_per_block, attention_sq_per_block, strict=True))
    if kind == "clip":
        layers = 1  # one feature layer (lists of layers concatenate: not taken by the engine)
        macs += merged * (d * layers * text_hidden + text_hidden * text_hidden)
    else:
        width = d * group
        out = int(getattr(cfg, "out_hidden_size", None) or cfg.hidden_size)
        macs += merged * (width * width + width * out)
    return 2 * macs
