"""The dropping engine against the plain model and the masking reference, on tiny LLaVA and Qwen2-VL."""

from __future__ import annotations

import functools

import pytest
import torch
from reference import allowed_keys, masking_reference
from tiny import LAYERS, llava_inputs, qwen_inputs, row_inputs, tiny_llava, tiny_qwen2_5_vl, tiny_qwen2_vl

from v2drop_eval import DropSchedule, attach
from v2drop_eval.methods import METHODS, get_method

FAMILIES = {"llava": tiny_llava, "qwen": tiny_qwen2_vl, "qwen25": tiny_qwen2_5_vl}

# Each case: (family, inputs builder). Batch 1, padded batch, different vision counts, two images, text-only.
CASES = {
    ("llava", "batch1"): lambda: llava_inputs([1]),
    ("llava", "padded"): lambda: llava_inputs([1, 1], text_lens=[2, 9]),
    ("llava", "mixed"): lambda: llava_inputs([2, 1, 0], text_lens=[4, 6, 3], seed=1),
    ("qwen", "batch1"): lambda: qwen_inputs([[(4, 4)]]),
    ("qwen", "padded"): lambda: qwen_inputs([[(4, 4)], [(4, 4)]]),
    ("qwen", "mixed"): lambda: qwen_inputs([[(4, 6), (2, 4)], [(4, 4)], []], seed=1),
    ("qwen25", "mixed"): lambda: qwen_inputs([[(4, 6), (2, 4)], [(4, 4)], []], seed=1),
}


@functools.cache
def model(family: str, attn: str):
    return FAMILIES[family](attn)


def _generate(m, inputs, **kw):
    with torch.no_grad():
        return m.generate(
            **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True, **kw
        )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llava", "qwen", "qwen25"])
def test_keep_all_is_bit_identical(family, attn):
    m = model(family, attn)
    inputs = CASES[(family, "mixed")]()
    with torch.no_grad():
        plain = m(**inputs).logits
        plain_gen = _generate(m, inputs)
        for method in METHODS:
            schedule = "2:1.0/4:1.0" if get_method(method).multi_stage else "2:1.0"
            with attach(m, schedule, method=method):
                assert torch.equal(m(**inputs).logits, plain)
                gen = _generate(m, inputs)
            assert torch.equal(gen.sequences, plain_gen.sequences)
            assert all(torch.equal(a, b) for a, b in zip(gen.logits, plain_gen.logits, strict=True))


# Every method that drops, at a schedule it takes (V2Drop at two).
DROPPING = [("v2drop", "2:0.5/4:0.3"), ("v2drop", "1:0.25/3:0"), ("random", "1:0.5/4:0"), ("fastv", "2:0.4"),
            ("fastv_attn", "2:0.4"), ("pdrop", "2:0.5/4:0.3"), ("dart", "2:0.4")]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("method", "schedule"), DROPPING)
def test_dropping_equals_masking_reference(case, attn, method, schedule):
    family, _ = case
    m = model(family, attn)
    inputs = CASES[case]()
    with attach(m, schedule, method=method) as h, torch.no_grad():
        out = m(**inputs)
        prefill_layouts = dict(h.last_layouts)
        dropped = _generate(m, inputs)
        # generate's prefill may keep other tokens: it gives padded rows other rotary positions (DART's
        # key norms see them), so each run is checked against the reference of its own kept sets
        layouts = dict(h.last_layouts)
    layers = m.model.language_model.layers
    with masking_reference(m, layers, allowed_keys(prefill_layouts, inputs["attention_mask"], LAYERS), attn), \
            torch.no_grad():
        ref = m(**inputs)
    with masking_reference(m, layers, allowed_keys(layouts, inputs["attention_mask"], LAYERS), attn), torch.no_grad():
        ref_gen = _generate(m, inputs)
    # Prefill: every real slot of the last layout against its original position.
    idx, valid = prefill_layouts[max(prefill_layouts)]
    assert out.logits.shape[1] == idx.shape[1] < inputs["input_ids"].shape[1]
    for b in range(idx.shape[0]):
        pos = idx[b][valid[b]]
        torch.testing.assert_close(out.logits[b][valid[b]], ref.logits[b, pos], atol=1e-4, rtol=0)
    # Decode: same greedy ids, logits within 1e-4 at every step.
    assert torch.equal(dropped.sequences, ref_gen.sequences)
    for step_d, step_r in zip(dropped.logits, ref_gen.logits, strict=True):
        torch.testing.assert_close(step_d, step_r, atol=1e-4, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", [m for m in METHODS if get_method(m).drops])
@pytest.mark.parametrize("family", ["llava", "qwen", "qwen25"])
def test_batch_rows_equal_rows_alone(family, method, attn):
    m = model(family, attn)
    inputs = CASES[(family, "mixed")]()
    schedule = "2:0.5/4:0.3" if get_method(method).multi_stage else "2:0.4"
    with attach(m, schedule, method=method) as h, torch.no_grad():
        batch = _generate(m, inputs)
        batch_stats = h.last_stats
        for b in range(inputs["input_ids"].shape[0]):
            alone = _generate(m, row_inputs(inputs, b, family))
            assert h.last_stats[0]["vision_per_layer"] == batch_stats[b]["vision_per_layer"]
            new = batch.sequences.shape[1] - inputs["input_ids"].shape[1]
            assert torch.equal(alone.sequences[0, -new:], batch.sequences[b, -new:])
            for step_b, step_a in zip(batch.logits, alone.logits, strict=True):
                torch.testing.assert_close(step_b[b], step_a[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_kv_cache_lengths_follow_schedule(family):
    m = model(family, "sdpa")
    inputs = CASES[(family, "batch1")]()
    schedule = DropSchedule.parse("1:0.5/3:0.25/5:0")
    with attach(m, schedule) as h, torch.no_grad():
        gen = _generate(m, inputs)
        stats = h.last_stats[0]
    n_vision = stats["vision_tokens"]
    text = inputs["input_ids"].shape[1] - n_vision
    expected_vision = schedule.tokens_per_layer(n_vision, LAYERS)
    assert stats["vision_per_layer"] == expected_vision
    assert stats["tokens_per_layer"] == [text + v for v in expected_vision]
    cache = gen.past_key_values
    new = gen.sequences.shape[1] - inputs["input_ids"].shape[1]
    for layer in range(LAYERS):
        assert cache.layers[layer].get_seq_length() == text + expected_vision[layer] + new - 1
    assert cache.get_seq_length() == inputs["input_ids"].shape[1] + new - 1
    heads = m.config.text_config.num_key_value_heads
    head_dim = m.config.text_config.hidden_size // m.config.text_config.num_attention_heads
    assert stats["kv_cache_bytes"] == sum(stats["tokens_per_layer"]) * 2 * heads * head_dim * 4


def test_variation_scoring_picks_top_k():
    m = model("llava", "eager")
    inputs = CASES[("llava", "batch1")]()
    with torch.no_grad():
        hs = m(**inputs, output_hidden_states=True).hidden_states
    layer = 3
    vision = (inputs["input_ids"][0] == m.config.image_token_id).nonzero()[:, 0]
    for metric, fn in {
        "l2": lambda a, b: (a - b).norm(dim=-1),
        "l1": lambda a, b: (a - b).abs().sum(-1),
        "cosine": lambda a, b: 1 - torch.nn.functional.cosine_similarity(a, b, dim=-1),
    }.items():
        score = fn(hs[layer][0, vision], hs[layer - 1][0, vision])
        expected = set(vision[score.topk(len(vision) // 4).indices].tolist())
        with attach(m, f"{layer}:0.25", metric=metric) as h, torch.no_grad():
            m(**inputs)
            idx, valid = h.last_layouts[layer]
        kept_vision = set(idx[0][valid[0]].tolist()) & set(vision.tolist())
        assert kept_vision == expected, metric


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fastv_uses_last_query_attention(attn):
    m = model("llava", attn)
    inputs = CASES[("llava", "batch1")]()
    k = 3
    with torch.no_grad():
        eager = model("llava", "eager")
        att = eager(**inputs, output_attentions=True).attentions[k - 1]  # [1, H, S, S]
    scores = att[0, :, -1, :].mean(0)
    vision = (inputs["input_ids"][0] == m.config.image_token_id).nonzero()[:, 0]
    expected = set(vision[scores[vision].topk(len(vision) // 4).indices].tolist())
    with attach(m, f"{k}:0.25", method="fastv") as h, torch.no_grad():
        m(**inputs)
        idx, valid = h.last_layouts[k]
        assert m.model.language_model.layers[k - 1].self_attn.config._attn_implementation != attn
    assert set(idx[0][valid[0]].tolist()) & set(vision.tolist()) == expected
    assert m.model.language_model.layers[k - 1].self_attn.config._attn_implementation == attn


def test_random_is_seeded():
    m = model("llava", "sdpa")
    inputs = CASES[("llava", "batch1")]()

    def kept(seed):
        with attach(m, "2:0.25", method="random", seed=seed) as h, torch.no_grad():
            m(**inputs)
            return h.last_layouts[2][0].tolist()

    assert kept(0) == kept(0)
    assert kept(0) != kept(1)


def test_use_cache_false_and_sampling_and_beams():
    m = model("qwen", "sdpa")
    inputs = CASES[("qwen", "mixed")]()
    with attach(m, "2:0.5/4:0") as h, torch.no_grad():
        cached = m.generate(**inputs, max_new_tokens=4, do_sample=False)
        uncached = m.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)
        torch.manual_seed(0)
        sampled = m.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=5)
        assert sampled.shape == cached.shape
        beams = m.generate(**inputs, max_new_tokens=4, num_beams=3, do_sample=False)
        assert beams.shape[0] == inputs["input_ids"].shape[0]
        assert h.last_stats[0]["vision_per_layer"][-1] == 0


def test_detach_restores_model_exactly():
    m = tiny_llava("sdpa")
    before = {k: v.clone() for k, v in m.state_dict().items()}

    def hooks():  # transformers registers some hooks of its own; ours must all be gone
        return [(n, dict(mod._forward_pre_hooks), dict(mod._forward_hooks)) for n, mod in m.named_modules()]

    inputs = CASES[("llava", "batch1")]()
    with torch.no_grad():
        plain = m(**inputs).logits
    hooks_before = hooks()
    for method, schedule in [("v2drop", "2:0.5"), ("fastv", "2:0.5"), ("random", "1:0.1/3:0"), ("pdrop", "2:0.5/4:0.5"),
                             ("dart", "3:0.5")]:
        h = attach(m, schedule, method=method)
        with torch.no_grad():
            m(**inputs)
        h.detach()
    assert hooks() == hooks_before
    assert not hasattr(m, "_v2drop_handle")
    lm = m.model.language_model
    assert all(layer.self_attn.config is lm.config for layer in lm.layers)
    assert m.state_dict().keys() == before.keys()
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(m(**inputs).logits, plain)


def test_text_only_and_keep_zero():
    m = model("llava", "sdpa")
    inputs = llava_inputs([0, 0], text_lens=[3, 7])
    with torch.no_grad():
        plain = m.generate(**inputs, max_new_tokens=3, do_sample=False)
        with attach(m, "1:0") as h:
            assert torch.equal(m.generate(**inputs, max_new_tokens=3, do_sample=False), plain)
            assert [s["vision_tokens"] for s in h.last_stats] == [0, 0]
    inputs = llava_inputs([2])
    with attach(m, "1:0") as h, torch.no_grad():
        m(**inputs)
        assert h.last_stats[0]["vision_per_layer"] == [32] + [0] * (LAYERS - 1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pdrop_uses_the_stage_layers_own_attention(attn):
    m = model("llava", attn)
    inputs = CASES[("llava", "batch1")]()
    k = 3
    with torch.no_grad():  # the last query row of layer k's own attention, on its (undropped) input
        att = model("llava", "eager")(**inputs, output_attentions=True).attentions[k]
    scores = att[0, :, -1, :].mean(0)
    vision = (inputs["input_ids"][0] == m.config.image_token_id).nonzero()[:, 0]
    expected = set(vision[scores[vision].topk(len(vision) // 4).indices].tolist())
    with attach(m, f"{k}:0.25", method="pdrop") as h, torch.no_grad():
        m(**inputs)
        idx, valid = h.last_layouts[k]
    assert set(idx[0][valid[0]].tolist()) & set(vision.tolist()) == expected


def _dart_reference(keys, normed, cand, text, keep):
    """DART's greedy for one row with Python sets, the way its reference code reads (pivots by key L1
    norm, then per pivot the least cosine-similar image tokens), with this project's budget split."""
    l1 = keys.float().abs().sum(dim=(0, 2))  # [n]
    image = cand.nonzero()[:, 0].tolist()
    last = max(image)
    after = [i for i in text.nonzero()[:, 0].tolist() if i > last]
    image_pivots = sorted(image, key=lambda i: (-l1[i].item(), i))[: min(4, keep)]
    text_pivots = sorted(after, key=lambda i: (-l1[i].item(), i))[:4]
    pivots = sorted(image_pivots + text_pivots)
    rest = keep - len(image_pivots)
    kept, left = set(image_pivots), [i for i in image if i not in image_pivots]
    for j, p in enumerate(pivots):
        count = rest // len(pivots) + (j < rest % len(pivots))
        sim = torch.nn.functional.cosine_similarity(normed[p][None].float(), normed[left].float(), dim=-1)
        chosen = [left[i] for i in (-sim).topk(count).indices.tolist()]
        kept |= set(chosen)
        left = [i for i in left if i not in chosen]
    return kept


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_dart_keeps_what_its_greedy_rule_keeps(family, monkeypatch):
    from v2drop_eval.methods import dart
    from v2drop_eval.methods.base import NORMED_HIDDEN, PREV_KEYS

    m = model(family, "eager")
    inputs = CASES[(family, "mixed")]()
    seen = []
    score = dart.DART.score
    monkeypatch.setattr(dart.DART, "score", lambda self, ctx: seen.append(ctx) or score(self, ctx))
    with attach(m, "2:0.5", method="dart") as h, torch.no_grad():
        m(**inputs)
        idx, valid = h.last_layouts[2]
    ctx = seen[0]
    for b in range(idx.shape[0]):
        if not ctx.candidates[b].any():
            continue
        expected = _dart_reference(ctx.signals[PREV_KEYS][b], ctx.signals[NORMED_HIDDEN][b], ctx.candidates[b],
                                   ctx.text[b], int(ctx.keep[b]))
        kept = set(idx[b][valid[b]].tolist()) & set(ctx.idx[b][ctx.candidates[b]].tolist())
        assert kept == {int(ctx.idx[b, i]) for i in expected}
        assert len(kept) == int(ctx.candidates[b].sum()) // 2


@pytest.mark.parametrize("case", [("llava", "padded"), ("qwen", "padded")])
def test_fastv_attn_keeps_what_fastv_keeps(case, monkeypatch):
    """Published FastV (eager weights of layer K-1, as output_attentions returns them) and the in-kernel
    FastV keep the same tokens; its score is the head average of output_attentions' map, last row."""
    from v2drop_eval.methods import fastv_attn

    family, _ = case
    m = model(family, "eager")
    inputs = CASES[case]()
    seen = []
    original = fastv_attn.FastVAttn.score
    monkeypatch.setattr(fastv_attn.FastVAttn, "score", lambda self, ctx: seen.append(original(self, ctx)) or seen[-1])
    kept = {}
    for method in ("fastv", "fastv_attn"):
        with attach(m, "2:0.4", method=method) as h, torch.no_grad():
            m(**inputs)
            kept[method] = h.last_layouts[2]
    assert torch.equal(kept["fastv"][0], kept["fastv_attn"][0]) and torch.equal(kept["fastv"][1], kept["fastv_attn"][1])
    with torch.no_grad():
        weights = m(**inputs, output_attentions=True).attentions[1]  # layer K-1 = 1
    torch.testing.assert_close(seen[0], weights.mean(dim=1)[:, -1, :], atol=0, rtol=0)
    assert kept["fastv"][1].sum() < inputs["attention_mask"].sum()  # something was dropped
