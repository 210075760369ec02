"""The engine's flash-attention path on CPU: 2D padding masks, None masks and batch-1 packed position ids.

``flash_emulation`` computes what flash_attention_2 computes from exactly the inputs transformers
gives it; dropping under it must match dropping under sdpa. The real kernel runs only on a GPU.
"""

import functools

import flash_emulation
import pytest
import torch
from grid import grid
from tiny import (
    internvl_inputs,
    llava_inputs,
    qwen3_inputs,
    qwen_inputs,
    tiny_internvl,
    tiny_llava,
    tiny_qwen2_vl,
    tiny_qwen3_vl,
)

from v2drop_eval import attach
from v2drop_eval.methods import METHODS, get_method

CASES = {
    "llava-batch1": (tiny_llava, lambda: llava_inputs([1])),
    "llava-mixed": (tiny_llava, lambda: llava_inputs([1, 2, 0])),
    "qwen-batch1": (tiny_qwen2_vl, lambda: qwen_inputs([[(4, 4)]])),
    "qwen-mixed": (tiny_qwen2_vl, lambda: qwen_inputs([[(4, 6), (2, 4)], [(4, 4)], []])),
    "internvl-batch1": (tiny_internvl, lambda: internvl_inputs([[("image", 2)]])),
    "internvl-mixed": (tiny_internvl, lambda: internvl_inputs([[("image", 3)], [("video", 4), ("image", 1)], []])),
    "qwen3-mixed": (tiny_qwen3_vl, lambda: qwen3_inputs([[("image", 4, 6)], [("video", 2, 4, 4)], []])),
}


def _run(model, inputs, schedule, method):
    with attach(model, schedule, method=method) as h, torch.no_grad():
        out = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        return out, gen, dict(h.last_layouts)


# Every method that drops (from the registry); single-stage ones at one stage (the last layout checked is
# then layer 2's).
# Methods that drop inside the decoder (VisionZip and encoder stages on the flash path: tests/test_prellm.py).
METHOD_SCHEDULES = {m: "2:0.5/4:0.3" if get_method(m).multi_stage else "2:0.4" for m in METHODS
                    if get_method(m).drops and not get_method(m).pre_llm}


@functools.cache
def _model(build):
    return build("sdpa")


# `make test`: every case, and every method on every family (tests/grid.py); `make test-all`: the product.
@pytest.mark.parametrize(("case", "method"), grid(
    [(case, method) for case in CASES for method in METHOD_SCHEDULES],
    {"case": lambda p: p[0], "family": lambda p: p[0].split("-")[0], "method": lambda p: p[1]},
    [("case", "case"), ("family", "method")]))
def test_flash_path_matches_sdpa(case, method):
    build, make_inputs = CASES[case]
    inputs = make_inputs()
    model = _model(build)  # one model per family, back on sdpa after each case
    schedule = METHOD_SCHEDULES[method]
    ref_out, ref_gen, ref_layouts = _run(model, inputs, schedule, method)
    model.set_attn_implementation(flash_emulation.NAME)
    try:
        out, gen, layouts = _run(model, inputs, schedule, method)
    finally:
        model.set_attn_implementation("sdpa")
    assert out.shape == ref_out.shape
    for layer, (idx, valid) in ref_layouts.items():
        assert torch.equal(layouts[layer][0][valid], idx[valid])
    valid = layouts[max(layouts)][1]
    torch.testing.assert_close(out[valid], ref_out[valid], atol=1e-4, rtol=0)
    assert torch.equal(gen.sequences, ref_gen.sequences)
    for a, b in zip(gen.logits, ref_gen.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
