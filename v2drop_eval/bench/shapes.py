"""The bench's model shapes: random-weight models with real widths and depths (or slices of them), and
their inputs (one image of 576 vision tokens between text tokens)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from v2drop_eval.engine.adapters import forward_takes

__all__ = ["Shape", "SHAPES", "VISION_TOKENS", "build_model", "make_inputs"]


@dataclass(frozen=True)
class Shape:
    family: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    vision: dict[str, int]  # vision tower config
    text_tokens: int = 41


SHAPES: dict[str, Shape] = {
    "llava-1.5-7b": Shape("llava", 4096, 11008, 32, 32, 32, 32064,
                          dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
                          text_tokens=60),
    "qwen2-vl-7b": Shape("qwen2_vl", 3584, 18944, 28, 28, 4, 152064,
                         dict(depth=32, embed_dim=1280, num_heads=16), text_tokens=60),
    # CPU, 7B economics: LLaVA-1.5-7B's width, heads and MLP, 576 vision tokens and a real prompt
    # (60 text tokens), as many layers as a run of about 10 minutes on 2 cores allows; the schedule's
    # layers are scaled to the depth (scaled_schedule). The vision tower is a stub: not what is timed.
    "7b-slice": Shape("llava", 4096, 11008, 4, 32, 32, 32064,
                      dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2),
                      text_tokens=60),
    # CPU quick checks: the LLaVA layout (576 vision tokens) at a width a 2-core machine times in minutes.
    "small": Shape("llava", 512, 1376, 8, 8, 8, 32064,
                   dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)),
    # CI smoke (and the GPU suite's dry run): the plumbing, not speed.
    "tiny": Shape("llava", 64, 128, 4, 4, 2, 1024,
                  dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)),
    "tiny-qwen": Shape("qwen2_vl", 64, 128, 4, 4, 2, 1024, dict(depth=1, embed_dim=32, num_heads=2)),
}
VISION_TOKENS = 576


def build_model(shape: Shape, attn: str, device: str, dtype: torch.dtype) -> nn.Module:
    """A random-weight model of ``shape`` (weights are irrelevant to speed)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    text = dict(hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        if shape.family == "llava":
            cfg = LlavaConfig(
                vision_config=CLIPVisionConfig(image_size=336, patch_size=14, **shape.vision),
                text_config=LlamaConfig(**text), image_token_id=shape.vocab - 64,
            )
            model = LlavaForConditionalGeneration(cfg)
        else:
            cfg = Qwen2VLConfig(
                text_config=dict(**text, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                          "mrope_section": _mrope_section(shape)}),
                vision_config=dict(hidden_size=shape.hidden, patch_size=14, spatial_merge_size=2,
                                   temporal_patch_size=2, **shape.vision),
                image_token_id=shape.vocab - 64, video_token_id=shape.vocab - 63,
                vision_start_token_id=shape.vocab - 62, vision_end_token_id=shape.vocab - 61,
            )
            model = Qwen2VLForConditionalGeneration(cfg)
    model = model.to(dtype).eval()
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model


def _mrope_section(shape: Shape) -> list[int]:
    """Qwen2-VL's split of the rotary half-dim over (time, height, width): [16, 24, 24] at head dim 128."""
    half = shape.hidden // shape.heads // 2
    return [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]


def make_inputs(model: nn.Module, shape: Shape, batch_size: int, device: str, dtype: torch.dtype) -> dict:
    """One image (576 vision tokens) between ``text_tokens`` text tokens, repeated over the batch."""
    gen = torch.Generator().manual_seed(0)
    cfg = model.config
    text = torch.randint(10, 1000, (shape.text_tokens,), generator=gen)
    head, tail = text[: shape.text_tokens // 2], text[shape.text_tokens // 2 :]
    if shape.family == "llava":
        vision = torch.full((VISION_TOKENS,), cfg.image_token_id)
        ids = torch.cat([head, vision, tail])
        extra = {"pixel_values": torch.randn(batch_size, 3, 336, 336, generator=gen)}
    else:
        vision = torch.full((VISION_TOKENS,), cfg.image_token_id)
        ids = torch.cat([head, torch.tensor([cfg.vision_start_token_id]), vision,
                         torch.tensor([cfg.vision_end_token_id]), tail])
        grid = torch.tensor([[1, 48, 48]] * batch_size)
        extra = {
            "pixel_values": torch.randn(batch_size * 48 * 48, 3 * 2 * 14 * 14, generator=gen),
            "image_grid_thw": grid,
        }
        if forward_takes(model, "mm_token_type_ids"):
            extra["mm_token_type_ids"] = (ids == cfg.image_token_id).long().expand(batch_size, -1).clone()
    out = {"input_ids": ids.expand(batch_size, -1).clone(), "attention_mask": torch.ones(batch_size, ids.numel(), dtype=torch.long), **extra}
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in out.items()}
