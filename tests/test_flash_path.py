"""The engine's flash-attention path on CPU: 2D padding masks, None masks and batch-1 packed position ids.

``flash_emulation`` computes what flash_attention_2 computes from exactly the inputs transformers
gives it; dropping under it must match dropping under sdpa. The real kernel runs only on a GPU.
"""

import flash_emulation
import pytest
import torch
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


# Every method that drops; single-stage ones at one stage (the last layout checked is then layer 2's).
METHOD_SCHEDULES = {"v2drop": "2:0.5/4:0.3", "random": "2:0.5/4:0.3", "fastv": "2:0.4", "fastv_attn": "2:0.4",
                    "pdrop": "2:0.5/4:0.3", "dart": "2:0.4", "sparsevlm": "2:0.5/4:0.3"}


def test_every_dropping_method_is_tested():
    from v2drop_eval.methods import METHODS, get_method

    assert {m for m in METHODS if get_method(m).drops} == set(METHOD_SCHEDULES)


@pytest.mark.parametrize("method", list(METHOD_SCHEDULES))
@pytest.mark.parametrize("case", list(CASES))
def test_flash_path_matches_sdpa(case, method):
    build, make_inputs = CASES[case]
    inputs = make_inputs()
    model = build("sdpa")
    schedule = METHOD_SCHEDULES[method]
    ref_out, ref_gen, ref_layouts = _run(model, inputs, schedule, method)
    model.set_attn_implementation(flash_emulation.NAME)
    out, gen, layouts = _run(model, inputs, schedule, method)
    assert out.shape == ref_out.shape
    for layer, (idx, valid) in ref_layouts.items():
        assert torch.equal(layouts[layer][0][valid], idx[valid])
    valid = layouts[max(layouts)][1]
    torch.testing.assert_close(out[valid], ref_out[valid], atol=1e-4, rtol=0)
    assert torch.equal(gen.sequences, ref_gen.sequences)
    for a, b in zip(gen.logits, ref_gen.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
