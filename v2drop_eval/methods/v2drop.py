"""``v2drop``: V2Drop (arXiv 2509.01552, CVPR 2026) keeps the vision tokens that changed most through
the previous layer (docs/design.md §1).

The authors' rule, xuyang-liu16/V2Drop@219e03e, ``llava/model/language_model/V2Drop.py`` (the same lines
in ``Qwen2-VL/Qwen2VL_V2Drop/modeling_qwen2_vl_self.py``), on the hidden states entering layers l and l-1
(the latter after its own drop), in the model's dtype::

    l2_diff_candidate = torch.norm(current_candidates - prev_candidates, p=2, dim=-1)[0]
    k = max(1, int(self.image_token_amount_after_selection * keep_ratio))
    topk_values, topk_indices = torch.topk(l2_diff_candidate, k=k, largest=True)

so a row keeps ``max(1, int(alive x ratio))`` (float product), a ``:0`` stage keeping one token. Kept
tokens keep their positions (``position_ids = position_ids[:, keep_indexs]``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from v2drop_eval.engine.method import EXACT_COUNTS, FLOAT32_SCORES, PREV_HIDDEN, Method, Option, ScoreContext

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
    # first ratio solved again to the same vision fraction (presets.depth_scaled_presets; tests check it).
    "qwen3_vl": {
        "default": "4:0.24/21:0.05/28:0",
        192: "4:0.42/21:0.3/28:0",
        128: "4:0.21/21:0.25/28:0",
    },
}


ZERO_DROPS_ALL = Option("zero_drops_all", "a stage of keep ratio 0 keeps no vision token (the authors' code keeps "
                                          "max(1, int(alive x ratio)): one token at ratio 0)")


def variation(h_now: torch.Tensor, h_prev: torch.Tensor, metric: str = "l2", float32: bool = False) -> torch.Tensor:
    """V2Drop's token variation ``v_i = dist(h_i(l), h_i(l-1))`` over the hidden dim -> ``[B, n]``.

    ``h(l)`` is the residual stream entering layer l, ``h(l-1)`` the one entering layer l-1, so the
    variation is the size of layer l-1's whole update to the token. In the model's dtype as the authors'
    ``torch.norm(current - prev, p=2, dim=-1)``; ``float32``: upcast first.
    """
    import torch

    now, prev = (h_now.float(), h_prev.float()) if float32 else (h_now, h_prev)
    if metric == "l2":
        return torch.norm(now - prev, p=2, dim=-1)
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
    options = (FLOAT32_SCORES, EXACT_COUNTS, ZERO_DROPS_ALL)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return variation(ctx.hidden, ctx.signals[PREV_HIDDEN], ctx.metric, FLOAT32_SCORES.name in ctx.options)

    def keep_count(self, alive: int, ratios: tuple[float, ...], initial: int,
                   options: frozenset[str] = frozenset(), **row: Any) -> int:
        return v2drop_count(alive, ratios[-1], options)


def v2drop_count(alive: int, ratio: float, options: frozenset[str] = frozenset()) -> int:
    """``max(1, int(alive x ratio))`` as V2Drop's code counts (``zero_drops_all``: 0 at ratio 0)."""
    if ratio == 0 and ZERO_DROPS_ALL.name in options:
        return 0
    return max(1, int(alive * float(ratio)))


METHOD = V2Drop()
