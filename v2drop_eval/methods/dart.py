"""``dart``: DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More", arXiv 2502.11494, EMNLP 2025). Duplication-aware, not importance-based.

One stage at the input of layer K (2 by default). As DART's reference code does
(ZichenWen1/DART, ``llava/model/language_model/modeling_llama_self.py``, ``get_retained_image_token``;
the same rule in ``Qwen2-VL/Qwen2VL_DART/modeling_qwen2_vl_self.py``; defaults ``pruned_layer=2``,
``pivot_image_token=4``, ``pivot_text_token=4``, ``reduction_ratio=0.778`` in
``llava/eval/model_vqa_loader.py`` and ``lmms-eval/lmms_eval/models/qwen2_vl.py``):

- pivots: the 4 image tokens and the 4 text tokens after the image with the largest L1 norm of layer
  K-1's keys (after rotary);
- the hidden states entering layer K, through the decoder's final norm, are compared by cosine
  similarity: for each pivot in turn, the not-yet-kept image tokens least similar to it are kept, the
  budget split evenly among the pivots; the image pivots are kept too.

Differences, so that every method keeps the same count at the same schedule: the reference adds its
4 image pivots on top of the budget (132 kept for a budget of 128) and rounds the per-pivot share
down; here the pivots count within ``floor(alive x keep_ratio)`` and the remainder goes one token each
to the first pivots (in position order). It runs at any batch size; the reference at batch size 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from v2drop_eval.engine.method import NORMED_HIDDEN, PREV_KEYS, Method, ScoreContext
from v2drop_eval.methods.fastv import SINGLE_STAGE_PRESETS

if TYPE_CHECKING:
    import torch

PIVOT_IMAGE_TOKENS = 4
PIVOT_TEXT_TOKENS = 4
DEFAULT_LAYER = 2
# "paper": the reference's default, K=2 keeping 1 - 0.778 of the image tokens (128 of 576). Budgets:
# FastV's single-stage presets at layer 2, matched to V2Drop's layer-averaged counts.
PRESETS: dict[str, dict[str | int, str]] = {
    fam: {"paper": f"{DEFAULT_LAYER}:0.222", **table} for fam, table in SINGLE_STAGE_PRESETS.items()
}


class DART(Method):
    name = "dart"
    label = "DART"
    style = ("tab:orange", "P")
    summary = "keeps the vision tokens least similar to a few pivot tokens (duplication-aware)"
    source = "Wen et al., arXiv 2502.11494 (EMNLP 2025); github.com/ZichenWen1/DART"
    needs = frozenset({PREV_KEYS, NORMED_HIDDEN})
    multi_stage = False
    presets = PRESETS

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        import torch

        cand, keep = ctx.candidates, ctx.keep
        B, n = cand.shape
        device = cand.device
        slots = torch.arange(n, device=device).expand(B, n)
        key_l1 = ctx.signals[PREV_KEYS].float().abs().sum(dim=(1, 3))  # [B, n] over heads x head dim
        hidden = torch.nn.functional.normalize(ctx.signals[NORMED_HIDDEN].float(), dim=-1)

        def top(mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
            """[B, n] bool: each row's ``count`` slots of ``mask`` with the largest key L1 norm."""
            return _top_by(key_l1, mask, count)

        image_pivots = top(cand, keep.clamp(max=PIVOT_IMAGE_TOKENS))
        # Text pivots come from the text after the row's last vision token (the question), as in DART.
        last_vision = torch.where(cand, slots, -1).max(dim=1).values
        after = ctx.text & (slots > last_vision[:, None])
        text_pivots = top(after, after.sum(1).clamp(max=PIVOT_TEXT_TOKENS))
        pivots = image_pivots | text_pivots
        n_piv = pivots.sum(1)
        rest = keep - image_pivots.sum(1)
        share = torch.where(n_piv > 0, rest // n_piv.clamp(min=1), 0)
        extra = torch.where(n_piv > 0, rest % n_piv.clamp(min=1), 0)
        # Pivots in position order: [B, P] slot of the j-th pivot (n where a row has fewer).
        order = torch.where(pivots, slots, n).sort(dim=1).values[:, : int(n_piv.max()) if B else 0]
        kept = image_pivots.clone()
        for j in range(order.shape[1]):
            slot = order[:, j]
            has = slot < n
            count = torch.where(has, share + (j < extra).long(), 0)
            anchor = hidden.gather(1, slot.clamp(max=n - 1)[:, None, None].expand(-1, 1, hidden.shape[-1]))
            dissimilar = -(hidden * anchor).sum(-1)  # [B, n] minus cosine similarity
            kept |= _top_by(dissimilar, cand & ~kept, count)
        return kept.float()


def _top_by(score: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """[B, n] bool: per row, the ``count`` slots of ``mask`` with the largest ``score`` (ties: earlier slot)."""
    import torch

    masked = score.masked_fill(~mask, float("-inf"))
    order = masked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return mask & (rank < count[:, None])


METHOD = DART()
