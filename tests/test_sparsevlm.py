"""SparseVLM (``method=sparsevlm``) against its authors' selection code, stage by stage, and its counts.

The functions between the two rulers below are transcribed from Gumpest/SparseVLMs, tag v1.5, commit
b9619e61a6f840d7aa9817eadd68bb5e84ce7b95 (the version of the ICML 2025 paper's Table 1), Apache License 2.0
(Copyright Peking University; http://www.apache.org/licenses/LICENSE-2.0):
``llava/model/language_model/score.py`` (``attn_postprocess_topk``, its tables set per test),
``llava/model/language_model/utils.py`` (``batch_index_select``, ``index_points``, ``cluster_and_merge``;
``einops.rearrange(x, "b l r -> b l () r")`` written as indexing) and
``llava/model/language_model/modelling_sparse_llama.py`` (the raters in ``LlamaDynamicvitModel.forward``,
the attention probabilities of ``LlamaDynamicvitFlashAttention2.forward(return_logits=True)``, and the
sparse-layer block of ``LlamaDynamicvitModel.forward``, gathered into functions; prints and CUDA timing left
out). Each stage is fed what the original reads, taken from the engine's own run: the input embeddings, the
sparse layer's rotated queries and keys (key heads repeated for the tiny models' grouped-query attention,
as the original's MHA model needs none) and the hidden states leaving it, in the original's token order.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny import LLAVA_IMAGE_ID, qwen_inputs, tiny_llava, tiny_qwen2_vl

from v2drop_eval import DropSchedule, attach
from v2drop_eval.engine.schedule import kept_count
from v2drop_eval.engine.signals import AttentionTap
from v2drop_eval.methods import get_method, sparsevlm
from v2drop_eval.methods.presets import fitted_preset
from v2drop_eval.methods.sparsevlm import (
    ORIGINAL_COUNTS,
    ORIGINAL_LAYERS,
    PRESETS,
    recycled_count,
    stage_counts,
)

# ------------------------------------------------------------------------------------------------------------
# Transcribed from Gumpest/SparseVLMs @ b9619e6 (Apache-2.0), see the module docstring.
layer_dict = {2: 0, 6: 1, 15: 2}  # score.py; the tests set their own

sparse_token_list_192 = [300, 200, 110]  # 2*576  4*300 10*200  16*110
sparse_token_list_128 = [303, 110, 36]
sparse_token_list_64 = [66, 30, 17]

sparse_token_dict = {
    192: sparse_token_list_192,
    128: sparse_token_list_128,
    64: sparse_token_list_64
}


def attn_postprocess_topk(self_attn_weights, v_token_start, v_token_num, text_token_start, t_token_idx, layer_idx,
                          retained_tokens):
    '''
    self_attn_weights: [B, H, L, L]
    '''
    self_attn_weights = self_attn_weights.mean(1)  # B, L[Q], L[K]

    t_token_idx = t_token_idx[1] + text_token_start
    relation_vis_text = self_attn_weights[:, t_token_idx, v_token_start: v_token_start + v_token_num]  # B, L2, L1

    relation_vis_text = relation_vis_text.mean(1)  # B, L1

    relation_vis = relation_vis_text
    s_flag = True       # s_flag controls whether token merge is needed.

    sparse_token_list = sparse_token_dict[retained_tokens]

    if v_token_num != 0:
        mask = torch.zeros_like(relation_vis, dtype=bool)
        _, indices = torch.topk(relation_vis, min(sparse_token_list[layer_dict[layer_idx]], v_token_num - 1), dim=1)
        mask[0][indices] = 1
    else:
        mask = torch.ones_like(relation_vis_text, dtype=bool)
        s_flag = False
    return mask, s_flag, relation_vis_text


def batch_index_select(x, idx):
    # the 3-dim branch
    B, N, C = x.size()
    N_new = idx.size(1)
    offset = torch.arange(B, dtype=torch.long, device=x.device).view(B, 1) * N
    idx = idx + offset
    out = x.reshape(B * N, C)[idx.reshape(-1)].reshape(B, N_new, C)
    return out


def index_points(points, idx):
    device = points.device
    B = points.shape[0]
    view_shape = list(idx.shape)
    view_shape[1:] = [1] * (len(view_shape) - 1)
    repeat_shape = list(idx.shape)
    repeat_shape[0] = 1
    batch_indices = torch.arange(B, dtype=torch.long).to(device).view(view_shape).repeat(repeat_shape)
    new_points = points[batch_indices, idx, :]
    return new_points


def cluster_and_merge(x, cluster_num):

    B, N, C = x.shape

    x1 = x[:, :, None, :]  # ein.rearrange(x, "b l r -> b l () r")
    x2 = x[:, None, :, :]  # ein.rearrange(x, "b l r -> b () l r")
    distance = (x1 - x2).norm(dim=-1, p=2)
    dist_matrix = distance / (C ** 0.5)
    # get local density
    dist_nearest, index_nearest = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    # add a little noise to ensure no tokens have the same density.
    density = density + torch.rand(
        density.shape, device=density.device, dtype=density.dtype) * 1e-6

    # get distance indicator
    mask = density[:, None, :] > density[:, :, None]
    mask = mask.type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, index_parent = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)

    # select clustering center according to score
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)

    # assign tokens to the nearest center
    dist_matrix = index_points(dist_matrix, index_down)

    idx_cluster = dist_matrix.argmin(dim=1)

    # make sure cluster center merge to itself
    idx_batch = torch.arange(B, device=x.device)[:, None].expand(B, cluster_num)
    idx_tmp = torch.arange(cluster_num, device=x.device)[None, :].expand(B, cluster_num)
    idx_cluster[idx_batch.reshape(-1), index_down.reshape(-1)] = idx_tmp.reshape(-1)

    # merge tokens

    B, N, C = x.shape
    device = dist_matrix.device
    idx_token = torch.arange(N)[None, :].repeat(B, 1).to(device)  # noqa: F841 (as in the original)
    agg_weight = x.new_ones(B, N, 1)  # noqa: F841

    token_weight = x.new_ones(B, N, 1)

    idx_batch = torch.arange(B, device=x.device)[:, None]
    idx = idx_cluster + idx_batch * cluster_num

    all_weight = token_weight.new_zeros(B * cluster_num, 1)
    all_weight.index_add_(dim=0, index=idx.reshape(B * N),
                          source=token_weight.reshape(B * N, 1))
    all_weight = all_weight + 1e-6
    norm_weight = token_weight / all_weight[idx]

    # average token features
    x_merged = x.new_zeros(B * cluster_num, C)
    source = x * norm_weight
    x_merged.index_add_(dim=0, index=idx.reshape(B * N),
                        source=source.reshape(B * N, C).type(x.dtype))
    x_merged = x_merged.reshape(B, cluster_num, C)

    return x_merged


def select_text_raters(hidden_states, v_token_start, text_token_start):
    # LlamaDynamicvitModel.forward, "select text tokens", on the decoder's input embeddings
    v_t = hidden_states[:, v_token_start: text_token_start, :]
    t_t = hidden_states[:, text_token_start:, :]
    m_v_t = v_t @ t_t.transpose(1, 2)  # [1, 576, 53]
    m_v_t = m_v_t.softmax(2).mean(1)  # [1, 53]
    t_token_idx = torch.where(m_v_t > m_v_t.mean())
    return t_token_idx


def sparse_layer_attention(query_states, key_states):
    # LlamaDynamicvitFlashAttention2.forward with return_logits=True (is_causal, no padding mask)
    L, S = query_states.size(-2), key_states.size(-2)
    scale_factor = 1 / math.sqrt(query_states.size(-1))
    attn_bias = torch.zeros(L, S, dtype=query_states.dtype)
    temp_mask = torch.ones(L, S, dtype=torch.bool).tril(diagonal=0)
    attn_bias.masked_fill_(temp_mask.logical_not(), float("-inf"))
    attn_bias.to(query_states.dtype)

    attn_logits = query_states @ key_states.transpose(2, 3) * scale_factor
    attn_logits += attn_bias.to(query_states.device)
    attn_logits = torch.softmax(attn_logits, dim=-1)
    return attn_logits


def sparse_layer(layer_outputs, attn_logits, hidden_states, v_token_start, v_token_num, text_token_start, t_token_idx,
                 layer_idx, retained_tokens, pre_prompt_length_list, image_shape):
    # LlamaDynamicvitModel.forward, the inference branch of a sparse layer; returns what the loop carries on
    B = hidden_states.shape[0]
    pred_score_vis, s_flag, relation_vis_text = attn_postprocess_topk(attn_logits, v_token_start, v_token_num, text_token_start, t_token_idx, layer_idx, retained_tokens)  # noqa: E501
    policy = torch.ones(B, hidden_states.shape[1], dtype=hidden_states.dtype, device=hidden_states.device)
    policy[:, v_token_start:text_token_start] = pred_score_vis.type(dtype=hidden_states.dtype)

    for batch in range(len(pre_prompt_length_list)):
        # keep pre prompt
        prompt_length = pre_prompt_length_list[batch]
        policy[batch, :prompt_length, ] = 1
        # keep question
        text_token_start = prompt_length + image_shape
        policy[batch, text_token_start:, ] = 1

    total_sparse_token_idx = torch.where(policy == 0)[1].unsqueeze(0)
    merge_sparse_token = None
    # merge and cluster
    if s_flag and total_sparse_token_idx.shape[1] > 0:

        total_sparse_token_idx = torch.where(policy == 0)[1].unsqueeze(0)
        total_sparse_token = batch_index_select(layer_outputs[0], total_sparse_token_idx)

        merge_token_idx_stage1 = torch.where(pred_score_vis == 0)[1]
        merge_token_stage1 = relation_vis_text[0][merge_token_idx_stage1]
        merge_token_num_stage1 = int(merge_token_idx_stage1.shape[0] * 0.3) + 1  # Top 30%
        merge_token_stage2_idx = merge_token_stage1.topk(merge_token_num_stage1)[1]

        merge_token_stage2 = total_sparse_token[:, merge_token_stage2_idx, :]
        cluster_num = int(merge_token_stage2.shape[1] / 10) + 1
        if (cluster_num == 0):
            cluster_num = merge_token_stage2.shape[1]

        merge_sparse_token = cluster_and_merge(merge_token_stage2, cluster_num)

        select_token_idx = torch.where(policy == 1)[1].unsqueeze(0)  # B, L_new
        select_token = batch_index_select(layer_outputs[0], select_token_idx)
        select_vis_token_num = pred_score_vis.sum()
        select_and_merge_token = torch.cat((select_token[:, :v_token_start + select_vis_token_num, :],
                                            merge_sparse_token,
                                            select_token[:, v_token_start + select_vis_token_num:, :]),
                                           dim=1)

        layer_outputs = (select_and_merge_token, layer_outputs[1])  # B, L, C
        # update
        v_token_num = pred_score_vis.sum() + cluster_num  # B == 1
        text_token_start = v_token_start + v_token_num
    else:
        select_token_idx = torch.where(policy == 1)[1].unsqueeze(0)  # B, L_new
        layer_outputs = (batch_index_select(layer_outputs[0], select_token_idx), layer_outputs[1])  # B, L, C
        # update
        v_token_num = pred_score_vis.sum()  # B == 1
        text_token_start = v_token_start + v_token_num
    return layer_outputs, pred_score_vis, policy, merge_sparse_token, int(v_token_num), int(text_token_start)
# ------------------------------------------------------------------------------------------------------------


def llava_one_image(tokens_side: int, text: tuple[int, int], seed: int) -> dict:
    """One LLaVA row [bos, text, image tokens, text] for ``tiny_llava(image_size=8 * tokens_side)``."""
    gen = torch.Generator().manual_seed(seed)
    before, after = (torch.randint(3, 90, (n,), generator=gen).tolist() for n in text)
    ids = [1, *before, *([LLAVA_IMAGE_ID] * tokens_side ** 2), *after]
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "pixel_values": torch.randn(1, 3, 8 * tokens_side, 8 * tokens_side, generator=gen)}


def _engine_run(model, inputs, schedule, monkeypatch):
    """The engine's run, with what each stage read: embeddings and raters, the sparse layers' q/k (in slot
    order), the hidden states and scores at each drop layer."""
    seen = {"qk": {}, "hidden": {}, "scores": {}}
    record, query_rows, merge = AttentionTap.record, sparsevlm.SparseVLM.query_rows, sparsevlm.SparseVLM.merge
    layer_of = {id(layer.self_attn): i for i, layer in enumerate(model.model.language_model.layers)}

    def spy_record(self, query, key, mask, scaling):
        seen["qk"][layer_of[id(self.module)]] = (query.detach().clone(), key.detach().clone())
        return record(self, query, key, mask, scaling)

    def spy_rows(self, ctx):
        seen["embeddings"] = ctx.embeddings.detach().clone()
        seen["raters"] = query_rows(self, ctx)
        return seen["raters"]

    def spy_merge(self, ctx, scores, kept):
        seen["hidden"][ctx.layer] = ctx.hidden.detach().clone()
        seen["scores"][ctx.layer] = scores.detach().clone()
        return merge(self, ctx, scores, kept)

    monkeypatch.setattr(AttentionTap, "record", spy_record)
    monkeypatch.setattr(sparsevlm.SparseVLM, "query_rows", spy_rows)
    monkeypatch.setattr(sparsevlm.SparseVLM, "merge", spy_merge)
    with attach(model, schedule, method="sparsevlm") as h, torch.no_grad():
        model(**inputs)
        return seen, dict(h.last_transfers), h.last_stats[0], h.renumbers


def _identities(transfers: dict, schedule: DropSchedule, S: int) -> dict[int, list]:
    """Per drop layer, the identity of each real slot after it: a prompt position, or ("r", layer, m) for the
    m-th token recycled at that layer (batch of one: no surplus slots)."""
    out, prev = {}, list(range(S))
    for layer in schedule.layers:
        t = transfers[layer]
        idents = []
        for s in range(t.layout.idx.shape[1]):
            assert t.layout.valid[0, s]
            src, m = int(t.source[0, s]), int(t.merged[0, s])
            idents.append(prev[src] if src >= 0 else ("r", layer, m))
        out[layer], prev = idents, idents
    return out


def _compare(model, inputs, schedule_text, monkeypatch) -> dict[str, int]:
    """Stage by stage, the original fed the engine's inputs keeps and recycles what the engine does."""
    schedule = DropSchedule.parse(schedule_text)
    seen, transfers, stats, renumbers = _engine_run(model, inputs, schedule, monkeypatch)
    ids = inputs["input_ids"][0]
    S = ids.shape[0]
    vision = ids == model.config.image_token_id
    v_token_start = int(vision.nonzero()[0, 0])
    v_token_num = int(vision.sum())
    text_token_start = v_token_start + v_token_num
    image_shape = v_token_num
    t_token_idx = select_text_raters(seen["embeddings"], v_token_start, text_token_start)
    raters = set(seen["raters"][0].nonzero()[:, 0].tolist())
    assert set((t_token_idx[1] + text_token_start).tolist()) == raters
    ours = _identities(transfers, schedule, S)
    order = list(range(S))  # the original's sequence, as identities
    prev_ours = list(range(S))
    checked = {"stages": 0, "kept_tokens": 0, "recycled_tokens": 0}
    for stage, (layer, _) in enumerate(schedule.stages):
        global layer_dict
        q, k = seen["qk"][layer - 1]
        perm = torch.tensor([prev_ours.index(x) for x in order])  # original order -> engine slot
        q, k = q[:, :, perm], k[:, :, perm].repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        hidden = seen["hidden"][layer][:, perm]
        added = int((transfers[layer].merged[0] >= 0).sum())
        keep = stats["vision_per_layer"][layer] - added
        layer_dict = {layer - 1: stage}
        sparse_token_dict["test"] = [keep] * len(schedule.stages)
        torch.manual_seed(sparsevlm.NOISE_SEED)  # the engine draws its density noise from this seed
        outputs, pred, policy, merged, v_num, t_start = sparse_layer(
            (hidden, None), sparse_layer_attention(q, k), hidden, v_token_start, v_token_num, text_token_start,
            t_token_idx, layer - 1, "test", [v_token_start], image_shape)
        # Kept image tokens: the same identities.
        block = order[v_token_start:v_token_start + v_token_num]
        kept_original = {block[i] for i in pred[0].nonzero()[:, 0].tolist()}
        new_ours = ours[layer]
        kept_ours = {x for x in new_ours if not (isinstance(x, tuple) and x[1] == layer)} & set(block)
        assert kept_ours == kept_original, (layer, sorted(map(str, kept_ours ^ kept_original)))
        # Recycled tokens: the same values, in the same order.
        t = transfers[layer]
        engine_merged = torch.bmm(t.weights, seen["hidden"][layer])[0][: merged.shape[1]]
        torch.testing.assert_close(engine_merged, merged[0], atol=1e-6, rtol=1e-5)
        # The original's next sequence, as identities; with renumbered positions the engine's slots follow it.
        kept_slots = (policy[0] == 1).nonzero()[:, 0].tolist()
        n_sel = int(pred.sum())
        order = ([order[i] for i in kept_slots[: v_token_start + n_sel]]
                 + [("r", layer, m) for m in range(merged.shape[1])]
                 + [order[i] for i in kept_slots[v_token_start + n_sel:]])
        if renumbers:
            assert new_ours == order
        else:
            assert sorted(map(str, new_ours)) == sorted(map(str, order))
        v_token_num, text_token_start, prev_ours = v_num, t_start, new_ours
        checked["stages"] += 1
        checked["kept_tokens"] += len(kept_original)
        checked["recycled_tokens"] += merged.shape[1]
    return checked


# LLaVA (renumbered positions) and Qwen2-VL (positions kept: M-RoPE), one image of 64 tokens, three stages
# that recycle 2, then 1, then 1 tokens; three model seeds each, sdpa and eager.
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_kept_and_recycled_tokens_equal_the_original(family, seed, attn, monkeypatch):
    if family == "llava":
        model = tiny_llava(attn, seed=seed, image_size=64)
        inputs = llava_one_image(8, (6, 9), seed)
    else:
        model = tiny_qwen2_vl(attn, seed=seed)
        inputs = qwen_inputs([[(16, 16)]], seed=seed)
    checked = _compare(model, inputs, "1:0.25/3:0.5/5:0.5", monkeypatch)
    assert checked["stages"] == 3 and checked["recycled_tokens"] >= 4


def test_presets_keep_the_original_counts():
    """576 image tokens through each LLaVA preset keep exactly score.py's counts, and recycle what the original's
    arithmetic recycles (``int(int(d x 0.3) + 1) / 10) + 1``), at its sparse layers 2, 6, 15."""
    for budget, counts in ORIGINAL_COUNTS.items():
        schedule = DropSchedule.preset("llava", budget, method="sparsevlm")
        assert schedule.layers == tuple(layer + 1 for layer in ORIGINAL_LAYERS)
        alive, expected = 576, []
        for count in counts:  # the original's loop: topk(min(count, v - 1)), then v = kept + cluster_num
            keep = min(count, alive - 1)
            rated = int((alive - keep) * 0.3) + 1
            cluster_num = int(rated / 10) + 1
            expected.append((keep, cluster_num))
            alive = keep + cluster_num
        assert stage_counts(576, schedule) == expected, budget


def test_original_counts_through_the_engine():
    """A 32-layer tiny LLaVA with 576 image tokens: the engine keeps, per layer, what the 192 preset's original
    keeps (recycled tokens counted as image tokens, as the original's v_token_num does)."""
    model = tiny_llava("sdpa", image_size=192, layers=32)
    inputs = llava_one_image(24, (5, 7), 0)
    with attach(model, DropSchedule.preset("llava", 192, method="sparsevlm"), method="sparsevlm") as h, \
            torch.no_grad():
        model(**inputs)
        per_layer = h.last_stats[0]["vision_per_layer"]
    assert per_layer == [576] * 3 + [309] * 4 + [204] * 9 + [113] * 16
    assert sum(per_layer) / 32 == 206.5


@pytest.mark.parametrize(("family", "layers"), [("qwen2_vl", 28), ("qwen3_vl", 36)])
def test_qwen_presets_are_derived(family, layers):
    """The Qwen tables: the sparse layers 2, 6, 15 scaled to the depth, the later ratios of the LLaVA preset of
    the same budget (``default``: 128's), the first solved to 0.001 for V2Drop's layer-averaged count there."""
    method = get_method("sparsevlm")
    for budget, text in PRESETS[family].items():
        llava = DropSchedule.parse(PRESETS["llava"][128 if budget == "default" else budget])
        target = DropSchedule.parse(get_method("v2drop").presets[family][budget]).average_tokens(576, layers)
        scaled = DropSchedule(tuple((round(sl * layers / 32) + 1, r)
                                    for sl, (_, r) in zip(ORIGINAL_LAYERS, llava.stages, strict=True)))
        assert text == str(method.refit(scaled, target, 576, layers)), budget
        # within half a token: one token more or less at the first stage moves the average by ~0.9
        assert abs(DropSchedule.parse(text).average_tokens(576, layers, method) - target) < 0.5


def test_budgets_scale_to_shallow_models():
    """On a 6-layer model the preset's layers scale and its first ratio is refitted to the scaled V2Drop
    schedule's average, counting recycled tokens (the later ratios stay the original's)."""
    schedule, scaled = fitted_preset("llava", 192, "sparsevlm", 6)
    assert scaled and schedule.layers == (1, 2, 3)
    assert [r for _, r in schedule.stages[1:]] == [0.65, 0.54]
    v2 = fitted_preset("llava", 192, "v2drop", 6)[0].average_tokens(576, 6)
    fits = [abs(DropSchedule(((1, r / 1000), *schedule.stages[1:])).average_tokens(576, 6, "sparsevlm") - v2)
            for r in range(1, 1001)]
    assert abs(schedule.average_tokens(576, 6, "sparsevlm") - v2) == min(fits)


def test_recycling_arithmetic_and_density_peaks():
    assert [recycled_count(d) for d in (0, 1, 29, 30, 276, 510)] == [0, 1, 1, 2, 9, 16]
    x = torch.randn(40, 24, generator=torch.Generator().manual_seed(3))
    cluster, centres = sparsevlm.density_peaks(x, 4, sparsevlm.density_noise(40, x.dtype, x.device))
    torch.manual_seed(sparsevlm.NOISE_SEED)
    merged = cluster_and_merge(x[None], 4)[0]
    weights = torch.zeros(4, 40)
    weights[cluster, torch.arange(40)] = 1 / (torch.bincount(cluster, minlength=4).float() + 1e-6)[cluster]
    torch.testing.assert_close(weights @ x, merged, atol=1e-6, rtol=1e-5)
    assert sorted(cluster[centres].tolist()) == [0, 1, 2, 3]
    # Blocked distances are the same values as the one broadcast.
    block = sparsevlm.BLOCK_ELEMENTS
    try:
        sparsevlm.BLOCK_ELEMENTS = 24 * 40 * 3
        assert torch.equal(sparsevlm.density_peaks(x, 4, sparsevlm.density_noise(40, x.dtype, x.device))[0], cluster)
    finally:
        sparsevlm.BLOCK_ELEMENTS = block
    assert kept_count(576, 0.521) == 300


@pytest.mark.parametrize(("method", "positions"), [("sparsevlm", "keep"), ("v2drop", "renumber"),
                                                   ("pdrop", "renumber")])
def test_position_rule_option_against_the_reference(method, positions):
    """``positions=`` overrides a method's rule (SparseVLM with its tokens' own positions; any other method
    renumbered), exact against the reference at prefill and every decode step, batch and padding included."""
    from reference import allowed_keys, drop_reference, layouts_and_hosts
    from tiny import LAYERS, llava_inputs

    model = tiny_llava("sdpa")
    inputs = llava_inputs([2, 1, 0], text_lens=[4, 6, 3], seed=1)
    with attach(model, "2:0.5/4:0.3", method=method, positions=positions) as h, torch.no_grad():
        out = model(**inputs)
        lay, moved = layouts_and_hosts(h), dict(h.last_transfers)
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        lay_gen, moved_gen = layouts_and_hosts(h), dict(h.last_transfers)
        assert h.renumbers == (positions == "renumber")
        rotary = h.adapter.rotary if h.renumbers else None
    layers = model.model.language_model.layers
    mask = inputs["attention_mask"]
    with drop_reference(model, layers, allowed_keys(lay, mask, LAYERS), "sdpa", moved, rotary), torch.no_grad():
        ref = model(**inputs)
    with drop_reference(model, layers, allowed_keys(lay_gen, mask, LAYERS), "sdpa", moved_gen, rotary), \
            torch.no_grad():
        ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
    hosts, valid = lay[max(lay)]
    for b in range(hosts.shape[0]):
        torch.testing.assert_close(out.logits[b][valid[b]], ref.logits[b, hosts[b][valid[b]]], atol=1e-4, rtol=0)
    assert torch.equal(gen.sequences, ref_gen.sequences)
    for a, b in zip(gen.logits, ref_gen.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_position_rule_refusals():
    with pytest.raises(ValueError, match=r"positions='shifted' is not allowed; allowed: keep, renumber"):
        attach(tiny_llava("sdpa"), "2:0.5", method="sparsevlm", positions="shifted")
    with pytest.raises(ValueError, match=r"positions=renumber cannot place method sparsevlm's merged tokens on "
                                         r"Qwen2VLForConditionalGeneration's multimodal rotary positions"):
        attach(tiny_qwen2_vl("sdpa"), "2:0.5", method="sparsevlm", positions="renumber")
    with attach(tiny_qwen2_vl("sdpa"), "2:0.5", method="sparsevlm") as h:  # its rule, where it cannot apply
        assert not h.renumbers
    with attach(tiny_qwen2_vl("sdpa"), "2:0.5", method="pdrop") as h:  # M-RoPE grids renumber without merging
        assert h.renumbers
    with pytest.raises(ValueError, match=r"unknown option 'kept_positions'"):  # the knob is positions=keep
        attach(tiny_llava("sdpa"), "2:0.5", method="pdrop", options="kept_positions")
