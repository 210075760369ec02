"""``dart``: DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More", arXiv 2502.11494, EMNLP 2025). Duplication-aware, not importance-based.

One stage at the input of layer K (2 by default). The authors' rule, ZichenWen1/DART at its commit
5a19452 (read from the fork xqy1111111/DART, which carries it), ``get_retained_image_token`` in
``llava/model/language_model/modeling_llama_self.py`` and ``Qwen2-VL/Qwen2VL_DART/modeling_qwen2_vl_self.py``
(defaults ``K=2``, ``pivot_image_token=4``, ``pivot_text_token=4``, ``reduction_ratio=0.778`` in
``llava/eval/model_vqa_loader.py`` and ``Qwen2-VL/eval_scripts/lmms_eval.sh``), in the model's dtype::

    TOKEN_TOPK = int(image_token_length * (1 - reduction_ratio) / (pivot_image_token + pivot_text_token))
    k_states_image_token_L1_norm = torch.norm(k_states_image_token, p=1, dim=-1)
    image_indices = (k_states_image_token_L1_norm.topk(pivot_image_token).indices + ...).tolist()
    query_indices = (k_states_query_token_L1_norm.topk(pivot_text_token).indices + ...).tolist()
    indices_set = set(image_indices + query_indices)
    for item in list(indices_set):
        cos_sim = -torch.nn.functional.cosine_similarity(last_layer_state[0][item, :], valid_vectors, dim=-1)
        top_k_indices = cos_sim.topk(TOKEN_TOPK).indices

- pivots: the 4 image tokens and the 4 text tokens after the image with the largest L1 norm of layer
  K-1's keys (after rotary, repeated to the query heads as its attention uses them);
- the hidden states entering layer K, through the decoder's final norm (``last_layer_state``), are
  compared by cosine similarity: for each pivot in Python set order (``list(indices_set)`` of the
  pivots' sequence indices), the ``TOKEN_TOPK`` not-yet-kept image tokens least similar to it are kept;
  the image pivots are kept too: ``4 + 8 x TOKEN_TOPK`` tokens. The LLaVA file writes the share as
  ``math.ceil(N * (1 - r) // 8)``, the same number (``x // 8 == floor(x / 8)``); its default
  ``max_num_trunction=128`` replaces ``N (1 - r)`` by 128 (the ``paper`` preset below keeps that count).

A schedule's keep ratio ``k`` stands for ``reduction_ratio = 1 - k`` (as a decimal). Kept tokens keep
their positions (``position_ids = keep_indexs.unsqueeze(0)``). The reference runs at batch size 1 with
one image at a fixed offset; here each row's pivots and tokens are its own, at any batch size, and a
row's sequence index is its index among its own real tokens (as at batch size 1).
"""

from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING, Any

from v2drop_eval.engine.method import (
    EXACT_COUNTS,
    FLOAT32_SCORES,
    NORMED_HIDDEN,
    PREV_KEYS,
    Method,
    Option,
    ScoreContext,
)

if TYPE_CHECKING:
    import torch

PIVOT_IMAGE_TOKENS = 4
PIVOT_TEXT_TOKENS = 4
DEFAULT_LAYER = 2
PIVOTS_IN_ORDER = Option("pivots_in_order", "visit the pivots in position order (the authors' code visits them in "
                                            "Python set order, which depends on hashing)")
# "paper": the reference's defaults at layer 2. LLaVA: max_num_trunction=128, a share of 128 // 8 = 16 per
# pivot (4 + 128 = 132 of 576 kept): 0.2223 is the shortest ratio with floor(576 x r / 8) = 16. Qwen2-VL
# (and the families sharing its table): reduction_ratio=0.778, keep ratio 0.222 (4 + 8 x 15 = 124 of 576).
# Budgets: one stage at layer 2 whose count, 4 + 8 x share, gives the layer-averaged count closest to the
# budget's target, as FastV's presets (presets.single_stage_for with this method's count; tests re-derive
# them). Counts move in steps of 8, so the average lands within 4 tokens of the target, not 1.
PRESETS: dict[str, dict[str | int, str]] = {
    "llava": {"paper": f"{DEFAULT_LAYER}:0.2223", 192: "2:0.2848", 128: "2:0.1737", 64: "2:0.0487"},
    "qwen2_vl": {"paper": f"{DEFAULT_LAYER}:0.222", "default": "2:0.1598", 192: "2:0.2848", 128: "2:0.1598"},
    "qwen3_vl": {"paper": f"{DEFAULT_LAYER}:0.222", "default": "2:0.1875", 192: "2:0.2987", 128: "2:0.1737"},
}


def dart_share(alive: int, keep_ratio: float) -> int:
    """``TOKEN_TOPK``: tokens each pivot keeps, ``int(N x (1 - reduction_ratio) / 8)``."""
    reduction = float(1 - Fraction(repr(float(keep_ratio))))
    return int(alive * (1 - reduction) / (PIVOT_IMAGE_TOKENS + PIVOT_TEXT_TOKENS))


class DART(Method):
    name = "dart"
    label = "DART"
    style = ("tab:orange", "P")
    summary = "keeps the vision tokens least similar to a few pivot tokens (duplication-aware)"
    source = "Wen et al., arXiv 2502.11494 (EMNLP 2025); github.com/ZichenWen1/DART"
    needs = frozenset({PREV_KEYS, NORMED_HIDDEN})
    multi_stage = False
    presets = PRESETS
    options = (FLOAT32_SCORES, EXACT_COUNTS, PIVOTS_IN_ORDER)

    def keep_count(self, alive: int, ratios: tuple[float, ...], initial: int,
                   options: frozenset[str] = frozenset(), text_pivots: int = PIVOT_TEXT_TOKENS, **row: Any) -> int:
        image_pivots = min(PIVOT_IMAGE_TOKENS, alive)
        return image_pivots + (image_pivots + text_pivots) * dart_share(alive, ratios[-1])

    def keep_counts(self, ctx: ScoreContext) -> torch.Tensor:
        import torch

        text_pivots = _text_after(ctx).sum(1).clamp(max=PIVOT_TEXT_TOKENS).tolist()
        rows = zip(ctx.alive.tolist(), ctx.initial.tolist(), text_pivots, strict=True)
        counts = [self.stage_keep(a, ctx.ratios, i, ctx.options, text_pivots=t) for a, i, t in rows]
        return torch.tensor(counts, dtype=torch.long, device=ctx.candidates.device)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        import torch

        float32 = FLOAT32_SCORES.name in ctx.options
        cand, keep = ctx.candidates, ctx.keep
        B, n = cand.shape
        keys = ctx.signals[PREV_KEYS]  # [B, H, n, hd], repeated to the query heads
        keys = keys.float() if float32 else keys
        key_l1 = torch.norm(keys.permute(0, 2, 1, 3).reshape(B, n, -1), p=1, dim=-1)  # [B, n]
        state = ctx.signals[NORMED_HIDDEN]
        state = state.float() if float32 else state
        after = _text_after(ctx)
        kept = torch.zeros_like(cand)
        for b in range(B):
            alive = int(cand[b].sum())
            if alive == 0:
                continue
            exact = EXACT_COUNTS.name in ctx.options  # the pivots count within floor(alive x r), remainder first
            image = _ranked(key_l1[b], cand[b])[:min(PIVOT_IMAGE_TOKENS, int(keep[b])) if exact else PIVOT_IMAGE_TOKENS]
            text = _ranked(key_l1[b], after[b])[:PIVOT_TEXT_TOKENS]
            kept[b, image] = True
            order = self._visiting_order(image + text, ctx.row_pos[b].tolist(), ctx.options)
            if not order:
                continue
            if exact:
                rest = max(0, int(keep[b]) - len(image))
                shares = [rest // len(order) + (j < rest % len(order)) for j in range(len(order))]
            else:
                shares = [dart_share(alive, ctx.ratios[-1])] * len(order)
            for slot, share in zip(order, shares, strict=True):
                valid = cand[b] & ~kept[b]
                dissimilar = -torch.nn.functional.cosine_similarity(state[b, slot][None], state[b], dim=-1)
                kept[b, _ranked(dissimilar, valid)[:share]] = True
        return kept.float()

    @staticmethod
    def _visiting_order(pivots: list[int], row_pos: list[int], options: frozenset[str]) -> list[int]:
        """The pivots' slots in the order the greedy visits them: Python set order of their sequence
        indices as the reference builds it (image pivots by key norm, then text pivots), or position
        order under ``pivots_in_order``."""
        slot_of = {row_pos[s]: s for s in pivots}
        indices = [row_pos[s] for s in pivots]
        order = sorted(indices) if PIVOTS_IN_ORDER.name in options else list(set(indices))
        return [slot_of[i] for i in order]


def _text_after(ctx: ScoreContext) -> torch.Tensor:
    """[B, n] text slots after the row's last alive vision token (DART's query tokens)."""
    import torch

    B, n = ctx.candidates.shape
    slots = torch.arange(n, device=ctx.candidates.device).expand(B, n)
    last_vision = torch.where(ctx.candidates, slots, -1).max(dim=1).values
    return ctx.text & (slots > last_vision[:, None])


def _ranked(score: torch.Tensor, mask: torch.Tensor) -> list[int]:
    """The slots of ``mask`` by ``score``, largest first (ties: the earlier slot)."""
    order = score.masked_fill(~mask, float("-inf")).argsort(descending=True, stable=True)
    return order[: int(mask.sum())].tolist()


METHOD = DART()
