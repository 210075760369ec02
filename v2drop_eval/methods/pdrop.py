"""``pdrop``: PyramidDrop (Xing et al., CVPR 2025). At each stage layer l, the attention that the last
instruction token pays each alive vision token, computed with layer l's own query and key projections
(and rotary) on its input and averaged over heads; keep the top share. Prefill only.

The score comes from calling layer l's attention module itself on its normed input with a recording
kernel that stops after the scores (``v2drop_eval.engine.signals``), so no model code is copied and it runs
under sdpa, eager and flash alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from v2drop_eval.engine.method import PROBE_ATTENTION, Method, ScoreContext

if TYPE_CHECKING:
    import torch

# "paper": PyramidDrop's LLaVA-1.5-7B setting, stages at layers 8, 16, 24 keeping lambda = 0.5 of the
# alive tokens at each (576 -> 288 -> 144 -> 72; 270 tokens layer-averaged).
# Budgets: the paper's shape (three equally spaced stages s, 2s, 3s, one ratio lambda at each) with
# s >= 2 and lambda (to 0.01) chosen so that the layer-averaged vision-token count is within one token
# of the V2Drop preset of that budget and family, lambda closest to the paper's 0.5 (docs/methods.md).
PRESETS: dict[str, dict[str | int, str]] = {
    "llava": {
        "paper": "8:0.5/16:0.5/24:0.5",
        192: "4:0.55/8:0.55/12:0.55",  # 192.5 (V2Drop 193.4)
        128: "4:0.39/8:0.39/12:0.39",  # 131.5 (V2Drop 130.7)
        64: "2:0.32/4:0.32/6:0.32",  # 65.75 (V2Drop 66.4)
    },
    "qwen2_vl": {
        "default": "3:0.43/6:0.43/9:0.43",  # 130.1 (V2Drop 130.1)
        192: "4:0.52/8:0.52/12:0.52",  # 192.9 (V2Drop 192.3)
        128: "3:0.42/6:0.42/9:0.42",  # 126.9 (V2Drop 126.9)
    },
    "qwen3_vl": {  # 36 layers (schedule.depth_scaled_presets)
        "default": "4:0.42/8:0.42/12:0.42",  # 130.0 (V2Drop 130.3)
        192: "6:0.47/12:0.47/18:0.47",  # 191.5 (V2Drop 191.8)
        128: "4:0.41/8:0.41/12:0.41",  # 126.9 (V2Drop 126.5)
    },
}


class PyramidDrop(Method):
    name = "pdrop"
    label = "PDrop"
    style = ("tab:purple", "v")
    summary = "keeps the vision tokens the last instruction token attends to most, with the stage layer's own q/k"
    source = "Xing et al., 'PyramidDrop', CVPR 2025"
    needs = frozenset({PROBE_ATTENTION})
    presets = PRESETS

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.signals[PROBE_ATTENTION]


METHOD = PyramidDrop()
