"""The engine's kept sets against the authors' selection code (tests/originals), stage by stage.

One prefill at batch size 1 on a tiny model: hooks registered before ``attach`` see each layer's inputs
as the engine receives them (before it drops there), hooks registered after see them as the layer gets
them. At each stage the original is fed what it reads from that same run (the hidden states, layer K-1's
attention weights, keys), with its own count and position rules, and its kept set is compared with
``handle.last_layouts``. In half precision a tie at the cut may be broken either way: the original is
rerun with its ties broken towards the engine's set (``topk_preferring``), which reproduces that set
exactly when it is a valid top-k under the original's own scores.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from fractions import Fraction

import torch
from originals import topk, topk_preferring
from originals.dart import get_retained_image_token_llava, get_retained_image_token_qwen2_vl
from originals.fastv import fastv_stage
from originals.pdrop import pdrop_counts, pdrop_position_ids, pdrop_rank
from originals.v2drop import v2drop_stage
from reference import closed_values, renumbered
from tiny import (
    LLAVA_IMAGE_ID,
    QWEN_IMAGE_ID,
    llava_inputs,
    qwen_inputs,
    tiny_llava,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
)

from v2drop_eval import DropSchedule, attach

FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl")
IMAGE_PX = 64  # LLaVA: 64 vision tokens (patch 8); Qwen: a 16 x 16 patch grid, 64 tokens after the 2 x 2 merge


@dataclass
class Stage:
    layer: int
    engine: set[int]  # kept vision positions (original coordinates)
    original: set[int]  # what the authors' code keeps from the same inputs
    tie_aware: set[int]  # the same, its ties at the cut broken towards the engine's set

    @property
    def identical(self) -> bool:
        return self.engine == self.original

    @property
    def valid_top_k(self) -> bool:
        return self.engine == self.tie_aware


def build(family: str, seed: int, dtype: torch.dtype) -> tuple[torch.nn.Module, dict, int]:
    """A tiny eager model of ``family`` in ``dtype``, one row with one image of 64 tokens and 5+ text tokens
    after it; and the image token id."""
    if family == "llava":
        model = tiny_llava("eager", seed=seed, image_size=IMAGE_PX)
        inputs, image_id = llava_inputs([1], seed=seed, image_size=IMAGE_PX), LLAVA_IMAGE_ID
    else:
        model = (tiny_qwen2_vl if family == "qwen2_vl" else tiny_qwen2_5_vl)("eager", seed=seed)
        inputs, image_id = qwen_inputs([[(16, 16)]], seed=seed), QWEN_IMAGE_ID
    model = model.to(dtype)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    return model, inputs, image_id


def stages(family: str, method: str, schedule: str, seed: int = 0, dtype: torch.dtype = torch.float32,
           options: str | None = None, attach_fn=attach, positions: str | None = None) -> list[Stage]:
    """The engine's and the original's kept sets at every stage of ``schedule`` (``attach_fn``: another
    engine's ``attach``, e.g. an older checkout's, called without options or positions when none are given)."""
    model, inputs, image_id = build(family, seed, dtype)
    decoder = model.model.language_model
    layers = decoder.layers
    before: dict[int, tuple] = {}
    after: dict[int, tuple] = {}
    weights: dict[int, torch.Tensor] = {}
    rotary_ids: list[torch.Tensor] = []

    def capture(store, layer):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            store[layer] = (hidden, dict(kwargs))
        return hook

    def attn_weights(layer):
        def hook(module, args, output):
            if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
                weights[layer] = output[1]
        return hook

    hooks = [layer.register_forward_pre_hook(capture(before, i), with_kwargs=True) for i, layer in enumerate(layers)]
    hooks += [layer.self_attn.register_forward_hook(attn_weights(i)) for i, layer in enumerate(layers)]
    hooks.append(decoder.rotary_emb.register_forward_pre_hook(
        lambda m, a, k: rotary_ids.append(a[1] if len(a) > 1 else k["position_ids"]), with_kwargs=True))
    kwargs = {"method": method, **({} if options is None else {"options": options}),
              **({} if positions is None else {"positions": positions})}
    handle = attach_fn(model, schedule, **kwargs)
    hooks += [layer.register_forward_pre_hook(capture(after, i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(**inputs)
            layouts = dict(handle.last_layouts)
            return _compare(family, method, DropSchedule.parse(schedule), model, inputs, image_id, layouts,
                            before, after, weights, rotary_ids[0])
    finally:
        handle.detach()
        for h in hooks:
            h.remove()


def _compare(family, method, schedule, model, inputs, image_id, layouts, before, after, weights, ids0) -> list[Stage]:
    ids = inputs["input_ids"][0]
    S = ids.shape[0]
    decoder = model.model.language_model
    vision = ids == image_id
    n0 = int(vision.sum())
    prev_idx = torch.arange(S)
    out, ratios = [], []
    for layer, ratio in schedule.stages:
        ratios.append(ratio)
        slot_vision = vision[prev_idx]
        start, amount = int(slot_vision.nonzero()[0]), int(slot_vision.sum())
        assert bool(slot_vision[start:start + amount].all()), "one image: its tokens are contiguous"
        idx, valid = layouts.get(layer, (prev_idx[None], torch.ones(1, S, dtype=torch.bool)))
        engine = {int(p) for p, v in zip(idx[0], valid[0], strict=True) if v and vision[p]}

        def run(pick, layer=layer, ratio=ratio, start=start, amount=amount, prev_idx=prev_idx):
            slots = _original(family, method, model, decoder, layer, ratio, tuple(ratios), start, amount, n0,
                              prev_idx, vision, before, after, weights, ids0, pick)
            return {int(prev_idx[s]) for s in slots}

        prefer = {int(s) for s in range(prev_idx.shape[0]) if int(prev_idx[s]) in engine}
        out.append(Stage(layer, engine, run(topk), run(topk_preferring(prefer))))
        if layer in layouts:
            prev_idx = idx[0][valid[0]]
    return out


def _original(family, method, model, decoder, layer, ratio, ratios, start, amount, n0, prev_idx, vision, before,
              after, weights, ids0, pick) -> list[int]:
    """The original's kept vision slots (in the slots before this stage) at ``layer``."""
    keep = Fraction(repr(ratio))
    reduction = float(1 - keep)  # FastV's R and DART's reduction_ratio: the share dropped, as a decimal
    if method == "v2drop" or method == "random":
        current, prev = before[layer][0], after[layer - 1][0]
        selected, _ = v2drop_stage(current, prev, start, amount, ratio, topk=pick)
        return selected.tolist()
    if method in ("fastv", "fastv_attn"):
        kept, _ = fastv_stage(weights[layer - 1], start, amount, reduction, topk=pick)
        return kept.tolist()
    text = model.config.get_text_config()
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    attn = decoder.layers[layer].self_attn
    apply_rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    if method == "pdrop":
        share, ratio_list = Fraction(1), [1.0]
        for r in ratios:
            share *= Fraction(repr(r))
            ratio_list.append(float(share))
        image_tokens, keep_length = pdrop_counts(n0, ratio_list, len(ratios) - 1)
        assert image_tokens == amount
        n = prev_idx.shape[0]
        position_ids = _pdrop_positions(family, ids0, prev_idx, vision, n)
        features = before[layer][0]
        kept, _ = pdrop_rank(features, position_ids, decoder.layers[layer], decoder.rotary_emb, apply_rotary, heads,
                             kv_heads, head_dim, start, image_tokens, keep_length, n, topk=pick)
        return kept.tolist()
    if method == "dart":
        state = decoder.norm(before[layer][0])
        hidden, kwargs = after[layer - 1]
        prev_layer = decoder.layers[layer - 1]
        normed = prev_layer.input_layernorm(hidden)
        B, q = normed.shape[:2]
        k = prev_layer.self_attn.k_proj(normed).view(B, q, -1, head_dim).transpose(1, 2)
        qs = prev_layer.self_attn.q_proj(normed).view(B, q, -1, head_dim).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        _, k = sys.modules[type(prev_layer.self_attn).__module__].apply_rotary_pos_emb(qs, k, cos, sin)
        keys = k.repeat_interleave(heads // kv_heads, dim=1)  # repeat_kv, as the original's attention returns them
        if family == "llava":
            kept = get_retained_image_token_llava(state, keys, start, amount, None, reduction, topk=pick)
        else:
            kept = get_retained_image_token_qwen2_vl(state, keys, start, amount, reduction, topk=pick)
        return kept.tolist()
    raise ValueError(f"no original for method {method!r}")


def _pdrop_positions(family, ids0, prev_idx, vision, n) -> torch.Tensor:
    """The positions PyramidDrop's probe uses for the current sequence: the model's own before any drop;
    after one, ``arange(cur_len)`` (its code, LLaVA) or the same gaps closed on M-RoPE's ids (Qwen)."""
    S = ids0.shape[-1]
    if n == S:
        return ids0
    if ids0.dim() == 2:
        assert torch.equal(renumbered(ids0[None][:, :, prev_idx], closed_values(ids0[None], torch.ones(1, S, dtype=torch.bool), _kept(prev_idx, S)))[0],
                           pdrop_position_ids(n)[None]), "renumbering a 1-D row is PyramidDrop's arange(cur_len)"
        return pdrop_position_ids(n)[None]
    closed = closed_values(ids0, torch.ones(1, S, dtype=torch.bool), _kept(prev_idx, S))
    return renumbered(ids0[:, :, prev_idx], closed)


def _kept(prev_idx: torch.Tensor, S: int) -> torch.Tensor:
    kept = torch.zeros(1, S, dtype=torch.bool)
    kept[0, prev_idx] = True
    return kept
