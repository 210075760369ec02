"""The analytic FLOPs formula against torch's FlopCounterMode, and the papers' 3.82e12."""

import pytest
import torch
from tiny import LAYERS, llava_inputs, tiny_llava
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig

from v2drop_eval import attach, flops


def test_paper_convention_llava_7b():
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    assert flops.paper_macs(cfg, [576] * 32) == pytest.approx(3.82e12, rel=1e-3)
    assert flops.prefill_flops(cfg, [576] * 32) == 2 * flops.paper_macs(cfg, [576] * 32)


def _decoder_flops(model, inputs) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**inputs)
    counts = counter.get_flop_counts()
    return sum(
        sum(ops.values())
        for name, ops in counts.items()
        if name.rsplit(".", 1)[0].endswith("language_model.layers") and name.rsplit(".", 1)[1].isdigit()
    )


@pytest.mark.parametrize("schedule", ["none", "2:0.5/4:0.25", "1:0"])
def test_formula_equals_flop_counter_under_eager(schedule):
    model = tiny_llava("eager")  # GQA: 4 heads, 2 kv heads
    inputs = llava_inputs([2])
    with attach(model, schedule, method="none" if schedule == "none" else "v2drop") as h:
        measured = _decoder_flops(model, inputs)
        tokens = h.last_stats[0]["tokens_per_layer"]
    assert len(tokens) == LAYERS
    if schedule != "none":
        assert tokens[-1] < tokens[0]
    assert flops.prefill_flops(model.config.text_config, tokens) == measured
