"""``fastv_attn``: FastV as published (Chen et al., ECCV 2024; pkunlp-icler/FastV). The score is the
last query token's row of layer K-1's attention weights, averaged over heads, read from the weights
that ``output_attentions`` returns; getting them forces eager attention in that layer at prefill.

Same rule and count as ``fastv`` (which records the row inside the model's own kernel, so it stays on
sdpa / flash); this one exists to measure what the published way of getting the score costs. The
weights are in the model's dtype, as the authors' ``torch.mean(last_layer_attention, dim=1)`` reads them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from v2drop_eval.engine.method import (
    EXACT_COUNTS,
    FLOAT32_SCORES,
    PREV_ATTENTION_WEIGHTS,
    Method,
    ScoreContext,
)
from v2drop_eval.methods.fastv import SINGLE_STAGE_PRESETS, fastv_count

if TYPE_CHECKING:
    import torch


class FastVAttn(Method):
    name = "fastv_attn"
    label = "FastV (eager)"
    style = ("tab:green", "D")
    summary = "FastV's rule with its score from output_attentions at layer K-1 (that layer runs eager attention)"
    source = "Chen et al., 'An Image is Worth 1/2 Tokens After Layer 2', ECCV 2024 (published code path)"
    needs = frozenset({PREV_ATTENTION_WEIGHTS})
    multi_stage = False
    presets = SINGLE_STAGE_PRESETS
    options = (FLOAT32_SCORES, EXACT_COUNTS)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.signals[PREV_ATTENTION_WEIGHTS]

    def keep_count(self, alive: int, ratios: tuple[float, ...], initial: int,
                   options: frozenset[str] = frozenset(), **row: Any) -> int:
        return fastv_count(alive, ratios[-1])


METHOD = FastVAttn()
