"""Tokens removed before the LLM: dropping inside the vision encoder (``encoder_schedule=``) and VisionZip.

References, all built without the code under test:
- the encoder: a masking reference (nothing removed; from each encoder stage on, the dropped tokens masked
  out as keys), its features equal the dropping encoder's kept features within 1e-4;
- the whole model: the plain model run on inputs shortened by hand (placeholders of dropped tokens removed,
  the reference encoder's features in the others, positions as the mode says) equals the dropping run at
  the prefill and at every decode step (1e-4, same greedy ids);
- VisionZip: its tokens equal the authors' selection transcribed (tests/visionzip_reference.py), kept
  slots identical in float32, and the whole model equals the plain model on those tokens;
- with a decoder schedule too: the LLM masking reference (tests/reference.py) on top of the hand-built run.
"""

from __future__ import annotations

import copy
import functools

import flash_emulation
import pytest
import torch
from reference import allowed_keys, masking_reference
from tiny import (
    LAYERS,
    anyres_inputs,
    llava_inputs,
    qwen_inputs,
    row_inputs,
    tiny_internvl,
    tiny_llava,
    tiny_llava_next,
    tiny_llava_onevision,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
    tiny_qwen3_vl,
)
from transformers import AttentionInterface
from visionzip_reference import clip_attention_weights_and_metric, visionzip_reference

from v2drop_eval import attach
from v2drop_eval.methods.visionzip import visionzip_tokens

BUILDERS = {
    "llava": functools.partial(tiny_llava, vision_layers=4, feature_layer=-2),
    "next": functools.partial(tiny_llava_next, vision_layers=4),
    "qwen": functools.partial(tiny_qwen2_vl, vision_layers=4),
    "qwen25": functools.partial(tiny_qwen2_5_vl, vision_layers=4, full_attention=(1, 3)),
}
NEXT_SPEC = [[("image", (70, 30)), ("image", (30, 90))], [("image", (50, 50))], []]
CASES = {
    ("llava", "batch1"): lambda: llava_inputs([1]),
    ("llava", "mixed"): lambda: llava_inputs([2, 1, 0], text_lens=[4, 6, 3], seed=1),
    ("next", "mixed"): lambda: anyres_inputs("llava_next", NEXT_SPEC, 1),
    ("qwen", "batch1"): lambda: qwen_inputs([[(4, 6)]]),
    ("qwen", "mixed"): lambda: qwen_inputs([[(4, 6), (2, 4)], [(4, 4)], []], seed=1),
    ("qwen", "video"): lambda: qwen_inputs([[(2, 4, 4)], [(4, 6), (1, 2, 4)], [(4, 4)]], seed=2),
    ("qwen25", "mixed"): lambda: qwen_inputs([[(4, 6), (2, 4)], [(4, 4)], []], seed=1),
    ("qwen25", "video"): lambda: qwen_inputs([[(2, 4, 4)], [(4, 6), (1, 2, 4)], [(4, 4)]], seed=2),
}
# Encoder stages: LLaVA's tiny CLIP reads block 2's output (feature layer -2 of 4), Qwen's ViTs run 4 blocks
# (Qwen2.5-VL: windows in blocks 0 and 2, so a window block runs after a drop).
ENCODER = {"llava": "1:0.5/2:0.6", "next": "1:0.5/3:0.5", "qwen": "1:0.5/2:0.5", "qwen25": "1:0.6/2:0.5"}


@functools.cache
def model(family: str, attn: str = "sdpa"):
    return BUILDERS[family](attn)


def alone(case, inputs, b):
    if case[0] == "next":
        return anyres_inputs("llava_next", NEXT_SPEC, 1, only=b)
    return row_inputs(inputs, b, "llava" if case[0] == "llava" else "qwen")


def media(inputs: dict) -> dict[str, dict]:
    """The keyword arguments of ``get_image_features`` / ``get_video_features`` for ``inputs``."""
    out = {}
    if "pixel_values" in inputs:
        out["get_image_features"] = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "image_sizes")
                                     if k in inputs}
    if "pixel_values_videos" in inputs:
        out["get_video_features"] = {"pixel_values_videos": inputs["pixel_values_videos"],
                                     "video_grid_thw": inputs["video_grid_thw"]}
    return out


def _features(m, inputs) -> dict[str, torch.Tensor]:
    """Each feature method's output rows, concatenated (image rows, then video rows)."""
    with torch.no_grad():
        return {name: torch.cat(list(getattr(m.model, name)(**kw).pooler_output)) for name, kw in media(inputs).items()}


# -- the encoder's masking reference ---------------------------------------------------------------
_KEYMASK = "v2drop_test_keymask"


def _keymask_attention(module, query, key, value, attention_mask=None, scaling=None, **kwargs):
    """sdpa over one attention segment of a packed encoder, keys not allowed masked out (each row keeps
    its own diagonal). The segments of one call come in order; ``module._allowed`` covers all rows."""
    n = query.shape[2]
    start = module._offset
    module._offset = (start + n) % module._allowed.shape[0]
    keys = module._allowed[start:start + n]
    mask = keys[None, :] | torch.eye(n, dtype=torch.bool)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask[None, None], scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(_KEYMASK, _keymask_attention)


def _allowed_by_block(run, depth: int, full: int, batched: bool) -> dict[int, torch.Tensor]:
    """Per block: which original slots (batched [B, T]) or rows (packed [N]) are still keys there."""
    out, current = {}, None
    for block in range(depth):
        if block in run.kept:
            idx = run.kept[block]
            if batched:
                current = torch.zeros(idx.shape[0], full, dtype=torch.bool).scatter(1, idx, True)
            else:
                current = torch.zeros(full, dtype=torch.bool)
                current[idx] = True
        if current is not None:
            out[block] = current
    return out


def reference_features(m, inputs, runs) -> dict[str, torch.Tensor]:
    """The plain model's features with each run's dropped tokens masked out as keys from their stage on."""
    spec_blocks = (m.model.vision_tower.encoder.layers if hasattr(m.model, "vision_tower") else m.model.visual.blocks)
    batched = hasattr(m.model, "vision_tower")
    runs = list(runs)
    hooks, saved = [], []
    state: dict = {}

    def start(module, args, kwargs):
        state["run"] = runs[0]

    def block_hook(i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            run = state["run"]
            if batched:
                allowed = _allowed_by_block(run, len(spec_blocks), hidden.shape[1], True).get(i)
                if allowed is None:
                    return None
                mask = torch.zeros(allowed.shape[0], 1, hidden.shape[1], hidden.shape[1], dtype=hidden.dtype)
                mask = mask.masked_fill(~allowed[:, None, None, :], torch.finfo(hidden.dtype).min)
                mask = mask.masked_fill(torch.eye(hidden.shape[1], dtype=torch.bool)[None, None], 0.0)
                return (hidden, mask, *args[2:]), kwargs
            allowed = _allowed_by_block(run, len(spec_blocks), hidden.shape[0], False).get(i)
            attn = module.attn
            attn._allowed = allowed if allowed is not None else torch.ones(hidden.shape[0], dtype=torch.bool)
            attn._offset = 0
            return None
        return hook

    def done(module, args, output):
        runs.pop(0)

    tower = m.model.vision_tower if batched else m.model.visual
    hooks.append(tower.register_forward_pre_hook(start, with_kwargs=True))
    hooks.append(tower.register_forward_hook(done))
    for i, block in enumerate(spec_blocks):
        hooks.append(block.register_forward_pre_hook(block_hook(i), with_kwargs=True))
        if not batched:
            cfg = copy.copy(block.attn.config)
            cfg._attn_implementation_internal = _KEYMASK
            saved.append((block.attn, block.attn.config))
            block.attn.config = cfg
    try:
        return _features(m, inputs)
    finally:
        for h in hooks:
            h.remove()
        for attn, cfg in saved:
            attn.config = cfg


# -- the hand-built shortened inputs ----------------------------------------------------------------
def _image_ids(m):
    cfg = m.config
    image = getattr(cfg, "image_token_id", None) or cfg.image_token_index
    return image, getattr(cfg, "video_token_id", None)


def hand_built(m, inputs, features: dict[str, torch.Tensor], dropped_rows: dict[str, torch.Tensor], positions: str,
               for_generate: bool) -> dict:
    """The plain model's inputs with the placeholders of dropped tokens removed, by hand (one row at a
    time): ``inputs_embeds`` (text embeddings, reference features in the kept placeholders), the padding mask,
    and positions (``keep``: the full prompt's, as the model / generate numbers them, at the kept slots;
    ``renumber``: left out, so that the model numbers the shorter sequence itself)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    B, S = ids.shape
    image_id, video_id = _image_ids(m)
    with torch.no_grad():
        embeds = m.get_input_embeddings()(ids).clone()
    dropped = torch.zeros(B, S, dtype=torch.bool)
    for name, token in (("get_image_features", image_id), ("get_video_features", video_id)):
        if name in features:
            where = ids == token
            embeds[where] = features[name]
            dropped[where] = dropped_rows[name]
    if getattr(m.model, "get_rope_index", None) is not None:
        kw = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "mm_token_type_ids") if k in inputs}
        full_pos, _ = m.model.get_rope_index(ids, attention_mask=mask, **kw)  # [3, B, S]
    elif for_generate:
        full_pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 0)[None]
    else:
        full_pos = torch.arange(S).expand(B, S)[None]
    rows = [[s for s in range(S) if mask[b, s] and not dropped[b, s]] for b in range(B)]
    n = max(len(r) for r in rows)
    out_e = torch.zeros(B, n, embeds.shape[-1])
    out_m = torch.zeros(B, n, dtype=torch.long)
    out_p = torch.zeros(full_pos.shape[0], B, n, dtype=torch.long)
    for b, r in enumerate(rows):
        out_e[b, n - len(r):] = embeds[b, r]
        out_m[b, n - len(r):] = 1
        out_p[:, b, n - len(r):] = full_pos[:, b, r]
    out = {"inputs_embeds": out_e, "attention_mask": out_m}
    if positions == "keep":
        out["position_ids"] = out_p if out_p.shape[0] == 3 else out_p[0]
    elif not for_generate:
        out["position_ids"] = (out_m.cumsum(1) - 1).clamp(min=0) * out_m
    return out


def _gen(m, inputs, **kw):
    with torch.no_grad():
        return m.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                          **kw)


def _close_generations(gen, ref):
    new = len(gen.logits)  # a generation may stop early at EOS
    assert len(ref.logits) == new and torch.equal(gen.sequences[:, -new:], ref.sequences[:, -new:])
    for a, b in zip(gen.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def _check_against_hand_built(m, inputs, positions, method="none", schedule="", encoder_schedule=None):
    """The dropping run equals the plain model on hand-built shortened inputs (prefill and decode)."""
    with attach(m, schedule, method=method, encoder_schedule=encoder_schedule, positions=positions) as h, \
            torch.no_grad():
        out = m(**inputs).logits
        runs = h.last_encoder_runs
        layouts = dict(h.last_layouts)
        dropping = _features(m, inputs)
        gen = _gen(m, inputs)
        gen_layouts = dict(h.last_layouts)
    dropped = {name: torch.isnan(f).any(-1) for name, f in dropping.items()}
    if encoder_schedule is not None:
        ref_feats = reference_features(m, inputs, runs)
        for name, f in dropping.items():
            keep = ~dropped[name]
            torch.testing.assert_close(f[keep], ref_feats[name][keep], atol=1e-4, rtol=0)
    else:
        ref_feats = dropping
    ref_in = hand_built(m, inputs, ref_feats, dropped, positions, for_generate=False)
    ref_gen_in = hand_built(m, inputs, ref_feats, dropped, positions, for_generate=True)
    layers = m.model.language_model.layers
    impl = m.config.text_config._attn_implementation
    with torch.no_grad(), masking_reference(m, layers, allowed_keys(layouts, ref_in["attention_mask"], LAYERS), impl):
        ref_out = m(**ref_in).logits
    with torch.no_grad(), masking_reference(m, layers, allowed_keys(gen_layouts, ref_gen_in["attention_mask"], LAYERS),
                                            impl):
        ref_gen = _gen(m, ref_gen_in)
    if layouts:  # the decoder's own stages: every real slot of the last layout against its slot
        idx, valid = layouts[max(layouts)]
        ref_out = ref_out.gather(1, idx[..., None].expand(-1, -1, ref_out.shape[-1]))
    else:
        valid = ref_in["attention_mask"].bool()
    assert out.shape == ref_out.shape
    torch.testing.assert_close(out[valid], ref_out[valid], atol=1e-4, rtol=0)
    _close_generations(gen, ref_gen)
    return dropped


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", list(CASES), ids="-".join)
def test_encoder_dropping_equals_references(case, attn):
    family = case[0]
    m = model(family, attn)
    inputs = CASES[case]()
    dropped = _check_against_hand_built(m, inputs, "keep", encoder_schedule=ENCODER[family])
    assert all(d.any() for d in dropped.values())


@pytest.mark.parametrize("case", [("llava", "mixed"), ("next", "mixed")], ids="-".join)
def test_encoder_dropping_renumbered(case):
    _check_against_hand_built(model(case[0]), CASES[case](), "renumber", encoder_schedule=ENCODER[case[0]])


@pytest.mark.parametrize("case", [("llava", "mixed"), ("qwen", "video"), ("qwen25", "mixed")], ids="-".join)
def test_encoder_and_decoder_schedules_together(case):
    family = case[0]
    _check_against_hand_built(model(family), CASES[case](), "keep", method="v2drop", schedule="2:0.5/4:0.3",
                              encoder_schedule=ENCODER[family])


@pytest.mark.parametrize("case", [("llava", "mixed"), ("qwen", "video"), ("qwen25", "mixed"), ("next", "mixed")],
                         ids="-".join)
@pytest.mark.parametrize(("method", "schedule"), [("none", ""), ("v2drop", "2:0.5/4:0.3")])
def test_rows_equal_rows_alone(case, method, schedule):
    m = model(case[0])
    inputs = CASES[case]()
    with attach(m, schedule, method=method, encoder_schedule=ENCODER[case[0]]) as h:
        batch = _gen(m, inputs)
        stats = h.last_stats
        for b in range(inputs["input_ids"].shape[0]):
            one = _gen(m, alone(case, inputs, b))
            assert torch.equal(batch.sequences[b, -4:], one.sequences[0, -4:])
            for step_b, step_1 in zip(batch.logits, one.logits, strict=True):
                torch.testing.assert_close(step_b[b], step_1[0], atol=1e-4, rtol=0)
            assert h.last_stats[0]["vision_per_layer"] == stats[b]["vision_per_layer"]
            assert h.last_stats[0]["vision_flops"] == stats[b]["vision_flops"]
            assert h.last_stats[0]["encoder_tokens_per_layer"] == stats[b]["encoder_tokens_per_layer"]


@pytest.mark.parametrize("case", [("llava", "mixed"), ("qwen", "video"), ("qwen25", "mixed"), ("next", "mixed")],
                         ids="-".join)
def test_encoder_keep_all_is_bit_identical(case):
    m = model(case[0])
    inputs = CASES[case]()
    with torch.no_grad():
        plain = m(**inputs).logits
        plain_gen = _gen(m, inputs)
        with attach(m, "", method="none", encoder_schedule="1:1.0/2:1.0") as h:
            assert torch.equal(m(**inputs).logits, plain)
            gen = _gen(m, inputs)
            assert h.last_kept_slots is None
    assert torch.equal(gen.sequences, plain_gen.sequences)
    assert all(torch.equal(a, b) for a, b in zip(gen.logits, plain_gen.logits, strict=True))


@pytest.mark.parametrize("case", [("llava", "batch1"), ("llava", "mixed"), ("qwen", "batch1"), ("qwen", "mixed"),
                                  ("qwen25", "video")], ids="-".join)
def test_flash_emulation_matches_sdpa(case):
    family = case[0]
    inputs = CASES[case]()
    m = BUILDERS[family]("sdpa")
    runs = {}
    for attn in ("sdpa", flash_emulation.NAME):
        m.set_attn_implementation(attn)
        with attach(m, "2:0.5", method="v2drop", encoder_schedule=ENCODER[family]) as h, torch.no_grad():
            out = m(**inputs).logits
            runs[attn] = (out, h.last_kept_slots, h.last_layouts[2], _gen(m, inputs))
    (out, kept, (idx, valid), gen), (ref_out, ref_kept, (ref_idx, _), ref_gen) = runs[flash_emulation.NAME], runs["sdpa"]
    assert torch.equal(kept[0][kept[1]], ref_kept[0][ref_kept[1]])
    assert torch.equal(idx[valid], ref_idx[valid])
    torch.testing.assert_close(out[valid], ref_out[valid], atol=1e-4, rtol=0)
    _close_generations(gen, ref_gen)


# -- VisionZip ------------------------------------------------------------------------------------------
def _reference_zip_tokens(m, pixel_values, dominant, contextual):
    """The authors' selection on the plain tower: hidden states of the feature layer, [CLS] attention and keys
    of the block that produced them, computed as their CLIPAttention_forward does."""
    tower = m.model.vision_tower
    block = m.config.vision_feature_layer % (len(tower.encoder.layers) + 1) - 1
    seen = {}
    layer = tower.encoder.layers[block]
    def keep_input(module, args, kwargs):
        seen["h"] = kwargs["hidden_states"]

    hook = layer.self_attn.register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        with torch.no_grad():
            out = tower(pixel_values, output_hidden_states=True)
    finally:
        hook.remove()
    hidden = out.hidden_states[m.config.vision_feature_layer]
    with torch.no_grad():
        weights, metric = clip_attention_weights_and_metric(layer.self_attn, seen["h"])
    return visionzip_reference(weights, hidden, metric, dominant - 1, contextual), (weights, hidden, metric)


@pytest.mark.parametrize(("dominant", "contextual"), [(6, 2), (3, 4), (10, 1), (1, 3)])
def test_visionzip_tokens_equal_the_authors_selection(dominant, contextual):
    m = model("llava")
    pixels = llava_inputs([2, 1], seed=3)["pixel_values"]
    (ref_tokens, ref_indices), (weights, hidden, metric) = _reference_zip_tokens(m, pixels, dominant, contextual)
    cls_attention = weights[:, :, 0, 1:].sum(dim=1)
    tokens = visionzip_tokens(hidden, cls_attention, metric, dominant, contextual)
    assert torch.equal(tokens, ref_tokens)  # float32, same operations: identical
    # and through the engine's own tap at the block (sdpa kernel): same kept slots, same tokens
    with attach(m, f"0:{dominant}+{contextual}", method="visionzip") as h, torch.no_grad():
        out = m.model.vision_tower(pixels, output_hidden_states=True)
        del h
    feature = out.hidden_states[m.config.vision_feature_layer]
    k = dominant + contextual
    torch.testing.assert_close(feature[:, 1:1 + k], ref_tokens, atol=1e-6, rtol=0)
    assert torch.isnan(feature[:, 1 + k:]).all()
    assert ref_indices.shape[1] == dominant


@pytest.mark.parametrize("positions", ["renumber", "keep"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", [("llava", "batch1"), ("llava", "mixed")], ids="-".join)
def test_visionzip_equals_plain_model_on_its_tokens(case, attn, positions):
    m = model("llava", attn)
    inputs = CASES[case]()
    dominant, contextual = 5, 3
    (ref_tokens, _), _ = _reference_zip_tokens(m, inputs["pixel_values"], dominant, contextual)
    with torch.no_grad():
        ref_feats = m.model.multi_modal_projector(ref_tokens)  # [images, D + C, D_text]
    # the authors' layout: each image's D + C tokens in place of its first D + C placeholders
    per = m.model.vision_tower.config.image_size // m.model.vision_tower.config.patch_size
    full = torch.full((ref_feats.shape[0], per * per, ref_feats.shape[-1]), float("nan"))
    full[:, :dominant + contextual] = ref_feats
    feats = {"get_image_features": full.flatten(0, 1)}
    dropped = {"get_image_features": torch.isnan(feats["get_image_features"]).any(-1)}
    with attach(m, f"0:{dominant}+{contextual}", method="visionzip", positions=positions) as h, torch.no_grad():
        out = m(**inputs).logits
        stats = h.last_stats
        gen = _gen(m, inputs)
    ref_in = hand_built(m, inputs, {k: v.nan_to_num() for k, v in feats.items()}, dropped, positions, for_generate=False)
    with torch.no_grad():
        ref_out = m(**ref_in).logits
    valid = ref_in["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref_out[valid], atol=1e-4, rtol=0)
    ref_gen = _gen(m, hand_built(m, inputs, {k: v.nan_to_num() for k, v in feats.items()}, dropped, positions,
                                 for_generate=True))
    _close_generations(gen, ref_gen)
    images = [2, 1, 0] if case[1] == "mixed" else [1]
    assert [s["llm_vision_tokens"] for s in stats] == [k * (dominant + contextual) for k in images]
    assert [s["vision_tokens"] for s in stats] == [k * per * per for k in images]


def test_visionzip_rows_equal_rows_alone():
    m = model("llava")
    case = ("llava", "mixed")
    inputs = CASES[case]()
    with attach(m, "0:4+2", method="visionzip"):
        batch = _gen(m, inputs)
        for b in range(3):
            one = _gen(m, alone(case, inputs, b))
            assert torch.equal(batch.sequences[b, -4:], one.sequences[0, -4:])
            for step_b, step_1 in zip(batch.logits, one.logits, strict=True):
                torch.testing.assert_close(step_b[b], step_1[0], atol=1e-4, rtol=0)


# -- refusals ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("build", "kwargs", "match"), [
    (tiny_qwen2_vl, dict(schedule="0:4+2", method="visionzip"), "no \\[CLS\\] token"),
    (tiny_llava_next, dict(schedule="0:4+2", method="visionzip"), "any-resolution layout"),
    (tiny_llava_onevision, dict(schedule="", method="none", encoder_schedule="1:0.5"), "interpolates and pools"),
    (tiny_internvl, dict(schedule="", method="none", encoder_schedule="1:0.5"), "pixel shuffle"),
    (tiny_qwen3_vl, dict(schedule="", method="none", encoder_schedule="1:0.5"), "DeepStack"),
    (tiny_llava, dict(schedule="", method="none", encoder_schedule="2:0.5"), "blocks 1..1"),
    (tiny_qwen2_vl, dict(schedule="", method="none", encoder_schedule="1:0.5", positions="renumber"), "M-RoPE"),
    (tiny_llava, dict(schedule="0:4+2", method="visionzip", encoder_schedule="1:0.5"), "does not combine"),
    (tiny_llava, dict(schedule="", method="none", encoder_schedule="1:t1:0.1:0.5"), "adaptive"),
    (tiny_llava, dict(schedule="0:12+6", method="visionzip"), "16 patches per crop"),
    (tiny_llava, dict(schedule="2:0.5", method="v2drop", positions="sideways"), "allowed: keep, renumber"),
])
def test_refusals(build, kwargs, match):
    m = build()
    schedule = kwargs.pop("schedule")
    with pytest.raises(ValueError, match=match):
        attach(m, schedule, **kwargs)
    assert getattr(m, "_v2drop_handle", None) is None


def test_stats_count_what_reaches_the_llm():
    m = model("qwen")
    inputs = CASES[("qwen", "mixed")]()
    with attach(m, "2:0.5", method="v2drop", encoder_schedule="1:0.5") as h, torch.no_grad():
        m(**inputs)
        stats = h.last_stats
    # row 0: images of 6 and 2 merged tokens, each keeping half of its merge groups
    assert stats[0]["vision_tokens"] == 8 and stats[0]["llm_vision_tokens"] == 4
    assert stats[0]["vision_per_layer"][:2] == [4, 4] and stats[0]["vision_per_layer"][2] == 2
    assert stats[0]["encoder_tokens_per_layer"] == [32, 16, 16, 16]  # 24 + 8 patches, halved before block 1
    assert stats[2]["encoder_tokens_per_layer"] == [0, 0, 0, 0] and stats[2]["vision_flops"] == 0
    assert stats[1]["vision_flops"] > 0 and stats[0]["vision_ms"] > 0
