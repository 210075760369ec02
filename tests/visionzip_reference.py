"""VisionZip's selection as its authors wrote it, transcribed for comparison (kept sets and tokens).

Source: dvlab-research/VisionZip, commit 3151f6df4fca36a4cd1c985e5956e725b1f9ad02, Apache License 2.0:
``visionzip/utils.py`` ``CLIPAttention_forward`` (attention weights from ``bmm(q_proj(h) * scale, k^T)``
softmaxed, and ``raw_key_states.mean(1)`` as the metric) and ``visionzip/clip_encoder.py``
``CLIPVisionTower_VisionZip.forward`` (from "## Dominant Visual Tokens" to "hidden_states_save").
Only the selection is transcribed; variable names follow the original.
"""

from __future__ import annotations

import torch
from torch import nn


def clip_attention_weights_and_metric(attn, hidden_states):
    """``CLIPAttention_forward`` of the reference: (attn_weights [B, H, T, T], metric [B, T, head_dim]) for the
    attention module ``attn`` on its (layer-normed) input ``hidden_states``."""
    bsz, tgt_len, embed_dim = hidden_states.size()
    num_heads, head_dim = attn.num_heads, attn.head_dim

    def _shape(tensor, seq_len, bsz):
        return tensor.view(bsz, seq_len, num_heads, head_dim).transpose(1, 2).contiguous()

    query_states = attn.q_proj(hidden_states) * attn.scale
    key_states = _shape(attn.k_proj(hidden_states), -1, bsz)
    raw_key_states = key_states.clone()
    proj_shape = (bsz * num_heads, -1, head_dim)
    query_states = _shape(query_states, tgt_len, bsz).view(*proj_shape)
    key_states = key_states.view(*proj_shape)
    src_len = key_states.size(1)
    attn_weights = torch.bmm(query_states, key_states.transpose(1, 2))
    attn_weights = nn.functional.softmax(attn_weights, dim=-1)
    attn_weights_reshaped = attn_weights.view(bsz, num_heads, tgt_len, src_len)
    return attn_weights_reshaped, raw_key_states.mean(1)


def visionzip_reference(attn_weights, hidden_states, metric, dominant_num, contextual_num):
    """The reference's tokens ``hidden_states_save`` and ``all_indices`` ([CLS] + dominant slots).
    ``dominant_num`` as ``apply_info`` stores it: the ``dominant`` argument minus 1."""
    ## Dominant Visual Tokens
    cls_idx = 0
    cls_attention = attn_weights[:, :, cls_idx, cls_idx + 1:]
    cls_attention_sum = cls_attention.sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((hidden_states.shape[0], 1), dtype=topk_indices.dtype,
                                         device=topk_indices.device), topk_indices], dim=1)

    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool, device=metric.device).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(hidden_states.shape[0], dominant_num + 1,
                                                                            hidden_states.shape[2])

    ### Filter
    metric_filtered = metric[mask].view(hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1),
                                        metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(
        hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), hidden_states.shape[2])
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)

    ## Contextual Visual Tokens
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step, device=metric_normalized.device)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]

    tokens_to_merge = metric_normalized[:, ~torch.isin(torch.arange(metric_normalized.shape[1],
                                                                     device=metric_normalized.device), target_indices), :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(tokens_to_merge.shape[0], tokens_to_merge.shape[1], contextual_num,
                                 dtype=hidden_states_filtered.dtype, device=metric_normalized.device)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_states_filtered[:, ~torch.isin(torch.arange(hidden_states_filtered.shape[1],
                                                                         device=hidden_states_filtered.device),
                                                            target_indices), :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    target_hidden = hidden_states_filtered[:, target_indices, :]

    contextual_tokens = target_hidden + aggregated_hidden

    # Merge with target hidden states and concatenate
    hidden_states_save = torch.cat([dominant_tokens, contextual_tokens], dim=1)
    return hidden_states_save, all_indices
