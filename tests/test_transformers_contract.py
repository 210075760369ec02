"""The engine's contract with transformers: the internals it relies on, checked on the plain models,
and the named error a broken one gives (docs/design.md §3, "The transformers contract").

When a transformers release breaks one of these, this module says which assumption moved.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import torch
import transformers
from packaging.specifiers import SpecifierSet
from tiny import (
    LAYERS,
    anyres_inputs,
    llava_inputs,
    qwen_inputs,
    tiny_llava,
    tiny_llava_onevision,
    tiny_qwen2_vl,
)
from transformers.cache_utils import DynamicCache

from v2drop_eval import attach
from v2drop_eval.engine import contract
from v2drop_eval.engine.contract import (
    CACHE_KWARGS,
    TransformersContractError,
    cache_of,
    check_cache,
    check_layer_kwargs,
    check_prefill_call,
)

CASES = {
    "llava": (tiny_llava, lambda: llava_inputs([1, 2], text_lens=[2, 7])),
    "qwen": (tiny_qwen2_vl, lambda: qwen_inputs([[(4, 4)], [(4, 6), (2, 2)]])),
    "onevision": (tiny_llava_onevision,
                  lambda: anyres_inputs("llava_onevision", [[("image", (70, 30))], [("video", 4)]])),
}


def _record(model, inputs, new_tokens: int = 3):
    """Every top-model call and every decoder-layer call of one ``generate``, as transformers makes them."""
    top_calls, layer_calls = [], []

    def on_top(module, args, kwargs):
        cache = cache_of(kwargs)
        top_calls.append((dict(kwargs), cache.get_seq_length() if cache is not None else 0))

    def on_layer(layer):
        def hook(module, args, kwargs):
            layer_calls.append((layer, args, dict(kwargs)))

        return hook

    hooks = [model.register_forward_pre_hook(on_top, with_kwargs=True)]
    for i, layer in enumerate(model.model.language_model.layers):
        hooks.append(layer.register_forward_pre_hook(on_layer(i), with_kwargs=True))
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    finally:
        for h in hooks:
            h.remove()
    return top_calls, layer_calls


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(CASES))
def test_generate_calls_the_model_as_the_engine_expects(family, attn):
    build, make_inputs = CASES[family]
    model, inputs = build(attn), make_inputs()
    B, S = inputs["input_ids"].shape
    top_calls, layer_calls = _record(model, inputs)

    # The top model: the first call is the prefill, with the whole prompt and an empty cache ...
    first, cached = top_calls[0]
    assert cached == 0
    assert first["input_ids"].shape == (B, S)
    check_prefill_call(first["input_ids"], first.get("attention_mask"))
    # ... then one call per new token, on a DynamicCache that already holds the prompt, under a known name.
    for t, (kwargs, cached) in enumerate(top_calls[1:]):
        assert kwargs["input_ids"].shape == (B, 1)
        assert cached == S + t
        cache = cache_of(kwargs)
        assert isinstance(cache, DynamicCache)
        assert any(name in kwargs for name in CACHE_KWARGS)
        check_cache(cache, LAYERS)

    # Every decoder layer: hidden states first, the model-wide mask / rotary pair / position ids by keyword.
    assert len(layer_calls) == LAYERS * len(top_calls)
    for n, (layer, args, kwargs) in enumerate(layer_calls):
        step = n // LAYERS
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        q = S if step == 0 else 1
        assert hidden.shape[:2] == (B, q)
        check_layer_kwargs(layer, kwargs, q=q, key_len=S + step)
        # At prefill the decoder may make the cache itself (transformers 5.0 does); from then on the
        # layers write to the cache the top model was handed.
        assert isinstance(cache_of(kwargs), DynamicCache)
        if step:
            assert cache_of(kwargs) is cache_of(top_calls[step][0])


def test_dynamic_cache_keeps_one_entry_per_layer_and_reads_layer_0():
    model, inputs = tiny_llava("sdpa"), llava_inputs([1])
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    cache = out.past_key_values
    check_cache(cache, LAYERS)
    assert [lay.get_seq_length() for lay in cache.layers] == [inputs["input_ids"].shape[1]] * LAYERS
    assert cache.get_seq_length() == cache.layers[0].get_seq_length()


def test_tested_range_is_the_one_pyproject_declares():
    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [re.sub(r"^transformers\s*", "", d) for d in deps if re.match(r"^transformers\b", d)]
    assert SpecifierSet(contract.tested_range()) == SpecifierSet(spec)


def _assert_named(excinfo) -> None:
    msg = str(excinfo.value)
    assert f"transformers {transformers.__version__}" in msg
    assert contract.tested_range() in msg


def test_prefill_without_the_whole_prompt_is_a_named_error():
    """transformers 5.24's first symptom: the engine saw a 1-position prefill beside the full mask."""
    model, inputs = tiny_llava("sdpa"), llava_inputs([1, 1], text_lens=[2, 9])
    with attach(model, "2:0.5"), pytest.raises(TransformersContractError, match="whole prompt") as excinfo:
        model(input_ids=inputs["input_ids"][:, -1:], attention_mask=inputs["attention_mask"], cache=DynamicCache())
    _assert_named(excinfo)


def test_a_renamed_cache_keyword_is_caught_not_an_index_error():
    """A future release that renames the cache again: the decode call would look like a prefill."""

    def rename(module, args, kwargs):
        for name in CACHE_KWARGS:
            if name in kwargs:
                kwargs["kv_cache_of_the_future"] = kwargs.pop(name)
        return args, kwargs

    model, inputs = tiny_llava("sdpa"), llava_inputs([1, 1], text_lens=[2, 9])
    with attach(model, "2:0.5"):
        hook = model.register_forward_pre_hook(rename, with_kwargs=True, prepend=True)
        try:
            with pytest.raises(TransformersContractError) as excinfo:
                model.generate(**inputs, max_new_tokens=2, do_sample=False)
        finally:
            hook.remove()
    _assert_named(excinfo)


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda kw: kw.pop("position_embeddings"), "position_embeddings"),
        (lambda kw: kw.pop("attention_mask"), "without an attention_mask"),
        (lambda kw: kw.update(position_ids=kw["position_ids"][..., :1]), "position_ids span 1"),
        (lambda kw: kw.update(attention_mask=kw["attention_mask"][..., :3]), "attention_mask has shape"),
    ],
    ids=["no-rotary", "no-mask", "short-position-ids", "short-mask"],
)
def test_layer_inputs_that_moved_are_named(change, expected):
    model, inputs = tiny_llava("eager"), llava_inputs([1, 1], text_lens=[2, 9])
    layer = model.model.language_model.layers[2]

    def mangle(module, args, kwargs):
        change(kwargs)
        return args, kwargs

    with attach(model, "2:0.5"):
        hook = layer.register_forward_pre_hook(mangle, with_kwargs=True, prepend=True)
        try:
            with torch.no_grad(), pytest.raises(TransformersContractError, match=expected) as excinfo:
                model(**inputs)
        finally:
            hook.remove()
    _assert_named(excinfo)
