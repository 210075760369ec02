"""Each method keeps what its authors' code keeps: the transcribed originals (tests/originals) against the
engine, stage by stage on tiny LLaVA, Qwen2-VL and Qwen2.5-VL (tests/agreement.py), and the originals'
count formulas against every preset."""

from __future__ import annotations

import functools
from fractions import Fraction

import pytest
import torch
from agreement import FAMILIES, stages
from originals.dart import get_retained_image_token_llava, get_retained_image_token_qwen2_vl
from originals.fastv import fastv_stage
from originals.pdrop import pdrop_counts, pdrop_decode_shift, pdrop_position_ids
from originals.v2drop import v2drop_stage
from tiny import LAYERS, llava_inputs, tiny_llava

from v2drop_eval import DropSchedule, attach
from v2drop_eval.engine.families import PRESET_SHAPES
from v2drop_eval.methods import REGISTRY
from v2drop_eval.methods.dart import DART

# One schedule per method that exercises its count rule: V2Drop's ':0' stage keeps one token; 64 x 0.31 =
# 19.84, which FastV rounds to 20; three PyramidDrop stages (cumulative counts 32, 8, 4; renumbered
# positions from the second on, which on the Qwen grids close the rows and columns that empty); DART's
# 4 + 8 x int(64 x 0.4 / 8) = 28.
SCHEDULES = {"v2drop": "2:0.5/4:0.3/5:0", "fastv": "2:0.31", "fastv_attn": "2:0.31", "pdrop": "2:0.5/3:0.25/4:0.5",
             "dart": "2:0.4"}


@functools.cache
def _stages(family: str, method: str, seed: int, dtype: torch.dtype):
    return stages(family, method, SCHEDULES[method], seed=seed, dtype=dtype)


@pytest.mark.parametrize("method", list(SCHEDULES))
@pytest.mark.parametrize("family", FAMILIES)
def test_float32_kept_sets_equal_the_originals(family, method):
    result = _stages(family, method, 0, torch.float32)
    assert len(result) == len(DropSchedule.parse(SCHEDULES[method]).stages)
    for stage in result:
        assert stage.engine == stage.original, f"layer {stage.layer}"


# Half precision: ties at the cut are broken either way (torch.topk's order differs on CPU and CUDA). One
# family and dtype per method here; every combination on more seeds in the slow test below.
HALF = [("v2drop", "llava", torch.bfloat16), ("fastv", "qwen2_vl", torch.bfloat16),
        ("fastv_attn", "qwen2_5_vl", torch.float16), ("pdrop", "qwen2_vl", torch.float16),
        ("dart", "llava", torch.float16)]


@pytest.mark.parametrize(("method", "family", "dtype"), HALF, ids=lambda x: str(x).replace("torch.", ""))
def test_half_precision_kept_sets_are_valid_top_k_under_the_originals_scores(method, family, dtype):
    for stage in _stages(family, method, 0, dtype):
        assert stage.engine == stage.tie_aware, f"layer {stage.layer}: not a top-k under the original's scores"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", list(SCHEDULES))
@pytest.mark.parametrize("family", FAMILIES)
def test_kept_sets_on_more_seeds_and_dtypes(family, method, dtype, seed):
    for stage in _stages(family, method, seed, dtype):
        if dtype == torch.float32:
            assert stage.engine == stage.original, f"layer {stage.layer}"
        assert stage.engine == stage.tie_aware, f"layer {stage.layer}"


# -- counts ----------------------------------------------------------------------------------------
def _original_counts(method: str, schedule: DropSchedule, n0: int) -> list[int]:
    """What the authors' code keeps at each stage of ``schedule`` from ``n0`` vision tokens, by running
    its own lines (on stand-in tensors where it needs some)."""
    gen = torch.Generator().manual_seed(0)
    counts, alive, share = [], n0, Fraction(1)
    ratio_list = [1.0]
    for _, ratio in schedule.stages:
        reduction = float(1 - Fraction(repr(ratio)))
        if method in ("v2drop", "random"):
            hidden = torch.randn(1, n0 + 8, 4, generator=gen)
            alive = len(v2drop_stage(hidden, torch.zeros_like(hidden), 2, alive, ratio)[0])
        elif method in ("fastv", "fastv_attn"):
            weights = torch.rand(1, 1, n0 + 8, n0 + 8, generator=gen)
            alive = len(fastv_stage(weights, 2, alive, reduction)[0])
        elif method == "pdrop":
            share *= Fraction(repr(ratio))
            ratio_list.append(float(share))
            image_tokens, alive = pdrop_counts(n0, ratio_list, len(ratio_list) - 2)
        elif method == "dart":
            state, keys = torch.randn(1, n0 + 8, 16, generator=gen), torch.randn(1, 2, n0 + 8, 8, generator=gen)
            original = get_retained_image_token_qwen2_vl(state, keys, 2, alive, reduction)
            llava = get_retained_image_token_llava(state, keys, 2, alive, None, reduction)
            assert len(original) == len(llava)  # the two files' shares are the same number
            alive = len(original)
        elif method == "sparsevlm":
            # Its count is a share of the alive tokens (the presets keep the original's absolute counts at 576:
            # tests/test_sparsevlm.py), capped as attn_postprocess_topk caps it; the recycled tokens are
            # sparse_layer's: int(int(d x 0.3) + 1) / 10) + 1 of the d dropped, counted as image tokens.
            keep = min(int(alive * Fraction(repr(ratio))), alive - 1)
            merge_token_num_stage1 = int((alive - keep) * 0.3) + 1
            alive = keep + int(merge_token_num_stage1 / 10) + 1
        counts.append(alive)
    return counts


# Decoder stages only: a pre-LLM method's D + C per crop is checked against its own transcription
# (tests/test_prellm.py, tests/visionzip_reference.py).
PRESETS = [(family, method, budget) for method, spec in REGISTRY.items() if spec.drops and not spec.pre_llm
           for family, table in spec.presets.items() for budget in table]


@pytest.mark.parametrize(("family", "method", "budget"), PRESETS, ids=lambda x: str(x))
def test_counts_on_every_preset_are_the_originals(family, method, budget):
    """The engine's count (``Method.stage_keep``, also what presets and budget fitting average) equals
    the original's at every stage of every preset, at the preset's 576 tokens and at other counts."""
    schedule = DropSchedule.preset(family, budget, method=method)
    layers = PRESET_SHAPES[family][1]
    for n0 in (576, 137):
        per_layer = schedule.tokens_per_layer(n0, layers, method)
        assert [per_layer[layer] for layer in schedule.layers] == _original_counts(method, schedule, n0), n0


def test_dart_paper_presets_keep_the_references_counts():
    """LLaVA: max_num_trunction=128 -> 4 + 8 x 16 = 132 of 576; Qwen2-VL: reduction_ratio 0.778 -> 124."""
    assert DropSchedule.preset("llava", "paper", method="dart").tokens_per_layer(576, 32, "dart")[2] == 132
    state, keys = torch.randn(1, 584, 16), torch.randn(1, 2, 584, 8)
    assert len(get_retained_image_token_llava(state, keys, 2, 576, 128, 0.778)) == 132
    assert DropSchedule.preset("qwen2_vl", "paper", method="dart").tokens_per_layer(576, 28, "dart")[2] == 124


def test_exact_counts_option_floors_every_method():
    for method in ("v2drop", "random", "fastv", "fastv_attn", "pdrop", "dart"):
        schedule = "2:0.31/4:0" if REGISTRY[method].multi_stage else "2:0.31"
        counts = DropSchedule.parse(schedule).tokens_per_layer(64, LAYERS, method, options=["exact_counts"])
        assert counts[2] == 19 and (counts[4] == 0 if REGISTRY[method].multi_stage else True), method


def test_dart_visits_pivots_in_python_set_order_unless_told():
    pivots, row_pos = [40, 9, 33, 12, 50, 51, 60, 58], list(range(64))
    assert DART._visiting_order(pivots, row_pos, frozenset()) == list(set(pivots))
    assert DART._visiting_order(pivots, row_pos, frozenset({"pivots_in_order"})) == sorted(pivots)
    assert list(set(pivots)) != sorted(pivots)  # the case where the order matters


# -- PyramidDrop's positions -------------------------------------------------------------------------
def test_pdrop_positions_are_pyramiddrops_at_prefill_and_decode():
    """At batch size 1 the kept tokens of each stage are numbered arange(cur_len) and decode positions
    move down by the tokens dropped, as pdrop_rank_drop and pdrop_forward do; ``positions=keep`` keeps
    the gathered positions."""
    model = tiny_llava("sdpa", image_size=64)
    inputs = llava_inputs([1], image_size=64)
    S = inputs["input_ids"].shape[1]
    seen: list[torch.Tensor] = []
    rotary = model.model.language_model.rotary_emb
    hook = rotary.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("position_ids", a[-1])), with_kwargs=True)
    try:
        with attach(model, "2:0.5/4:0.5", method="pdrop") as h, torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
            layouts = dict(h.last_layouts)
        n0 = 64
        ratio_list = [1.0, 0.5, 0.25]
        lengths = [S - n0 + pdrop_counts(n0, ratio_list, s)[1] for s in (0, 1)]
        assert [layouts[layer][0].shape[1] for layer in (2, 4)] == lengths
        # prefill: the model's ids, then one renumbered call per stage; each decode step likewise
        prefill = [ids for ids in seen if ids.shape[-1] > 1]
        assert torch.equal(prefill[0], torch.arange(S)[None])
        assert [p.tolist() for p in prefill[1:]] == [pdrop_position_ids(n)[None].tolist() for n in lengths]
        steps = [ids for ids in seen if ids.shape[-1] == 1]
        for t in range(0, len(steps), 3):
            true, stage1, stage2 = steps[t:t + 3]
            assert int(stage1) == int(pdrop_decode_shift(n0, ratio_list, 0, true))
            assert int(stage2) == int(pdrop_decode_shift(n0, ratio_list, 1, stage1))
        seen.clear()
        with attach(model, "2:0.5/4:0.5", method="pdrop", positions="keep"), torch.no_grad():
            model(**inputs)
        assert len(seen) == 1  # the model's own call only: positions are gathered, not renumbered
    finally:
        hook.remove()


def test_pdrop_renumbers_m_rope_grids_by_the_values_that_empty():
    """Qwen2-VL: the engine's ids at each stage are the model's, gathered at the kept tokens, with every
    value no kept token holds any more taken out (tests/reference.py computes that one value at a time);
    at 8 of 64 tokens some grid rows and columns empty, so positions do move."""
    from reference import closed_values, renumbered
    from tiny import qwen_inputs, tiny_qwen2_vl

    model = tiny_qwen2_vl("sdpa")
    inputs = qwen_inputs([[(16, 16)]])
    seen: list[torch.Tensor] = []
    rotary = model.model.language_model.rotary_emb
    hook = rotary.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("position_ids", a[-1])), with_kwargs=True)
    try:
        with attach(model, "2:0.5/3:0.25/4:0.5", method="pdrop") as h, torch.no_grad():
            model(**inputs)
            layouts = dict(h.last_layouts)
    finally:
        hook.remove()
    ids0, real = seen[0], torch.ones(1, inputs["input_ids"].shape[1], dtype=torch.bool)
    moved = False
    for ids, layer in zip(seen[1:], (2, 3, 4), strict=True):
        idx = layouts[layer][0][0]
        kept = torch.zeros_like(real)
        kept[0, idx] = True
        expected = renumbered(ids0[:, :, idx], closed_values(ids0, real, kept))
        assert torch.equal(ids, expected), layer
        moved |= not torch.equal(ids, ids0[:, :, idx])
    assert moved
