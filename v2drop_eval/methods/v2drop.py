"""``v2drop``: V2Drop (arXiv 2509.01552, CVPR 2026) keeps the vision tokens that changed most through
the previous layer (docs/design.md §1)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from v2drop_eval.engine.method import PREV_HIDDEN, Method, ScoreContext

if TYPE_CHECKING:
    import torch

# Distances between a token's hidden states before and after a layer (the paper's ablation).
METRICS = ("l2", "l1", "cosine")
DEFAULT_METRIC = "l2"

# Published V2Drop schedules (docs/design.md §1) and the Qwen2-VL budgets derived from them.
# Qwen2-VL budgets are named after the LLaVA budget with the same vision-token reduction
# (192/576 = -66.7%, 128/576 = -77.8%): layers 3/16/22 as published, the second-stage ratio of the
# LLaVA preset of that budget, the first-stage ratio solved (to 0.01) so that the mean fraction of
# vision tokens over Qwen2-VL-7B's 28 layers is closest to 1/3 and 2/9 (33.4% and 22.1%).
# That fraction depends on the depth alone, so LLaVA-OneVision-7B (Qwen2-7B, 28 layers) and InternVL3-8B
# (Qwen2.5-7B, 28 layers) get this very table: their families name ``qwen2_vl`` as their presets
# (families.py; docs/methods.md, "Presets per family").
PRESETS: dict[str, dict[str | int, str]] = {
    "llava": {
        192: "3:0.5/17:0.3/22:0",
        128: "3:0.28/17:0.25/22:0",
        64: "3:0.05/17:0.05/22:0",
    },
    "qwen2_vl": {
        "default": "3:0.25/16:0.05/22:0",
        192: "3:0.43/16:0.3/22:0",
        128: "3:0.22/16:0.25/22:0",
    },
    # Qwen3-VL-8B (36 decoder layers): the Qwen2-VL presets' layers scaled to 36, the same later ratios, the
    # first ratio solved again to the same vision fraction (schedule.depth_scaled_presets; tests check it).
    "qwen3_vl": {
        "default": "4:0.24/21:0.05/28:0",
        192: "4:0.42/21:0.3/28:0",
        128: "4:0.21/21:0.25/28:0",
    },
}


def variation(h_now: torch.Tensor, h_prev: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """V2Drop's token variation ``v_i = dist(h_i(l), h_i(l-1))`` over the hidden dim -> ``[B, n]``.

    ``h(l)`` is the residual stream entering layer l, ``h(l-1)`` the one entering layer l-1, so the
    variation is the size of layer l-1's whole update to the token.
    """
    import torch

    now, prev = h_now.float(), h_prev.float()
    if metric == "l2":
        return (now - prev).norm(dim=-1)
    if metric == "l1":
        return (now - prev).abs().sum(dim=-1)
    if metric == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(now, prev, dim=-1)
    raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")


class V2Drop(Method):
    name = "v2drop"
    label = "V2Drop"
    style = ("tab:red", "o")
    summary = "keeps the vision tokens whose hidden state changed most through the previous layer"
    source = "Chen et al., arXiv 2509.01552 (CVPR 2026)"
    needs = frozenset({PREV_HIDDEN})
    adaptive = True
    takes_metric = True
    presets = PRESETS

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return variation(ctx.hidden, ctx.signals[PREV_HIDDEN], ctx.metric)


METHOD = V2Drop()
