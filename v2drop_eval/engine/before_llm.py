"""What happens before the LLM decoder, as one dropper drives it: the vision encoder's hooks (its tokens
per block always; stages inside it, ``encoder_schedule=``; a pre-LLM method's selection at its output) and,
when fewer tokens than placeholders may leave it, the decoder pre-hook that removes them
(``engine/encoder.py``, ``engine/prellm.py``). The dropper (``engine/hooks.py``) sees placeholders counted,
the kept slots of a prefill, and the encoder's per-row accounting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from v2drop_eval.engine import refusals
from v2drop_eval.engine.accounting import encoder_row_stats
from v2drop_eval.engine.adapters import ModelAdapter
from v2drop_eval.engine.encoder import EncoderHooks, EncoderRun
from v2drop_eval.engine.method import KEEP, Method
from v2drop_eval.engine.prellm import PreLLMGather
from v2drop_eval.engine.schedule import DropSchedule, ZipCounts

__all__ = ["BeforeLLM", "before_llm_checks"]


def before_llm_checks(adapter: ModelAdapter, method: Method, counts: ZipCounts | None,
                      encoder_schedule: DropSchedule | None, positions: str | None) -> str:
    """Refuse what the model's vision encoder cannot take (encoder stages, the pre-LLM method's counts) or
    its positions cannot (renumbering M-RoPE before the LLM); returns the positions of the tokens that
    reach the LLM, by default the method's rule (on M-RoPE ``keep``: there is no 1-D sequence to renumber)."""
    spec = adapter.encoder
    refusals.check_encoder(type(adapter.top).__name__, spec, encoder_schedule, counts)
    if counts is not None:
        problem = method.pre_llm_problem(counts, refusals.patches_per_crop(spec))
        if problem:
            raise ValueError(problem)
    rule = positions or (KEEP if adapter.mrope else method.positions)
    if counts is not None or (encoder_schedule is not None and not encoder_schedule.is_empty):
        refusals.check_renumbering(rule, adapter.mrope)
    return rule


class BeforeLLM:
    """The hooks above for one model. ``select``: the pre-LLM method's selection
    (``Method.pre_llm_tokens``) for ``counts``; ``on_prefill(idx, valid)``: told the kept slots of each
    prefill that removed something; ``positions``: ``keep`` | ``renumber`` (``engine/prellm.py``)."""

    def __init__(self, adapter: ModelAdapter, encoder_schedule: DropSchedule | None, counts: ZipCounts | None,
                 select: Callable[..., torch.Tensor], positions: str,
                 on_prefill: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        self.spec = adapter.encoder
        self._image_id = adapter.vision_token_ids[0]
        self._video_ids = adapter.video_token_ids
        self._text_hidden = int(adapter.text_config.hidden_size)
        self.encoder = EncoderHooks(adapter.top.model, self.spec, encoder_schedule, counts, select)
        self.gather = PreLLMGather(adapter.decoder, positions, on_prefill) if self.encoder.reduces else None

    @property
    def reduces(self) -> bool:
        """Whether fewer tokens than placeholders may reach the decoder."""
        return self.gather is not None

    def remove(self) -> None:
        self.encoder.remove()
        if self.gather is not None:
            self.gather.remove()

    def placeholders(self, input_ids: torch.Tensor, real: torch.Tensor | None) -> dict[str, list[int]]:
        """Per kind (``image``, ``video``), each row's placeholder count (padding not counted)."""
        counted = input_ids if real is None else input_ids.masked_fill(~real, -1)
        out = {"image": (counted == self._image_id).sum(1).tolist()}
        if self._video_ids:
            out["video"] = (counted == self._video_ids[0]).sum(1).tolist()
        return out

    def row_stats(self, placeholders: dict[str, list[int]]) -> Callable[[], list[dict[str, Any]] | None]:
        """Takes the prefill's encoder calls; returns what builds their per-row accounting (on first read)."""
        features = self.encoder.take()
        return lambda: encoder_row_stats(features, placeholders, self.spec, self._text_hidden)

    @property
    def last_runs(self) -> list[EncoderRun]:
        """The vision tower runs of the last prefill, images first, then videos."""
        return [run for call in self.encoder.last_calls for run in call.runs]

    @property
    def kept_slots(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(idx [B, S'], valid)`` of the last prefill that removed tokens before the decoder, or None."""
        kept = self.gather.kept if self.gather is not None else None
        return None if kept is None else (kept.idx, kept.valid)
