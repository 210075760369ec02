"""The analytic FLOPs formula against torch's FlopCounterMode, and the papers' 3.82e12."""

import pytest
import torch
from tiny import LAYERS, llava_inputs, qwen_inputs, tiny_llava, tiny_qwen2_5_vl, tiny_qwen2_vl
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


def _module_flops(model, inputs, names: tuple[str, ...]) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**inputs)
    counts = counter.get_flop_counts()
    top = type(model).__name__
    return sum(sum(counts[f"{top}.{name}"].values()) for name in names if f"{top}.{name}" in counts)


@pytest.mark.parametrize(("build", "make_inputs", "encoder_schedule", "names"), [
    (lambda: tiny_llava("eager", vision_layers=4, feature_layer=-2), lambda: llava_inputs([2, 1, 0], seed=1), None,
     ("model.vision_tower", "model.multi_modal_projector")),
    (lambda: tiny_llava("eager", vision_layers=4, feature_layer=-2), lambda: llava_inputs([2, 1, 0], seed=1),
     "1:0.5/2:0.5", ("model.vision_tower", "model.multi_modal_projector")),
    (lambda: tiny_qwen2_vl("eager", vision_layers=4), lambda: qwen_inputs([[(4, 6), (2, 4)], [(2, 4, 4)]]),
     "1:0.5/3:0.5", ("model.visual",)),
    (lambda: tiny_qwen2_5_vl("eager", vision_layers=4, full_attention=(1, 3)),
     lambda: qwen_inputs([[(4, 6), (2, 4)], [(2, 4, 4)]]), "2:0.5", ("model.visual",)),
], ids=["clip", "clip-dropping", "qwen2-vl-dropping", "qwen2.5-vl-windows-dropping"])
def test_vision_formula_equals_flop_counter_under_eager(build, make_inputs, encoder_schedule, names):
    """The vision encoder's FLOPs as the side-car counts them (summed over the batch's rows) equal what
    FlopCounterMode counts in the encoder (and LLaVA's projector), dropped tokens and attention segments included."""
    model = build()
    inputs = make_inputs()
    with attach(model, "", method="none", encoder_schedule=encoder_schedule) as h:
        measured = _module_flops(model, inputs, names)
        stats = h.last_stats
    assert measured > 0
    assert sum(s["vision_flops"] for s in stats) == measured
    if encoder_schedule is not None:
        tokens = stats[0]["encoder_tokens_per_layer"]
        assert tokens[-1] < tokens[0]


def test_vision_formula_clip_vit_l_336():
    """CLIP-ViT-L/14 at 336 px (LLaVA-1.5's encoder): about 191 GMACs for its 24 blocks on 577 tokens
    (timm lists 190.7 GMACs for vit_large_patch14_clip_336)."""
    from transformers import CLIPVisionConfig

    cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=336, patch_size=14)
    blocks = sum(flops.vision_block_macs("clip", cfg, 577, 577 * 577) for _ in range(24))
    assert blocks == pytest.approx(190.7e9, rel=5e-3)
