"""The bench's model shapes: random-weight models with real widths and depths (or slices of them), and
their inputs (one image of 576 vision tokens between text tokens; a high-resolution Qwen2-VL image on the
``qwen2-vl-hires-slice`` shape).

Slice shapes run fewer layers than the model they stand for, at its real width: ``7b-slice-vision``
(LLaVA-1.5-7B: CLIP-ViT-L/14-336 whole, 4 of the 32 decoder layers) and ``qwen2-vl-hires-slice``
(Qwen2-VL-7B on a 1344x1344 image, 2,304 vision tokens: 4 of the 32 ViT blocks, 1 of the 28 decoder
layers). Their rows also give the time to first token extrapolated to the whole model (every block of
a kind has the same shape, so its time scales with the count; encoder stages are placed at the same
fraction of the blocks) and the vision encoder's share of it (docs/bench.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from v2drop_eval.engine.adapters import forward_takes
from v2drop_eval.engine.families import VISIONZIP_TYPES
from v2drop_eval.methods import get_method

__all__ = ["Shape", "SHAPES", "VISION_TOKENS", "build_model", "make_inputs", "vision_depth", "runs_on",
           "encoder_pair", "encoder_schedules_of"]


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
    image: int = 0  # Qwen2-VL: image side in pixels (0: the 48x48-patch default, 576 tokens)
    full_layers: int = 0  # decoder layers of the model a slice stands for (0: not a slice)
    full_vision_layers: int = 0  # encoder blocks of that model (0: the slice runs them all)
    encoder_schedule: str = ""  # --encoder-schedules default: stages at real blocks ("real=slice" when they differ)

    @property
    def vision_tokens(self) -> int:
        side = self.image // 14 // 2 if self.family == "qwen2_vl" and self.image else 24
        return side * side


SHAPES: dict[str, Shape] = {
    "llava-1.5-7b": Shape("llava", 4096, 11008, 32, 32, 32, 32064,
                          dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
                          text_tokens=60, encoder_schedule="12:0.5/18:0.5"),
    "qwen2-vl-7b": Shape("qwen2_vl", 3584, 18944, 28, 28, 4, 152064,
                         dict(depth=32, embed_dim=1280, num_heads=16), text_tokens=60, encoder_schedule="8:0.5/16:0.5"),
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
                  dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2),
                  encoder_schedule="1:0.5"),
    "tiny-qwen": Shape("qwen2_vl", 64, 128, 4, 4, 2, 1024, dict(depth=2, embed_dim=32, num_heads=2),
                       encoder_schedule="1:0.5"),
    # CPU, the vision encoder's share of time to first token (docs/bench.md): LLaVA-1.5-7B's whole
    # CLIP-ViT-L/14-336 (24 blocks, width 1024) before the 7b-slice decoder; Qwen2-VL-7B's ViT (width 1280,
    # full attention over each image) on a 1344 px image, 4 of its 32 blocks, and 1 of its 28 decoder layers.
    "7b-slice-vision": Shape("llava", 4096, 11008, 4, 32, 32, 32064,
                             dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
                             text_tokens=60, full_layers=32, encoder_schedule="12:0.5/18:0.5"),
    "qwen2-vl-hires-slice": Shape("qwen2_vl", 3584, 18944, 1, 28, 4, 152064, dict(depth=4, embed_dim=1280, num_heads=16),
                                  text_tokens=60, image=1344, full_layers=28, full_vision_layers=32,
                                  encoder_schedule="8:0.5/16:0.5=1:0.5/2:0.5"),
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
                # LLaVA-1.5 reads the second-to-last block (a one-block stub: its only one)
                vision_feature_layer=-2 if shape.vision["num_hidden_layers"] > 1 else -1,
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
    """One image (576 vision tokens; the shape's ``image`` for Qwen2-VL) between ``text_tokens`` text tokens,
    repeated over the batch."""
    gen = torch.Generator().manual_seed(0)
    cfg = model.config
    text = torch.randint(10, 1000, (shape.text_tokens,), generator=gen)
    head, tail = text[: shape.text_tokens // 2], text[shape.text_tokens // 2 :]
    if shape.family == "llava":
        vision = torch.full((VISION_TOKENS,), cfg.image_token_id)
        ids = torch.cat([head, vision, tail])
        extra = {"pixel_values": torch.randn(batch_size, 3, 336, 336, generator=gen)}
    else:
        side = 2 * int(shape.vision_tokens ** 0.5)  # patches a side
        vision = torch.full((shape.vision_tokens,), cfg.image_token_id)
        ids = torch.cat([head, torch.tensor([cfg.vision_start_token_id]), vision,
                         torch.tensor([cfg.vision_end_token_id]), tail])
        grid = torch.tensor([[1, side, side]] * batch_size)
        extra = {
            "pixel_values": torch.randn(batch_size * side * side, 3 * 2 * 14 * 14, generator=gen),
            "image_grid_thw": grid,
        }
        if forward_takes(model, "mm_token_type_ids"):
            extra["mm_token_type_ids"] = (ids == cfg.image_token_id).long().expand(batch_size, -1).clone()
    out = {"input_ids": ids.expand(batch_size, -1).clone(), "attention_mask": torch.ones(batch_size, ids.numel(), dtype=torch.long), **extra}
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in out.items()}


def vision_depth(shape: Shape) -> int:
    """Blocks of ``shape``'s vision encoder."""
    return int(shape.vision.get("depth") or shape.vision.get("num_hidden_layers"))


def runs_on(method: str, shape: Shape) -> bool:
    """Whether ``method`` runs on ``shape``'s family (a pre-LLM method needs LLaVA-1.5's CLIP [CLS])."""
    return not get_method(method).pre_llm or shape.family in VISIONZIP_TYPES


def encoder_pair(text: str) -> tuple[str, str]:
    """``"real=slice"`` (or one schedule for both) -> (stages of the whole model, stages the slice runs)."""
    real, _, run = text.partition("=")
    return real, run or real


def encoder_schedules_of(shape_name: str, text: str | None) -> list[str]:
    """``--encoder-schedules`` as a list; ``default`` is the shape's own stages."""
    out = [SHAPES[shape_name].encoder_schedule if t == "default" else t for t in str(text or "").split(",") if t]
    if "" in out:
        raise ValueError(f"--encoder-schedules default: shape {shape_name} has no encoder schedule of its own")
    return out
