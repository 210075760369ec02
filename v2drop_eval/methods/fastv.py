"""``fastv``: FastV (Chen et al., ECCV 2024) drops once, at layer K, the vision tokens that the last
query token attended to least at layer K-1 (head-averaged).

The authors' rule, pkunlp-icler/FastV@d165972,
``src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py`` (``fastv_forward``),
on layer K-1's attention weights in the model's dtype::

    last_layer_attention_avg = torch.mean(last_layer_attention, dim=1)[0]
    last_layer_attention_avg_last_tok = last_layer_attention_avg[-1]
    top_attention_rank_index = last_layer_attention_avg_last_tok_image.topk(
        round(FASTV_image_token_length*(1-FASTV_r))).indices + FASTV_image_token_start_index

FastV's ``R`` (``fastv_r``) is the share dropped: a schedule's keep ratio ``k`` stands for ``R = 1 - k``
(as a decimal), and a row keeps ``round(alive x (1 - R))`` (Python's round, half to even). Kept tokens
keep their positions (``position_ids = keep_indexs.unsqueeze(0)``). Here the row is recorded inside
the model's own kernel (sdpa, flash), computed as eager attention computes it; ``fastv_attn`` reads
the eager weights themselves.
"""

from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING, Any

from v2drop_eval.engine.method import EXACT_COUNTS, FLOAT32_SCORES, PREV_ATTENTION, Method, ScoreContext

if TYPE_CHECKING:
    import torch

# One stage at layer K=2, keeping the share that gives the same layer-averaged vision-token count as
# the V2Drop preset of that budget (576 tokens over 32 layers for LLaVA, 28 for Qwen2-VL, 36 for Qwen3-VL).
SINGLE_STAGE_PRESETS: dict[str, dict[str | int, str]] = {
    "llava": {192: "2:0.2882", 128: "2:0.1702", 64: "2:0.0521"},
    "qwen2_vl": {"default": "2:0.1667", 192: "2:0.2813", 128: "2:0.1632"},
    "qwen3_vl": {"default": "2:0.1806", 192: "2:0.2935", 128: "2:0.1771"},  # 36 layers (depth_scaled_presets)
}


def fastv_count(alive: int, keep_ratio: float) -> int:
    """``round(alive x (1 - R))`` with FastV's drop share ``R = 1 - keep_ratio`` written as a decimal."""
    drop = float(1 - Fraction(repr(float(keep_ratio))))
    return round(alive * (1 - drop))


class FastV(Method):
    name = "fastv"
    label = "FastV"
    style = ("tab:blue", "^")
    summary = "keeps the vision tokens the last query token attends to most at layer K-1"
    source = "Chen et al., 'An Image is Worth 1/2 Tokens After Layer 2', ECCV 2024"
    needs = frozenset({PREV_ATTENTION})
    multi_stage = False
    presets = SINGLE_STAGE_PRESETS
    options = (FLOAT32_SCORES, EXACT_COUNTS)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.signals[PREV_ATTENTION]

    def keep_count(self, alive: int, ratios: tuple[float, ...], initial: int,
                   options: frozenset[str] = frozenset(), **row: Any) -> int:
        return fastv_count(alive, ratios[-1])


METHOD = FastV()
