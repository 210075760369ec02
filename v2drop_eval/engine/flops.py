"""Analytic FLOPs of the LLM prefill (docs/design.md §4).

Per decoder layer with ``n`` tokens, hidden ``d``, MLP width ``m``, heads ``h``, kv heads ``h_kv``:
``MACs(n) = 2nd^2 + 2nd^2 (h_kv/h) + 2n^2 d + 3ndm``. FLOPs = 2 x MACs. This equals
``torch.utils.flop_counter.FlopCounterMode`` under eager attention (lm_head and norms not counted).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["layer_macs", "prefill_flops", "paper_macs", "CONVENTION", "PAPER_CONVENTION"]

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
