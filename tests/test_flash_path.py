"""The engine's flash-attention path on CPU: 2D padding masks, None masks and batch-1 packed position ids.

``flash_emulation`` computes what flash_attention_2 computes from exactly the inputs transformers
gives it; dropping under it must match dropping under sdpa. The real kernel runs only on a GPU.
"""

import flash_emulation
import pytest
import torch
from tiny import llava_inputs, qwen_inputs, tiny_llava, tiny_qwen2_vl

from v2drop_eval import attach

CASES = {
    "llava-batch1": (tiny_llava, lambda: llava_inputs([1])),
    "llava-mixed": (tiny_llava, lambda: llava_inputs([1, 2, 0])),
    "qwen-batch1": (tiny_qwen2_vl, lambda: qwen_inputs([[(4, 4)]])),
    "qwen-mixed": (tiny_qwen2_vl, lambda: qwen_inputs([[(4, 6), (2, 4)], [(4, 4)], []])),
}


def _run(model, inputs, schedule):
    with attach(model, schedule) as h, torch.no_grad():
        out = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        return out, gen, dict(h.last_layouts)


@pytest.mark.parametrize("case", list(CASES))
def test_flash_path_matches_sdpa(case):
    build, make_inputs = CASES[case]
    inputs = make_inputs()
    model = build("sdpa")
    ref_out, ref_gen, ref_layouts = _run(model, inputs, "2:0.5/4:0.3")
    model.set_attn_implementation(flash_emulation.NAME)
    out, gen, layouts = _run(model, inputs, "2:0.5/4:0.3")
    assert out.shape == ref_out.shape
    for layer, (idx, valid) in ref_layouts.items():
        assert torch.equal(layouts[layer][0][valid], idx[valid])
    valid = layouts[4][1]
    torch.testing.assert_close(out[valid], ref_out[valid], atol=1e-4, rtol=0)
    assert torch.equal(gen.sequences, ref_gen.sequences)
    for a, b in zip(gen.logits, ref_gen.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
