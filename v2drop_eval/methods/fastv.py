"""``fastv``: FastV (Chen et al., ECCV 2024) drops once, at layer K, the vision tokens that the last
query token attended to least at layer K-1 (head-averaged)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from v2drop_eval.engine.method import PREV_ATTENTION, Method, ScoreContext

if TYPE_CHECKING:
    import torch

# One stage at layer K=2, keeping the share that gives the same layer-averaged vision-token count as
# the V2Drop preset of that budget (576 tokens over 32 layers for LLaVA, 28 for Qwen2-VL, 36 for Qwen3-VL).
SINGLE_STAGE_PRESETS: dict[str, dict[str | int, str]] = {
    "llava": {192: "2:0.2882", 128: "2:0.1702", 64: "2:0.0521"},
    "qwen2_vl": {"default": "2:0.1667", 192: "2:0.2813", 128: "2:0.1632"},
    "qwen3_vl": {"default": "2:0.1806", 192: "2:0.2935", 128: "2:0.1771"},  # 36 layers (depth_scaled_presets)
}


class FastV(Method):
    name = "fastv"
    label = "FastV"
    style = ("tab:blue", "^")
    summary = "keeps the vision tokens the last query token attends to most at layer K-1"
    source = "Chen et al., 'An Image is Worth 1/2 Tokens After Layer 2', ECCV 2024"
    needs = frozenset({PREV_ATTENTION})
    multi_stage = False
    presets = SINGLE_STAGE_PRESETS

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.signals[PREV_ATTENTION]


METHOD = FastV()
