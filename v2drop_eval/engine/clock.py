"""The dropper's own time, measured inside its hooks (docs/bench.md, "The dropper's cost").

The engine opens a span around every piece of its own work (bookkeeping in the hooks, scoring with the
signal taps and probes, top-k and gathering, decode-side mask gathers). Spans nest; time is charged
to the innermost open span only, so nothing counts twice. Each open or close leaves one mark:

- on CPU a ``time.perf_counter()`` reading;
- on CUDA a ``torch.cuda.Event`` recorded on the current stream, so the hot path never synchronizes.
  The events are read (one ``synchronize`` on the last) only when :meth:`DropperClock.totals` is
  called, after the forward.
"""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["DropperClock", "CATEGORIES", "PREFILL_CATEGORIES"]

# What the engine charges its work to. The prefill ones add up to the dropper's prefill cost.
CATEGORIES = ("bookkeeping", "score", "gather", "decode")
PREFILL_CATEGORIES = ("bookkeeping", "score", "gather")


class DropperClock:
    """Exclusive time per category of nested spans; one clock per prefill (and the decode after it)."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        device = torch.device(device) if device is not None else torch.device("cpu")
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.current_stream(device) if self._cuda else None
        self._stack: list[str] = []
        self._last: Any = None  # the latest mark
        self._intervals: list[tuple[str, Any, Any]] = []  # (category, start mark, end mark)

    def _mark(self) -> Any:
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(self._stream)
        return event

    def open(self, category: str) -> None:
        """Start charging ``category`` (the enclosing span, if any, pauses)."""
        mark = self._mark()
        if self._stack:
            self._intervals.append((self._stack[-1], self._last, mark))
        self._stack.append(category)
        self._last = mark

    def close(self) -> None:
        """End the innermost span (the enclosing one, if any, resumes)."""
        mark = self._mark()
        self._intervals.append((self._stack.pop(), self._last, mark))
        self._last = mark

    def adopt(self, other: DropperClock, category: str) -> None:
        """Take ``other``'s closed spans, all charged to ``category`` (a decode step joining its prefill)."""
        self._intervals.extend((category, start, end) for _, start, end in other._intervals)

    def totals(self) -> dict[str, float]:
        """Milliseconds per category (every one of :data:`CATEGORIES`), of the spans closed so far."""
        out = dict.fromkeys(CATEGORIES, 0.0)
        if self._cuda and self._intervals:
            self._intervals[-1][2].synchronize()  # outside the hot path: after the forward
        for category, start, end in self._intervals:
            out[category] = out.get(category, 0.0) + (
                start.elapsed_time(end) if self._cuda else (end - start) * 1e3
            )
        return out
