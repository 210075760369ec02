"""A video row of thousands of vision tokens: dropping does a fixed number of tensor operations whatever
the token count (no per-token Python loop in scoring, selection or gathering), and prefill time is
recorded (printed with ``-s``; speed is never asserted, docs/bench.md)."""

from __future__ import annotations

import time

import pytest
import torch
from tiny import ANYRES_TILE, ANYRES_VIDEO_ID, tiny_llava_onevision
from torch.utils._python_dispatch import TorchDispatchMode

from v2drop_eval import attach

TOKENS_PER_FRAME = 4  # tiny LLaVA-OneVision: 4x4 patches pooled 2x2
SCHEDULE = "2:0.5/4:0.25"


class _CountOps(TorchDispatchMode):
    """Counts every ATen operation dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def video_row(frames: int, seed: int = 0) -> dict:
    """One row: 5 text tokens, a video of ``frames`` frames (frames x 4 tokens + 1 newline), 6 text tokens."""
    gen = torch.Generator().manual_seed(seed)
    n_video = frames * TOKENS_PER_FRAME + 1
    ids = torch.cat([torch.randint(6, 80, (5,), generator=gen), torch.full((n_video,), ANYRES_VIDEO_ID),
                     torch.randint(6, 80, (6,), generator=gen)])[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values_videos": torch.randn(1, frames, 3, ANYRES_TILE, ANYRES_TILE, generator=gen)}


def _decoder_ms(m, inputs: dict, repeats: int = 2) -> float:
    """Best-of-``repeats`` wall time of the LLM decoder's prefill (vision tower excluded)."""
    times: list[float] = []
    start: list[float] = []
    pre = m.model.language_model.register_forward_pre_hook(lambda *a: start.append(time.perf_counter()))
    post = m.model.language_model.register_forward_hook(lambda *a: times.append(time.perf_counter() - start[-1]))
    try:
        with torch.no_grad():
            for _ in range(repeats):
                m(**inputs)
    finally:
        pre.remove()
        post.remove()
    return min(times) * 1e3


@pytest.mark.slow  # seconds alone; minutes on a busy 2-core machine (4,097-token prefills, several runs)
def test_long_video_rows_drop_without_per_token_loops():
    m = tiny_llava_onevision("sdpa")
    ops, report = {}, {}
    for frames in (64, 1024):
        inputs = video_row(frames)
        n_video = frames * TOKENS_PER_FRAME + 1
        plain_ms = _decoder_ms(m, inputs)
        with attach(m, SCHEDULE) as h, torch.no_grad():
            m(**inputs)  # warm-up
            with _CountOps() as count:
                m(**inputs)
            stats = h.last_stats[0]
            dropped_ms = _decoder_ms(m, inputs)
        ops[frames] = count.n
        assert stats["vision_tokens"] == stats["video_tokens"] == n_video
        assert stats["vision_per_layer"][-1] == (n_video // 2) // 4
        report[n_video] = (plain_ms, dropped_ms, stats["score_ms"], stats["gather_ms"])
    # The same operations at 257 and 4,097 vision tokens: nothing loops over tokens in Python.
    assert ops[64] == ops[1024], ops
    for n, (plain_ms, dropped_ms, score_ms, gather_ms) in report.items():
        print(f"video row, {n} vision tokens, {SCHEDULE}: LLM prefill {plain_ms:.1f} ms plain, {dropped_ms:.1f} ms "
              f"dropping (score {score_ms:.2f} ms, gather {gather_ms:.2f} ms)")
