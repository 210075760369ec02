"""FastV's selection at layer K.

Repository pkunlp-icler/FastV, commit d1659729b5bf1be225e99ee15783deeea80f63b1, file
``src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py``
(``LlamaModel.fastv_forward``). Licence: Apache-2.0 (the file is part of the transformers copy the
repository carries, ``src/FastV/llava-hf/transformers/LICENSE``; the repository has no licence of its own).
"""

from __future__ import annotations

import torch

from . import topk as default_topk


def fastv_stage(last_layer_attention, FASTV_image_token_start_index, FASTV_image_token_length, FASTV_r,
                topk=default_topk):
    """``last_layer_attention``: layer K-1's attention weights [1, H, S, S] (``layer_outputs[1]``).
    Returns (the kept image token indices, the scores of the image tokens)."""
    # compute average attention over different head
    last_layer_attention_avg = torch.mean(last_layer_attention, dim=1)[0]
    # generate new attention mask based on the average attention, sample the top ATTENTION_RANK tokens with highest attention
    last_layer_attention_avg_last_tok = last_layer_attention_avg[-1]
    # get the attention in image token
    last_layer_attention_avg_last_tok_image = last_layer_attention_avg_last_tok[
        FASTV_image_token_start_index:FASTV_image_token_start_index + FASTV_image_token_length]
    # get the indexs of the top ATTENTION_RANK tokens
    top_attention_rank_index = topk(last_layer_attention_avg_last_tok_image, round(FASTV_image_token_length * (1 - FASTV_r)),
                                    FASTV_image_token_start_index) + FASTV_image_token_start_index
    return top_attention_rank_index, last_layer_attention_avg_last_tok_image
