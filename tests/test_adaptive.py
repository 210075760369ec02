"""Adaptive stages: per-image counts from variation vs the row's own text tokens, clamped."""

import pytest
import torch
from reference import allowed_keys, masking_reference
from tiny import LAYERS, llava_inputs, qwen_inputs, row_inputs, tiny_llava, tiny_qwen2_vl

from v2drop_eval import DropSchedule, attach
from v2drop_eval.engine.schedule import Adaptive


@pytest.fixture(scope="module")
def llava():
    return tiny_llava("sdpa")


def test_loosest_setting_is_bit_identical(llava):
    inputs = llava_inputs([2, 1, 0])
    with torch.no_grad():
        plain = llava(**inputs).logits
        gen = llava.generate(**inputs, max_new_tokens=4, do_sample=False)
        with attach(llava, "2:t0:0:1/4:t0:0:1"):
            assert torch.equal(llava(**inputs).logits, plain)
            assert torch.equal(llava.generate(**inputs, max_new_tokens=4, do_sample=False), gen)


@pytest.mark.parametrize(
    "stage,expected",
    [("t0:0.25:0.5", 16), ("t100:0.25:0.5", 8), ("t1:0.5:0.5", 16), ("t100:0:0.5", 0)],
)
def test_clamping_bounds(llava, stage, expected):
    inputs = llava_inputs([2])  # 32 vision tokens
    with attach(llava, f"2:{stage}") as h, torch.no_grad():
        llava(**inputs)
    assert h.last_stats[0]["vision_per_layer"][2] == expected


def test_counts_follow_threshold_and_stay_in_bounds(llava):
    inputs = llava_inputs([2, 2, 1], seed=3)
    counts = []
    for t in (0.5, 1.0, 2.0, 4.0):
        with attach(llava, f"2:t{t}:0.1:0.9") as h, torch.no_grad():
            llava(**inputs)
        kept = [s["vision_per_layer"][2] for s in h.last_stats]
        found = [s["vision_tokens"] for s in h.last_stats]
        assert all(int(f * 0.1) <= k <= int(f * 0.9) for k, f in zip(kept, found, strict=True))
        counts.append(sum(kept))
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_rows_with_different_counts_equal_rows_alone(family):
    m = tiny_llava("eager") if family == "llava" else tiny_qwen2_vl("eager")
    inputs = llava_inputs([2, 1, 0], seed=2) if family == "llava" else qwen_inputs([[(4, 6), (2, 4)], [(4, 4)], []])
    schedule = "1:t1.0:0.1:0.9/3:t1.2:0.2:0.8"
    with attach(m, schedule) as h, torch.no_grad():
        batch = m.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
        stats, layouts = h.last_stats, dict(h.last_layouts)
        for b in range(inputs["input_ids"].shape[0]):
            alone = m.generate(**row_inputs(inputs, b, family), max_new_tokens=4, do_sample=False,
                               output_logits=True, return_dict_in_generate=True)
            assert h.last_stats[0]["vision_per_layer"] == stats[b]["vision_per_layer"]
            assert torch.equal(alone.sequences[0, -4:], batch.sequences[b, -4:])
            for sb, sa in zip(batch.logits, alone.logits, strict=True):
                torch.testing.assert_close(sb[b], sa[0], atol=1e-4, rtol=0)
    kept = [s["vision_per_layer"][1] for s in stats[:2]]
    found = [s["vision_tokens"] for s in stats[:2]]
    assert [k / f for k, f in zip(kept, found, strict=True)][0] != pytest.approx(kept[1] / found[1])
    allowed = allowed_keys(layouts, inputs["attention_mask"], LAYERS)
    with masking_reference(m, m.model.language_model.layers, allowed, "eager"), torch.no_grad():
        ref = m.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(ref.sequences, batch.sequences)


def test_adaptive_schedule_api_and_errors(llava):
    s = DropSchedule.adaptive(1.0, 0.1, 0.6, layers=(2, 4), final=None)
    assert str(s) == "2:t1:0.1:0.6/4:t1:0.1:0.6" and s.is_adaptive and DropSchedule.parse(str(s)) == s
    assert s.bounds_per_layer(100, LAYERS) == ([100, 100, 10, 10, 1, 1], [100, 100, 60, 60, 36, 36])
    with pytest.raises(ValueError, match="is adaptive: its counts depend on each image"):
        s.tokens_per_layer(100, LAYERS)
    with pytest.raises(ValueError, match="min keep ratio 0.7 is greater than max 0.6"):
        Adaptive(1.0, 0.7, 0.6)
    with pytest.raises(ValueError, match=r"threshold -0.5 is not allowed: it must be in \[0, 100\]"):
        DropSchedule.parse("2:t-0.5:0.1:0.6")
    with pytest.raises(ValueError, match="need method v2drop, not 'random'"):
        attach(llava, "2:t1:0.1:0.6", method="random")
