"""V2Drop's selection at one stage.

Repository xuyang-liu16/V2Drop, commit 219e03ede8cf6a70d1534903fa238b13dd900bbb, file
``llava/model/language_model/V2Drop.py`` (``V2DropLlamaModel.forward``; the same lines in
``Qwen2-VL/Qwen2VL_V2Drop/modeling_qwen2_vl_self.py``). Licence: Apache-2.0 (the repository's LICENSE).
"""

from __future__ import annotations

import torch

from . import topk as default_topk


def v2drop_stage(current_hidden_states, prev_hidden_states, image_token_start_index,
                 image_token_amount_after_selection, keep_ratio, topk=default_topk):
    """Returns (selected_indices, the scores). adapted: the image offset (35 in the original), the token
    count and the stage's keep ratio are arguments; ``topk`` picks the indices."""
    device = current_hidden_states.device
    candidate_indices = torch.arange(image_token_start_index, image_token_amount_after_selection + image_token_start_index,
                                     device=device)
    current_candidates = current_hidden_states[:, candidate_indices, :]
    prev_candidates = prev_hidden_states[:, candidate_indices, :]

    l2_diff_candidate = torch.norm(current_candidates - prev_candidates, p=2, dim=-1)[0]

    k = max(1, int(image_token_amount_after_selection * keep_ratio))
    topk_indices = topk(l2_diff_candidate, k, image_token_start_index)  # adapted: torch.topk(l2_diff_candidate, k=k, largest=True)
    selected_indices = candidate_indices[topk_indices]
    return selected_indices, l2_diff_candidate
