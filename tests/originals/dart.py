"""DART's selection (``get_retained_image_token``), in its LLaVA and its Qwen2-VL form.

Repository ZichenWen1/DART at its commit 5a19452fc173017191c247848673e0bde755695a, read from the fork
xqy1111111/DART that carries it; files ``llava/model/language_model/modeling_llama_self.py`` and
``Qwen2-VL/Qwen2VL_DART/modeling_qwen2_vl_self.py`` (``Qwen2_5-VL/Qwen2_5VL_DART/modeling_qwen2_5_vl_self.py``
has the Qwen2-VL lines). Licence: Apache-2.0 (the repository's LICENSE).
"""

from __future__ import annotations

import math

import torch

from . import topk as default_topk


def get_retained_image_token_llava(last_layer_state, any_states, image_token_start_index, image_token_length,
                                   MAX_NUM_TRUNCTION, reduction_ratio, pivot_image_token=4, pivot_text_token=4,
                                   topk=default_topk):
    """adapted: ``DART_config`` entries are arguments (``text_length`` None: the LLaVA-1.5 branch)."""
    TOKEN_TOPK = math.ceil((MAX_NUM_TRUNCTION if MAX_NUM_TRUNCTION is not None else (image_token_length * (1 - reduction_ratio))) // (pivot_image_token + pivot_text_token))
    return _retained(last_layer_state, any_states, image_token_start_index, image_token_length, TOKEN_TOPK,
                     pivot_image_token, pivot_text_token, topk)


def get_retained_image_token_qwen2_vl(last_layer_state, any_states, image_token_start_index, image_token_length,
                                      reduction_ratio, pivot_image_token=4, pivot_text_token=4, topk=default_topk):
    """adapted: ``DART_config`` entries are arguments."""
    TOKEN_TOPK = int(image_token_length * (1 - reduction_ratio) / (pivot_image_token + pivot_text_token))
    return _retained(last_layer_state, any_states, image_token_start_index, image_token_length, TOKEN_TOPK,
                     pivot_image_token, pivot_text_token, topk)


def _retained(last_layer_state, any_states, image_token_start_index, image_token_length, TOKEN_TOPK,
              pivot_image_token, pivot_text_token, topk):
    """The lines both files share, from ``any_states = any_states.permute(...)`` on."""
    device = last_layer_state.device

    any_states = any_states.permute(0, 2, 1, 3).reshape(any_states.shape[0], any_states.shape[2], -1)

    k_states_image_token = any_states[0][image_token_start_index:image_token_start_index + image_token_length, :]
    k_states_query_token = any_states[0][image_token_start_index + image_token_length:, :]

    k_states_image_token_L1_norm = torch.norm(k_states_image_token, p=1, dim=-1)
    k_states_query_token_L1_norm = torch.norm(k_states_query_token, p=1, dim=-1)

    # adapted: .topk(pivot_...).indices through ``topk``
    image_indices = (topk(k_states_image_token_L1_norm, pivot_image_token, image_token_start_index) + image_token_start_index).tolist()
    query_indices = (topk(k_states_query_token_L1_norm, pivot_text_token, image_token_start_index + image_token_length) + image_token_start_index + image_token_length).tolist()
    indices_set = set(image_indices + query_indices)

    valid_indices = set(range(image_token_start_index, image_token_start_index + image_token_length)) - set(image_indices)

    valid_indices_list = list(valid_indices)
    for item in list(indices_set):
        valid_vectors = last_layer_state[0][valid_indices_list, :]
        cos_sim = -torch.nn.functional.cosine_similarity(last_layer_state[0][item, :], valid_vectors, dim=-1)
        top_k_indices = topk(cos_sim, TOKEN_TOPK, real=valid_indices_list)  # adapted: cos_sim.topk(TOKEN_TOPK).indices

        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices]
        indices_set.update(top_k_real_indices)

        valid_indices.difference_update(top_k_real_indices)
        valid_indices_list = list(valid_indices)

    indices_set.difference_update(query_indices)

    retained_image_tokens_index = torch.tensor(list(indices_set), device=device)

    return retained_image_tokens_index
