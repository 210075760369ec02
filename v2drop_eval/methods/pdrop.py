"""``pdrop``: PyramidDrop (Xing et al., CVPR 2025). At each stage layer l, the attention that the last
instruction token pays each alive vision token, computed with layer l's own query and key projections
(and rotary) on its input and averaged over heads; keep the top share. Prefill only.

The score comes from calling layer l's attention module itself on its normed input with a recording
kernel that stops after the scores (``v2drop_eval.engine.signals``), so no model code is copied and it runs
under sdpa, eager and flash alike.

The authors' rule, Cooperx521/PyramidDrop@6444f30, ``llava/model/modeling_llama_pdrop.py``
(``pdrop_rank_drop``), in the model's dtype::

    attn_weights = torch.matmul(text_query_states, cur_key_states.transpose(1, 2)) / math.sqrt(head_dim)
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)
    keep_length = [int(cur_image_token * self.image_token_ratio_list[cur_num + 1]) for ...]
    top_rank_index = attention_avg_text.topk(keep_length[i]).indices
    position_ids[i, :cur_len] = torch.arange(0, cur_len, dtype=position_ids.dtype, device=position_ids.device)

and at decode (``pdrop_forward``) ``cur_position_ids - (cur_visual_length[idx] - next_visual_length[idx])``.
``image_token_ratio_list`` is the cumulative share of the original count (``[1.0, 0.5, 0.25, 0.125]``
for the paper's lambda = 0.5): a schedule's per-stage keep ratios stand for their running products, and
stage s keeps ``int(N0 x r1 x ... x rs)`` of the row's ``N0`` vision tokens. Kept tokens are renumbered
(the engine closes the gaps the dropped ones leave, per row, at prefill and decode; docs/design.md §2);
``positions=keep`` keeps each kept token's own position instead.
"""

from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING, Any

from v2drop_eval.engine.method import (
    EXACT_COUNTS,
    FLOAT32_SCORES,
    PROBE_ATTENTION,
    RENUMBER,
    Method,
    ScoreContext,
)

if TYPE_CHECKING:
    import torch

# "paper": PyramidDrop's LLaVA-1.5-7B setting, stages at layers 8, 16, 24 keeping lambda = 0.5 of the
# alive tokens at each (576 -> 288 -> 144 -> 72; 270 tokens layer-averaged).
# Budgets: the paper's shape (three equally spaced stages s, 2s, 3s, one ratio lambda at each) with
# s >= 2 and lambda (to 0.01) chosen so that the layer-averaged vision-token count (PyramidDrop's counts)
# is within one token of the V2Drop preset of that budget and family (V2Drop's counts), lambda closest
# to the paper's 0.5 (presets.pdrop_for; docs/methods.md).
PRESETS: dict[str, dict[str | int, str]] = {
    "llava": {
        "paper": "8:0.5/16:0.5/24:0.5",
        192: "6:0.43/12:0.43/18:0.43",  # 193.9 (V2Drop 193.8)
        128: "3:0.46/6:0.46/9:0.46",  # 130.3 (V2Drop 131.0)
        64: "2:0.32/4:0.32/6:0.32",  # 65.75 (V2Drop 66.7)
    },
    "qwen2_vl": {
        "default": "3:0.43/6:0.43/9:0.43",  # 130.1 (V2Drop 130.3)
        192: "4:0.52/8:0.52/12:0.52",  # 192.9 (V2Drop 192.5)
        128: "3:0.42/6:0.42/9:0.42",  # 126.9 (V2Drop 127.1)
    },
    "qwen3_vl": {  # 36 layers (presets.depth_scaled_presets)
        "default": "4:0.42/8:0.42/12:0.42",  # 130.0 (V2Drop 130.6)
        192: "6:0.47/12:0.47/18:0.47",  # 191.7 (V2Drop 192.0)
        128: "4:0.41/8:0.41/12:0.41",  # 126.9 (V2Drop 126.7)
    },
}


def pdrop_count(initial: int, ratios: tuple[float, ...]) -> int:
    """``int(N0 x image_token_ratio_list[s + 1])``: the running product of the stage ratios (exact, as the
    decimal list a PyramidDrop user writes) times the row's original count, truncated."""
    share = Fraction(1)
    for r in ratios:
        share *= Fraction(repr(float(r)))
    return int(initial * float(share))


class PyramidDrop(Method):
    name = "pdrop"
    label = "PDrop"
    style = ("tab:purple", "v")
    summary = "keeps the vision tokens the last instruction token attends to most, with the stage layer's own q/k"
    source = "Xing et al., 'PyramidDrop', CVPR 2025"
    needs = frozenset({PROBE_ATTENTION})
    presets = PRESETS
    options = (FLOAT32_SCORES, EXACT_COUNTS)
    positions = RENUMBER  # positions=keep: each kept token keeps its own (docs/methods.md, "Options")

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.signals[PROBE_ATTENTION]

    def keep_count(self, alive: int, ratios: tuple[float, ...], initial: int,
                   options: frozenset[str] = frozenset(), **row: Any) -> int:
        return pdrop_count(initial, ratios)


METHOD = PyramidDrop()
