"""Every unsupported case fails with a clear error instead of silent wrong output."""

import pytest
import torch
from tiny import llava_inputs, qwen_inputs, tiny_llava, tiny_qwen2_vl
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from v2drop_eval import attach
from v2drop_eval.methods import METHODS


@pytest.fixture(scope="module")
def llava():
    return tiny_llava("sdpa")


def test_unsupported_model_class():
    text_only = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, vocab_size=64))
    with pytest.raises(TypeError, match="LlamaForCausalLM is not supported; supported model classes: "
                                        "LlavaForConditionalGeneration, .*Qwen2VLForConditionalGeneration"):
        attach(text_only, "2:0.5")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "bogus"}, f"unknown method 'bogus'; allowed: {', '.join(METHODS)}"),
        ({"metric": "l3"}, "unknown metric 'l3'; allowed: l2, l1, cosine"),
    ],
)
def test_bad_method_or_metric(llava, kwargs, match):
    with pytest.raises(ValueError, match=match):
        attach(llava, "2:0.5", **kwargs)


def test_layer_past_depth(llava):
    with pytest.raises(ValueError, match=r"drop layer 6 is past the model's depth: it has 6 decoder layers"):
        attach(llava, "2:0.5/6:0")


def test_fastv_needs_one_stage(llava):
    with pytest.raises(ValueError, match="method fastv drops once"):
        attach(llava, "2:0.5/4:0", method="fastv")


def test_second_attach_refused(llava):
    with attach(llava, "2:0.5"):
        with pytest.raises(RuntimeError, match="already has a dropper attached"):
            attach(llava, "3:0.5")
    attach(llava, "3:0.5").detach()  # fine once the first is gone


def test_labels_with_dropping(llava):
    inputs = llava_inputs([1])
    with attach(llava, "2:0.5"), pytest.raises(ValueError, match="labels= with dropping is not supported"):
        llava(**inputs, labels=inputs["input_ids"])
    with attach(llava, "2:0.5", method="none"), torch.no_grad():
        assert llava(**inputs, labels=inputs["input_ids"]).loss is not None


def test_inputs_embeds_without_input_ids(llava):
    inputs = llava_inputs([0])
    embeds = llava.get_input_embeddings()(inputs["input_ids"])
    with attach(llava, "2:0.5"), pytest.raises(ValueError, match="inputs_embeds without input_ids"):
        llava(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])


def test_static_cache(llava):
    inputs = llava_inputs([1])
    with attach(llava, "2:0.5"), pytest.raises(ValueError, match="cache type StaticCache is not supported"):
        llava.generate(**inputs, max_new_tokens=2, cache_implementation="static")
    cache = StaticCache(config=llava.config, max_cache_len=128)
    with attach(llava, "2:0.5"), pytest.raises(ValueError, match="StaticCache is not supported"):
        llava(**inputs, past_key_values=cache)


def test_prefilled_cache_from_elsewhere(llava):
    inputs = llava_inputs([1])
    with torch.no_grad():
        cache = llava(**inputs, use_cache=True).past_key_values
    nxt = {"input_ids": torch.tensor([[5]]), "past_key_values": cache}
    with attach(llava, "2:0.5"), pytest.raises(ValueError, match="did not prefill"):
        llava(**nxt)


def test_chunked_vision_after_prefill():
    m = tiny_qwen2_vl("sdpa")
    inputs = qwen_inputs([[(4, 4)]])
    with attach(m, "2:0.5"), torch.no_grad():
        cache = m(**inputs, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="vision tokens after the prefill"):
            m(input_ids=inputs["input_ids"][:, :8], past_key_values=cache)


def test_flex_attention_refused():
    m = tiny_llava("sdpa")
    m.config.text_config._attn_implementation_internal = "flex_attention"
    with pytest.raises(ValueError, match="'flex_attention' is not supported"):
        attach(m, "2:0.5")


@pytest.mark.parametrize(
    "method,schedule,match",
    [
        ("dart", "2:0.5/4:0", "method dart drops once, at one layer: schedule 2:0.5/4:0 has 2 stages"),
        ("fastv", "2:0.5/4:0", "method fastv drops once"),
        ("pdrop", "2:t1:0.1:0.6", "adaptive stages need method v2drop, not 'pdrop'"),
        ("dart", "2:t1:0.1:0.6", "adaptive stages need method v2drop, not 'dart'"),
        ("pdrop", "none", "method pdrop needs a budget or a schedule that drops something"),
        ("pdrop", "2:0.5/6:0", "drop layer 6 is past the model's depth"),
    ],
)
def test_schedules_a_method_cannot_take(llava, method, schedule, match):
    with pytest.raises(ValueError, match=match):
        attach(llava, schedule, method=method)


def test_every_entry_point_refuses_with_the_same_words():
    from v2drop_eval.methods.rules import validate
    from v2drop_eval.plugin.args import pop_drop_args

    with pytest.raises(ValueError) as direct:
        validate("dart", "2:0.5/4:0")
    with pytest.raises(ValueError) as via_args:
        pop_drop_args({"method": "dart", "schedule": "2:0.5/4:0"}, "llava", object)
    assert str(direct.value) in str(via_args.value)
