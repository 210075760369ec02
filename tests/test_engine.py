"""The dropping engine against the plain model and the masking reference, on tiny LLaVA (1.5, NeXT, OneVision,
NeXT-Video), Qwen2-VL, Qwen2.5-VL, Qwen3-VL (and MoE) and InternVL, with images and videos."""

from __future__ import annotations

import functools

import pytest
import torch
from grid import grid
from reference import allowed_keys, drop_reference, layouts_and_hosts, masking_reference
from tiny import (
    LAYERS,
    QWEN3_DEEPSTACK,
    anyres_inputs,
    internvl_inputs,
    llava_inputs,
    qwen3_inputs,
    qwen_inputs,
    row_inputs,
    tiny_internvl,
    tiny_llava,
    tiny_llava_next,
    tiny_llava_next_video,
    tiny_llava_onevision,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
    tiny_qwen3_vl,
)

from v2drop_eval import DropSchedule, attach
from v2drop_eval.engine.families import FAMILIES as SUPPORTED
from v2drop_eval.engine.method import RENUMBER
from v2drop_eval.methods import DEFAULT_METHOD, METHODS, get_method

FAMILIES = {"llava": tiny_llava, "qwen": tiny_qwen2_vl, "qwen25": tiny_qwen2_5_vl, "next": tiny_llava_next,
            "onevision": tiny_llava_onevision, "next_video": tiny_llava_next_video, "qwen3": tiny_qwen3_vl,
            "qwen3moe": functools.partial(tiny_qwen3_vl, moe=True), "internvl": tiny_internvl}
# Qwen3-VL rows: several images, videos (one run per temporal patch) and text-only rows in one batch.
QWEN3_MIXED = [[("image", 4, 6), ("image", 2, 4)], [("video", 2, 4, 4)], [("image", 4, 4), ("video", 3, 2, 4)], []]
# The any-resolution LLaVA families: inputs through their real processors (tests/tiny.py), rows alone by
# rebuilding the same spec for one row.
ANYRES = {"next": "llava_next", "onevision": "llava_onevision", "next_video": "llava_next_video"}


def image(w: int, h: int) -> tuple:
    return ("image", (w, h))


def video(frames: int) -> tuple:
    return ("video", frames)


# Each case: (family, inputs builder). Batch 1, padded batch, different vision counts, two images, text-only;
# any-resolution images of different sizes (so different token counts per image and per row); videos,
# alone and beside image rows in one batch. InternVL "mixed": images of 3 and 1 tiles, a 4-frame
# video beside an image, a text-only row.
SPECS = {
    ("next", "padded"): [[image(40, 30)], [image(70, 30)]],
    ("next", "mixed"): [[image(70, 30), image(30, 90)], [image(50, 50)], []],
    ("onevision", "padded"): [[image(40, 30)], [image(90, 40)]],
    ("onevision", "mixed"): [[image(70, 30), image(30, 40)], [video(6)], [image(50, 90)], []],
    ("onevision", "video"): [[video(8), image(40, 40)], [video(8)]],  # videos of one batch: same frame count
    ("next_video", "mixed"): [[video(4)], [image(70, 30)], [video(4), image(30, 30)]],
}
CASES = {
    ("llava", "batch1"): lambda: llava_inputs([1]),
    ("llava", "padded"): lambda: llava_inputs([1, 1], text_lens=[2, 9]),
    ("llava", "mixed"): lambda: llava_inputs([2, 1, 0], text_lens=[4, 6, 3], seed=1),
    ("qwen", "batch1"): lambda: qwen_inputs([[(4, 4)]]),
    ("qwen", "padded"): lambda: qwen_inputs([[(4, 4)], [(4, 4)]]),
    ("qwen", "mixed"): lambda: qwen_inputs([[(4, 6), (2, 4)], [(4, 4)], []], seed=1),
    ("qwen", "video"): lambda: qwen_inputs([[(2, 4, 4)], [(4, 6), (1, 2, 4)], [(4, 4)]], seed=2),
    ("qwen25", "mixed"): lambda: qwen_inputs([[(4, 6), (2, 4)], [(4, 4)], []], seed=1),
    ("qwen25", "video"): lambda: qwen_inputs([[(2, 4, 4)], [(4, 6), (1, 2, 4)], [(4, 4)]], seed=2),
    **{case: functools.partial(anyres_inputs, ANYRES[case[0]], spec, 1) for case, spec in SPECS.items()},
    ("internvl", "batch1"): lambda: internvl_inputs([[("image", 2)]]),
    ("internvl", "padded"): lambda: internvl_inputs([[("image", 1)], [("video", 2)]]),
    ("internvl", "mixed"): lambda: internvl_inputs([[("image", 3), ("image", 1)], [("video", 4), ("image", 1)], []],
                                                   seed=1),
    ("qwen3", "batch1"): lambda: qwen3_inputs([[("image", 4, 4)]]),
    ("qwen3", "padded"): lambda: qwen3_inputs([[("image", 4, 4)], [("image", 4, 4)]]),
    ("qwen3", "video"): lambda: qwen3_inputs([[("video", 2, 4, 6)], [("video", 4, 2, 4)]], seed=2),
    ("qwen3", "mixed"): lambda: qwen3_inputs(QWEN3_MIXED, seed=1),
    ("qwen3moe", "mixed"): lambda: qwen3_inputs(QWEN3_MIXED, seed=1),
}
# Families whose decoders take one rotary position per token (the others use M-RoPE).
ONE_D_POSITIONS = {"llava", "next", "onevision", "next_video", "internvl"}
# The batch-row test runs these cases of each family.
ROW_CASES = [("llava", "mixed"), ("qwen", "mixed"), ("qwen", "video"), ("qwen25", "mixed"), ("qwen25", "video"),
             ("next", "mixed"), ("onevision", "mixed"), ("onevision", "video"), ("next_video", "mixed"),
             ("qwen3", "mixed"), ("qwen3moe", "mixed"), ("internvl", "mixed")]


def alone(case: tuple[str, str], inputs: dict, b: int) -> dict:
    """Row ``b`` of the case's batch, run as a batch of one."""
    family = case[0]
    if family in ANYRES:
        return anyres_inputs(ANYRES[family], SPECS[case], 1, only=b)
    return row_inputs(inputs, b, family if family in ("llava", "internvl") else "qwen")


@functools.cache
def model(family: str, attn: str):
    return FAMILIES[family](attn)


def _generate(m, inputs, **kw):
    with torch.no_grad():
        return m.generate(
            **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True, **kw
        )


ATTNS = ("sdpa", "eager")
# The methods that drop inside the decoder (VisionZip removes tokens before it: tests/test_prellm.py).
DECODER_METHODS = [m for m in METHODS if not get_method(m).pre_llm]


def _schedule(method: str, multi: str = "2:0.5/4:0.3", single: str = "2:0.4") -> str:
    return multi if get_method(method).multi_stage else single


# Every method that drops (read from the registry), at a schedule it takes; the default method also at a
# schedule that starts at layer 1 and keeps nothing from layer 3 on, SparseVLM's merged tokens also from the
# first layer on. With the attach arguments that change what the engine does (positions kept where the
# authors renumber, and renumbered where they keep; DART's pivots, which keep all of an image of 4 tokens,
# within the floor count so that the small Qwen images drop too).
DROPPING = [(m, _schedule(m), None) for m in DECODER_METHODS if get_method(m).drops] + [
    (DEFAULT_METHOD, "1:0.25/3:0", None), ("pdrop", _schedule("pdrop"), "positions=keep"),
    ("v2drop", _schedule("v2drop"), "positions=renumber"), ("dart", _schedule("dart"), "options=exact_counts"),
    ("sparsevlm", "1:0.3/3:0", None), ("sparsevlm", _schedule("sparsevlm"), "positions=keep")]


def _ids(value) -> str:
    return "-".join(value) if isinstance(value, tuple) else str(value)


# The grids' facets: in `make test` every case runs on both kernels and every method on every family
# and on both kernels (tests/grid.py); `make test-all` runs the full product.
FACETS = {"case": lambda p: p[0], "family": lambda p: p[0][0], "attn": lambda p: p[1], "method": lambda p: p[2:]}
PAIRS = [("case", "attn"), ("family", "method"), ("method", "attn")]


def test_every_supported_class_and_method_is_in_the_grids():
    """A new model class needs a tiny builder and cases here; a new method enters the grids by the registry."""
    built = {type(model(family, "sdpa")).__name__ for family in FAMILIES}
    assert {c for f in SUPPORTED.values() for c in f.classes} <= built
    assert {m for m in DECODER_METHODS if get_method(m).drops} == {m for m, _, _ in DROPPING}
    assert {c[0] for c in CASES} == set(FAMILIES) == {c[0] for c in ROW_CASES}


@functools.cache
def _plain(case: tuple[str, str], attn: str):
    m = model(case[0], attn)
    inputs = CASES[case]()
    with torch.no_grad():
        return m(**inputs).logits, _generate(m, inputs)


@pytest.mark.parametrize(("case", "attn", "method"), grid(
    [(case, attn, method) for case in ROW_CASES for attn in ATTNS for method in DECODER_METHODS], FACETS, PAIRS),
    ids=_ids)
def test_keep_all_is_bit_identical(case, attn, method):
    m = model(case[0], attn)
    inputs = CASES[case]()
    plain, plain_gen = _plain(case, attn)
    with attach(m, _schedule(method, "2:1.0/4:1.0", "2:1.0"), method=method), torch.no_grad():
        assert torch.equal(m(**inputs).logits, plain)
        gen = _generate(m, inputs)
    assert torch.equal(gen.sequences, plain_gen.sequences)
    assert all(torch.equal(a, b) for a, b in zip(gen.logits, plain_gen.logits, strict=True))


# Pinned in `make test`: DART on padded batches (generate's prefill gives padded rows other rotary
# positions, which DART's key norms see).
PINNED = [(case, attn, "dart", _schedule("dart"), None) for case in (("llava", "padded"), ("qwen", "padded"))
          for attn in ATTNS]


@pytest.mark.parametrize(("case", "attn", "method", "schedule", "given"), grid(
    [(case, attn, *ms) for case in CASES for attn in ATTNS for ms in DROPPING], FACETS, PAIRS, PINNED), ids=_ids)
def test_dropping_equals_masking_reference(case, attn, method, schedule, given):
    family, _ = case
    m = model(family, attn)
    inputs = CASES[case]()
    kwargs = dict([given.split("=")]) if given else {}
    with attach(m, schedule, method=method, **kwargs) as h, torch.no_grad():
        out = m(**inputs)
        # Each slot's mask position (merged tokens can move slots), and how merged tokens were made.
        prefill_layouts, prefill_transfers = layouts_and_hosts(h), dict(h.last_transfers)
        dropped_any = any(s["vision_per_layer"][-1] < s["vision_tokens"] for s in h.last_stats)
        dropped = _generate(m, inputs)
        # generate's prefill may keep other tokens: it gives padded rows other rotary positions (DART's
        # key norms see them), so each run is checked against the reference of its own kept sets
        layouts, transfers = layouts_and_hosts(h), dict(h.last_transfers)
        renumbers, rotary = h.renumbers, (h.adapter.rotary if h.renumbers else None)
        # The given rule, else the authors'; merged tokens are not renumbered under the Qwen-VLs' M-RoPE.
        rule = kwargs.get("positions", get_method(method).positions)
        assert renumbers == (rule == RENUMBER and (family in ONE_D_POSITIONS or not get_method(method).merges))
    assert bool(prefill_transfers) == get_method(method).merges
    layers = m.model.language_model.layers
    spec = get_method(method)
    if spec.merges:  # merged tokens, and positions numbered along the slots where they are renumbered

        def reference(lay: dict, moved: dict):
            allowed = allowed_keys(lay, inputs["attention_mask"], LAYERS)
            return drop_reference(m, layers, allowed, attn, moved, rotary)
    else:  # renumbered positions: the reference closes the gaps as PyramidDrop's code does

        def reference(lay: dict, moved: dict):
            allowed = allowed_keys(lay, inputs["attention_mask"], LAYERS)
            return masking_reference(m, layers, allowed, attn, renumbers)

    with reference(prefill_layouts, prefill_transfers), torch.no_grad():
        ref = m(**inputs)
    with reference(layouts, transfers), torch.no_grad():
        ref_gen = _generate(m, inputs)
    # Prefill: every real slot of the last layout against its position in the reference.
    idx, valid = prefill_layouts[max(prefill_layouts)]
    assert dropped_any or (method, given) == ("dart", None)  # DART keeps 4 pivots: all of a 4-token image
    assert out.logits.shape[1] == idx.shape[1] < inputs["input_ids"].shape[1] or not dropped_any
    for b in range(idx.shape[0]):
        pos = idx[b][valid[b]]
        torch.testing.assert_close(out.logits[b][valid[b]], ref.logits[b, pos], atol=1e-4, rtol=0)
    # Decode: same greedy ids, logits within 1e-4 at every step.
    assert torch.equal(dropped.sequences, ref_gen.sequences)
    for step_d, step_r in zip(dropped.logits, ref_gen.logits, strict=True):
        torch.testing.assert_close(step_d, step_r, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("case", "attn", "method"), grid(
    [(case, attn, m) for case in ROW_CASES for attn in ATTNS for m in DECODER_METHODS if get_method(m).drops],
    FACETS, PAIRS), ids=_ids)
def test_batch_rows_equal_rows_alone(case, attn, method):
    m = model(case[0], attn)
    inputs = CASES[case]()
    schedule = _schedule(method)
    # min_new_tokens: a row that meets EOS early would otherwise be padded in the batch and stop alone.
    with attach(m, schedule, method=method) as h, torch.no_grad():
        batch = _generate(m, inputs, min_new_tokens=4)
        batch_stats = h.last_stats
        for b in range(inputs["input_ids"].shape[0]):
            single = _generate(m, alone(case, inputs, b), min_new_tokens=4)
            assert h.last_stats[0]["vision_per_layer"] == batch_stats[b]["vision_per_layer"]
            assert h.last_stats[0]["video_tokens"] == batch_stats[b]["video_tokens"]
            new = batch.sequences.shape[1] - inputs["input_ids"].shape[1]
            assert torch.equal(single.sequences[0, -new:], batch.sequences[b, -new:])
            for step_b, step_a in zip(batch.logits, single.logits, strict=True):
                torch.testing.assert_close(step_b[b], step_a[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llava", "qwen", "qwen3", "internvl"])
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
        assert h.last_stats[0]["vision_per_layer"][-1] == 1  # V2Drop's ':0' keeps max(1, 0) tokens


def test_detach_restores_model_exactly():
    m = tiny_llava("sdpa")
    before = {k: v.clone() for k, v in m.state_dict().items()}

    def hooks():  # transformers registers some hooks of its own; ours must all be gone
        return [(n, dict(mod._forward_pre_hooks), dict(mod._forward_hooks)) for n, mod in m.named_modules()]

    inputs = CASES[("llava", "batch1")]()
    with torch.no_grad():
        plain = m(**inputs).logits
    hooks_before = hooks()
    for method, schedule, _ in DROPPING:
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


def test_deepstack_gathered_inside_its_layers_and_removed_on_detach():
    """A stage before Qwen3-VL's last DeepStack addition wraps the decoder's _deepstack_process (the
    equivalence tests above check what it adds); one from layer k on needs none; detach restores."""
    m = tiny_qwen3_vl("sdpa")
    lm = m.model.language_model
    inputs = CASES[("qwen3", "mixed")]()
    k = len(QWEN3_DEEPSTACK)
    with torch.no_grad():
        plain = m(**inputs).logits
    for schedule, wrapped in (("1:0.5/4:0", True), (f"{k - 1}:0.3", True), (f"{k}:0.3", False)):
        with attach(m, schedule), torch.no_grad():
            assert ("_deepstack_process" in lm.__dict__) is wrapped
            m(**inputs)
        assert "_deepstack_process" not in lm.__dict__
    with torch.no_grad():
        assert torch.equal(m(**inputs).logits, plain)


def test_long_qwen3_video_row_beside_an_image_row():
    """Several thousand video tokens (16 temporal patches x 256) in a batch with an image row: the stage
    inside the DeepStack layers equals the masking reference at prefill."""
    m = model("qwen3", "sdpa")
    inputs = qwen3_inputs([[("video", 16, 32, 32)], [("image", 8, 8)]])
    with attach(m, "1:0.5/3:0") as h, torch.no_grad():
        out = m(**inputs).logits
        layouts, stats = dict(h.last_layouts), h.last_stats
    assert [s["vision_per_layer"][:4] for s in stats] == [[4096, 2048, 2048, 1], [16, 8, 8, 1]]
    layers = m.model.language_model.layers
    with masking_reference(m, layers, allowed_keys(layouts, inputs["attention_mask"], LAYERS), "sdpa"), \
            torch.no_grad():
        ref = m(**inputs).logits
    idx, valid = layouts[3]
    for b in range(2):
        torch.testing.assert_close(out[b][valid[b]], ref[b, idx[b][valid[b]]], atol=1e-4, rtol=0)


def test_deepstack_without_its_hook_is_refused_by_name(monkeypatch):
    from v2drop_eval.engine.contract import TransformersContractError

    m = tiny_qwen3_vl("sdpa")
    monkeypatch.delattr(type(m.model.language_model), "_deepstack_process")
    with pytest.raises(TransformersContractError, match=r"after decoder layers 0, 1, 2; a drop stage at layer 2 needs "
                                                        r"it \(the first drop layer that does not is 3\)"):
        attach(m, "2:0.5")
    assert not hasattr(m, "_v2drop_handle") and not m.model.language_model._forward_pre_hooks
    attach(m, "3:0.5").detach()  # from layer 3 on every DeepStack addition is in the hidden states


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
        assert h.last_stats[0]["vision_per_layer"] == [32] + [1] * (LAYERS - 1)  # as V2Drop's code: max(1, 0)
    with attach(m, "1:0", options="zero_drops_all") as h, torch.no_grad():
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
    """DART's greedy for one row with Python sets (pivots by key L1 norm, then per pivot the least
    cosine-similar image tokens), with the options ``exact_counts`` (the pivots within floor(alive x r),
    the remainder one each to the first) and ``pivots_in_order``, in float32 (``float32_scores``); each
    row of a batch as its own (the authors' code, at batch size 1: tests/test_originals.py)."""
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


@pytest.mark.parametrize("family", ["llava", "qwen", "internvl"])
def test_dart_options_keep_what_their_greedy_rule_keeps_in_every_row(family, monkeypatch):
    from v2drop_eval.engine.method import NORMED_HIDDEN, PREV_KEYS
    from v2drop_eval.methods import dart

    m = model(family, "eager")
    inputs = CASES[(family, "mixed")]()
    seen = []
    score = dart.DART.score
    monkeypatch.setattr(dart.DART, "score", lambda self, ctx: seen.append(ctx) or score(self, ctx))
    with attach(m, "2:0.5", method="dart", options="exact_counts+pivots_in_order+float32_scores") as h, \
            torch.no_grad():
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


def test_long_internvl_video_row_beside_an_image_row():
    """An InternVL video row of 2,048 vision tokens (128 frames) in one batch with a 2-tile image row:
    prefill and every decode step equal the masking reference, and the video row equals itself alone."""
    m = model("internvl", "sdpa")
    inputs = internvl_inputs([[("video", 128)], [("image", 2)]], seed=2)
    with attach(m, "1:0.5/3:0.25/5:0") as h, torch.no_grad():
        dropped = _generate(m, inputs)
        layouts, stats = dict(h.last_layouts), h.last_stats
        alone = _generate(m, row_inputs(inputs, 0, "internvl"))
        assert h.last_stats[0]["vision_per_layer"] == stats[0]["vision_per_layer"]
    assert stats[0]["vision_per_layer"] == [2048, 1024, 1024, 256, 256, 1]
    with masking_reference(m, m.model.language_model.layers, allowed_keys(layouts, inputs["attention_mask"], LAYERS),
                           "sdpa"), torch.no_grad():
        ref = _generate(m, inputs)
    assert torch.equal(dropped.sequences, ref.sequences)
    for step_d, step_r, step_a in zip(dropped.logits, ref.logits, alone.logits, strict=True):
        torch.testing.assert_close(step_d, step_r, atol=1e-4, rtol=0)
        torch.testing.assert_close(step_d[0], step_a[0], atol=1e-4, rtol=0)


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
