"""The state of one forward call of the top model as the dropper follows it: the layout of the sequence
between decoder layers, the counts per stage and per row, the gathered copies of the layers' inputs, and
the dropper's clock. A prefill starts one (:meth:`Call.start`); when tokens are removed before the LLM
(``engine/before_llm.py``) it is rebased on the shorter sequence the decoder runs (:meth:`Call.rebase`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from v2drop_eval.engine.accounting import row_stats
from v2drop_eval.engine.clock import DropperClock
from v2drop_eval.engine.gather import Layout

__all__ = ["Call"]


@dataclass
class Call:
    """State of one forward call of the top model."""

    seq_len: int  # S: the prefill length
    clock: DropperClock  # the dropper's own time at this prefill and the decode steps after it
    layout: Layout | None = None  # current layout while the prefill runs through the layers
    initial: Layout | None = None  # the untouched layout (nothing gathered while it applies)
    layouts: dict[int, Layout] = field(default_factory=dict)  # drop layer -> layout from there on
    text_real: list[int] = field(default_factory=list)  # real (non-pad) text tokens per row
    vision_alive: list[list[int]] = field(default_factory=list)  # per stage, per row
    video_found: list[int] = field(default_factory=list)  # per row: how many of the vision tokens are video
    gathered: dict[tuple[int, int], Any] = field(default_factory=dict)  # (stage layer, id(obj)) -> copy
    input_ids: torch.Tensor | None = None
    real: torch.Tensor | None = None  # [B, S] the 2D padding mask (None: no padding)
    placeholders: dict[str, list[int]] = field(default_factory=dict)  # "image" / "video" -> per row
    prompt_vision: list[int] | None = None  # per row: placeholders in the prompt, when fewer reach the LLM
    row_pos: torch.Tensor | None = None  # [B, S] each position's index among its row's real tokens
    transfers: dict[int, Any] = field(default_factory=dict)  # drop layer -> merged tokens placed (merging.Transfer)

    @classmethod
    def start(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, clock: DropperClock,
              vision_ids: tuple[int, ...], video_ids: tuple[int, ...]) -> Call:
        """A prefill's call: every vision token alive, except the last prompt position (it produces the
        first new token, so it is never dropped)."""
        B, S = input_ids.shape
        device = input_ids.device
        vision = torch.isin(input_ids, torch.tensor(vision_ids, device=device))
        vision[:, -1] = False
        real = attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else None
        idx = torch.arange(S, device=device).expand(B, S)
        valid = real if real is not None else torch.ones(B, S, dtype=torch.bool, device=device)
        layout = Layout(idx=idx, valid=valid, vision=vision & valid)
        call = cls(seq_len=S, clock=clock, layout=layout, initial=layout, input_ids=input_ids, real=real,
                   row_pos=valid.long().cumsum(1) - 1)
        call.vision_alive.append(vision.sum(1).tolist())
        call.video_found = call._video(vision, input_ids, video_ids)
        call.text_real = ((~vision) & real).sum(1).tolist() if real is not None else (S - vision.sum(1)).tolist()
        return call

    def rebase(self, idx: torch.Tensor, valid: torch.Tensor, video_ids: tuple[int, ...]) -> None:
        """Tokens were removed before the LLM: from now on the layout's coordinates are the slots of the
        shorter sequence the decoder runs (``idx`` [B, S'] original slot of each, ``valid``)."""
        B, n = idx.shape
        vision = self.initial.vision.gather(1, idx) & valid
        vision[:, -1] = False
        layout = Layout(idx=torch.arange(n, device=idx.device).expand(B, n), valid=valid, vision=vision)
        self.prompt_vision = self.vision_alive[0]
        self.seq_len, self.layout, self.initial = n, layout, layout
        self.row_pos = valid.long().cumsum(1) - 1
        self.vision_alive = [vision.sum(1).tolist()]
        self.text_real = ((~vision) & valid).sum(1).tolist()
        if video_ids:
            self.video_found = self._video(vision, self.input_ids.gather(1, idx), video_ids)

    @property
    def ordinal(self) -> torch.Tensor:
        """[B, S] each slot's ordinal among its row's vision tokens (at the start of the layout)."""
        return (self.initial.vision.long().cumsum(1) - 1).clamp(min=0)

    def cached(self, stage: int, obj: Any, build: Any) -> Any:
        """``build()`` once per (stage, object) for this call."""
        key = (stage, id(obj))
        if key not in self.gathered:
            self.gathered[key] = (build(), obj)  # keep obj alive so its id stays unique
        return self.gathered[key][0]

    @staticmethod
    def _video(vision: torch.Tensor, ids: torch.Tensor, video_ids: tuple[int, ...]) -> list[int]:
        if not video_ids:
            return [0] * ids.shape[0]
        return (vision & torch.isin(ids, torch.tensor(video_ids, device=ids.device))).sum(1).tolist()

    def stats_builder(self, text_config: Any, elem: int, num_layers: int, layers: list[int],
                      encoder: Callable[[], list[dict[str, Any]] | None] | None) -> Callable[[], list[dict[str, Any]]]:
        """What builds the prefill's per-row accounting (``accounting.row_stats``, the encoder's rows merged in)."""
        args = (text_config, elem, num_layers, layers, self.vision_alive, self.text_real)
        video, prompt_vision = self.video_found, self.prompt_vision

        def build() -> list[dict[str, Any]]:
            rows = row_stats(*args, self.clock.totals(), video_found=video, prompt_vision=prompt_vision)
            for row, extra in zip(rows, (encoder and encoder()) or [], strict=False):
                row.update(extra)
            return rows

        return build
