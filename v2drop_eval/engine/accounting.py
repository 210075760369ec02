"""Per-row accounting of one prefill: vision and text tokens per layer, KV-cache bytes, time spent."""

from __future__ import annotations

from typing import Any

from v2drop_eval.engine.clock import PREFILL_CATEGORIES

__all__ = ["row_stats"]


def row_stats(text_config: Any, elem_bytes: int, num_layers: int, drop_layers: list[int],
              vision_alive: list[list[int]], text_real: list[int], times_ms: dict[str, float],
              video_found: list[int] | None = None) -> list[dict[str, Any]]:
    """One dict per row. ``vision_alive[0]`` holds each row's vision tokens found, ``vision_alive[k]``
    the count alive after the k-th drop layer of ``drop_layers``; ``times_ms`` the dropper's own time
    per category of the batch (``DropperClock.totals``); ``video_found`` how many of the vision tokens
    found are video tokens (the rest are image tokens)."""
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
            "vision_tokens": int(found),
            "video_tokens": int(video_found[b]) if video_found else 0,
            "text_tokens": text,
            "vision_per_layer": per_layer,
            "tokens_per_layer": tokens,
            "kv_cache_bytes": sum(tokens) * per_token,
            **{f"{c}_ms": times_ms[c] for c in times_ms},
            "dropper_ms": sum(times_ms[c] for c in PREFILL_CATEGORIES),
        })
    return stats
