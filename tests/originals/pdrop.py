"""PyramidDrop's ranking at one stage, at inference (batch size 1), and its position rule.

Repository Cooperx521/PyramidDrop, commit 6444f304aee4b7edcb022839fb9e8cd07859704a, file
``llava/model/modeling_llama_pdrop.py`` (``LlamaModel.pdrop_rank_drop`` and ``pdrop_forward``).
Licence: Apache-2.0 (the file's header; the repository is MIT).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import topk as default_topk


def pdrop_counts(image_tokens_0, image_token_ratio_list, cur_num):
    """``image_tokens`` (alive before the stage) and ``keep_length`` of stage ``cur_num`` for one row
    (``image_token_ratio_list`` with the leading 1.0 that ``model_vqa_loader.py`` inserts)."""
    image_tokens = int(image_tokens_0 * image_token_ratio_list[cur_num])
    keep_length = int(image_tokens_0 * image_token_ratio_list[cur_num + 1])
    return image_tokens, keep_length


def pdrop_rank(features, position_ids, layer, rotary, apply_rotary_pos_emb, num_heads, num_key_value_heads,
               head_dim, image_index, image_tokens, keep_length, prompt_total_len, topk=default_topk):
    """Returns (the kept image token indices, sorted; the scores of the image tokens).

    adapted: ``self.layers[rank_layer]`` is ``layer``; transformers 5 has the rotary pair computed by the
    decoder's ``rotary(x, position_ids)`` and applied by the modeling file's ``apply_rotary_pos_emb``
    (the original: ``self_attn.rotary_emb(value_states, seq_len=kv_seq_len)`` and
    ``apply_rotary_pos_emb(..., position_ids)``); keys are repeated to the query heads for grouped-query
    models (LLaVA-1.5 has none, so the original multiplies them directly)."""
    # obtain query_states and key_states to calculate attention map
    hidden_states = features.clone().detach()
    self_attn = layer.self_attn
    hidden_states = layer.input_layernorm(hidden_states)

    bsz, q_len, _ = hidden_states.size()

    query_states = self_attn.q_proj(hidden_states)
    key_states = self_attn.k_proj(hidden_states)
    value_states = self_attn.v_proj(hidden_states)

    query_states = query_states.view(bsz, q_len, num_heads, head_dim).transpose(1, 2)
    key_states = key_states.view(bsz, q_len, num_key_value_heads, head_dim).transpose(1, 2)
    value_states = value_states.view(bsz, q_len, num_key_value_heads, head_dim).transpose(1, 2)

    cos, sin = rotary(value_states, position_ids)  # adapted
    query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)  # adapted
    key_states = key_states.repeat_interleave(num_heads // num_key_value_heads, dim=1)  # adapted (GQA)

    # attention_mask: at batch size 1 the last query's row of the causal mask masks nothing
    eager_attention_mask = torch.zeros(bsz, 1, q_len, q_len, dtype=query_states.dtype)

    i = 0
    image_index = image_index
    cur_key_states = key_states[i]
    cur_query_states = query_states[i]
    cur_eager_attention_mask = eager_attention_mask[i]

    text_query_states = cur_query_states[:, prompt_total_len - 1, :].unsqueeze(1)
    text_eager_attention_mask = cur_eager_attention_mask[:, prompt_total_len - 1, :].unsqueeze(1)

    # calculate attention map
    attn_weights = torch.matmul(text_query_states, cur_key_states.transpose(1, 2)) / math.sqrt(head_dim)  # (num_head, text_token,seq_len)
    attn_weights = attn_weights + text_eager_attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)  # (num_head, text_token,seq_len)

    attention_avg_head = torch.mean(attn_weights, dim=0)  # ave across heads
    attention_avg_head = attention_avg_head[:, image_index:image_index + image_tokens]  # select image token as keys
    attention_avg_text = torch.mean(attention_avg_head, dim=0)  # (576)

    # rank and drop by attention score
    top_rank_index = topk(attention_avg_text, keep_length, image_index)  # adapted: attention_avg_text.topk(keep_length).indices
    top_rank_index = top_rank_index + image_index
    top_rank_index = top_rank_index.sort().values
    return top_rank_index, attention_avg_text


def pdrop_position_ids(cur_len):
    """The kept tokens' positions after a stage (``position_ids[i, :cur_len] = ...``)."""
    return torch.arange(0, cur_len, dtype=torch.long)


def pdrop_decode_shift(image_tokens_0, image_token_ratio_list, stage, cur_position_ids):
    """A decode step's positions past a stage (``pdrop_forward``'s decoding branch)."""
    cur_visual_length = int(image_tokens_0 * image_token_ratio_list[stage])
    next_visual_length = int(image_tokens_0 * image_token_ratio_list[stage + 1])
    return cur_position_ids - (cur_visual_length - next_visual_length)
