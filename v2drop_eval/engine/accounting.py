"""Per-row accounting of one prefill: vision and text tokens per layer, KV-cache bytes, time spent; and
the vision encoder's tokens per block, FLOPs and time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from v2drop_eval.engine import flops
from v2drop_eval.engine.clock import PREFILL_CATEGORIES

__all__ = ["row_stats", "encoder_row_stats"]


def row_stats(text_config: Any, elem_bytes: int, num_layers: int, drop_layers: list[int],
              vision_alive: list[list[int]], text_real: list[int], times_ms: dict[str, float],
              video_found: list[int] | None = None, prompt_vision: list[int] | None = None) -> list[dict[str, Any]]:
    """One dict per row. ``vision_alive[0]`` holds each row's vision tokens entering the LLM, ``vision_alive[k]``
    the count alive after the k-th drop layer of ``drop_layers``; ``times_ms`` the dropper's own time
    per category of the batch (``DropperClock.totals``); ``video_found`` how many of the vision tokens
    are video tokens (the rest are image tokens); ``prompt_vision`` the placeholders in the prompt when
    fewer tokens entered the LLM (VisionZip, dropping inside the encoder; None: all of them entered)."""
    heads = int(text_config.num_attention_heads)
    kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // heads)
    per_token = 2 * kv_heads * head_dim * elem_bytes
    stages = set(drop_layers)
    stats = []
    for b, found in enumerate(vision_alive[0]):
        per_layer, alive, stage_i = [], found, 0
        for layer in range(num_layers):
            if layer in stages:
                stage_i += 1
                alive = vision_alive[stage_i][b]
            per_layer.append(int(alive))
        text = int(text_real[b])
        tokens = [text + v for v in per_layer]
        stats.append({
            "vision_tokens": int(prompt_vision[b] if prompt_vision is not None else found),
            "llm_vision_tokens": int(found),
            "video_tokens": int(video_found[b]) if video_found else 0,
            "text_tokens": text,
            "vision_per_layer": per_layer,
            "tokens_per_layer": tokens,
            "kv_cache_bytes": sum(tokens) * per_token,
            **{f"{c}_ms": times_ms[c] for c in times_ms},
            "dropper_ms": sum(times_ms[c] for c in PREFILL_CATEGORIES),
        })
    return stats


def encoder_row_stats(calls: Sequence[Any], placeholders: dict[str, list[int]], spec: Any,
                      text_hidden: int) -> list[dict[str, Any]] | None:
    """Per row: the vision encoder's tokens entering each block (summed over the row's crops, images and
    videos), its FLOPs (``flops.vision_flops``) and the batch's encoder time. ``calls``: the prefill's
    ``encoder.FeatureCall`` list; ``placeholders``: per kind, each row's placeholder count, which assigns
    the calls' images to rows in order (calls left over from an encoding no prefill used are skipped). None
    when they do not add up (nothing is attributed then)."""
    for start in range(len(calls) + 1):  # the empty suffix: no images (zeros)
        out = _encoder_rows(calls[start:], placeholders, spec, text_hidden)
        if out is not None:
            return out
    return None


def _encoder_rows(calls: Sequence[Any], placeholders: dict[str, list[int]], spec: Any,
                  text_hidden: int) -> list[dict[str, Any]] | None:
    rows = len(next(iter(placeholders.values())))
    depth = len(spec.blocks)
    tokens = [[0] * depth for _ in range(rows)]
    squares = [[0] * depth for _ in range(rows)]
    patches, merged = [0] * rows, [0] * rows
    ms = 0.0
    for kind in ("image", "video"):
        images = [(call, i) for call in calls if call.kind == kind for i in range(len(call.placeholders))]
        need = list(placeholders.get(kind, [0] * rows))
        if sum(call.placeholders[i] for call, i in images) != sum(need):
            return None
        row = 0
        for call, i in images:
            while row < rows and need[row] == 0:
                row += 1
            if row == rows or call.placeholders[i] > need[row]:
                return None
            need[row] -= call.placeholders[i]
            first = sum(call.items[:i])
            for item in range(first, first + call.items[i]):
                run, local = _item(call.runs, item)
                for block in range(depth):
                    tokens[row][block] += run.tokens[block][local]
                    squares[row][block] += run.attention_sq[block][local]
                patches[row] += run.patches[local]
                # LLaVA's projector runs on every patch slot (the [CLS] too with the "full" strategy);
                # Qwen-VL's merger on the kept groups only.
                merged[row] += (run.patches[local] + (spec.prefix if spec.placeholders_include_prefix else 0)
                                if spec.layout == "batched" else run.out_tokens[local])
    ms = sum(run.vision_ms for call in calls for run in call.runs)
    out = []
    for b in range(rows):
        out.append({
            "encoder_tokens_per_layer": tokens[b],
            "vision_flops": flops.vision_flops(spec.kind, spec.config, text_hidden, tokens[b], squares[b], patches[b],
                                               merged[b], group=spec.group),
            "vision_ms": ms,
        })
    return out


def _item(runs: Sequence[Any], item: int) -> tuple[Any, int]:
    for run in runs:
        if item < run.items:
            return run, item
        item -= run.items
    raise IndexError(item)
