"""Per-call timing of ``generate`` (the numbers of the side-car; docs/lmms-eval.md).

``model.generate`` is wrapped on the model instance, and a forward pre-hook and hook sit on the top model.
Within one ``generate`` call the first forward is the prefill (vision encoder + LLM prefill + logits of the
last position); every later forward is one decode step.

- ``prefill_ms``: ``generate`` entry -> end of the first forward: time to first token.
- ``prefill_forward_ms``: the first forward alone (no input preparation by ``generate``). From
  transformers 5.24 on, ``generate`` encodes images before that forward, so it no longer holds the
  vision encoder; ``prefill_ms`` does in every release (docs/design.md §3).
- ``decode_ms``: end of the first forward -> ``generate`` returns; ``decode_steps`` forwards.
- ``total_ms`` = ``prefill_ms + decode_ms``: the whole ``generate`` call.

On CUDA every time point is taken after ``torch.cuda.synchronize`` on each device the model uses
(four synchronisations per ``generate`` call, none per decode step); on CPU ``perf_counter`` alone.
Peak memory: ``torch.cuda.max_memory_allocated`` after resetting the peak at ``generate`` entry,
summed over the model's devices (``None`` on CPU). All times of a batch are the batch's times.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["GenerateCall", "GenerateTimer", "versions", "generated_tokens"]


def versions() -> dict[str, str | None]:
    """Versions of the packages that decide the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    import transformers

    def pkg(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"v2drop_eval": pkg("v2drop-eval"), "torch": torch.__version__,
            "transformers": transformers.__version__, "lmms_eval": pkg("lmms_eval")}


@dataclass
class GenerateCall:
    """What one ``generate`` call measured. Times in ms; per-row lists follow the batch rows."""

    batch_size: int
    prefill_ms: float | None = None
    prefill_forward_ms: float | None = None
    decode_ms: float | None = None
    total_ms: float | None = None
    forwards: int = 0
    generated_tokens: list[int] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    stats: list[dict[str, Any]] = field(default_factory=list)  # the engine's last_stats, one per row

    @property
    def decode_steps(self) -> int:
        return max(self.forwards - 1, 0)


class _Active:
    def __init__(self) -> None:
        self.forwards = 0
        self.t_first_start = 0.0
        self.t_first_end = 0.0


class GenerateTimer:
    """Times every ``generate`` call of ``model`` while enabled, and keeps the engine's row stats.

    ``stats_source``: returns the dropper's ``last_stats`` (read after each ``generate``).
    """

    def __init__(self, model: nn.Module, stats_source: Callable[[], list[dict[str, Any]]]):
        self.model = model
        self.stats_source = stats_source
        self.enabled = True
        self.calls: list[GenerateCall] = []
        self._active: _Active | None = None
        self._devices = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
        self._orig_generate = model.generate
        # Prepended, so that the prefill time includes the dropper's own pre-hook.
        self._hooks = [
            model.register_forward_pre_hook(self._pre, prepend=True),
            model.register_forward_hook(self._post, always_call=True),
        ]
        model.generate = self._generate  # instance attribute: the lmms-eval classes call model.generate

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self.model.__dict__.get("generate") == self._generate:  # bound methods: equal, not identical
            del self.model.generate

    # -- timing --------------------------------------------------------------------------------
    def _sync(self) -> None:
        for device in self._devices:
            torch.cuda.synchronize(device)

    def _now(self) -> float:
        self._sync()
        return time.perf_counter()

    def _pre(self, module: nn.Module, args: tuple) -> None:
        active = self._active
        if active is not None and active.forwards == 0:
            active.t_first_start = self._now()

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        active = self._active
        if active is None:
            return
        active.forwards += 1
        if active.forwards == 1:
            active.t_first_end = self._now()

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled or self._active is not None:
            return self._orig_generate(*args, **kwargs)
        active = _Active()
        for device in self._devices:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = self._now()
        self._active = active
        try:
            out = self._orig_generate(*args, **kwargs)
        finally:
            self._active = None
        t2 = self._now()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        sequences = getattr(out, "sequences", out)
        batch = int(input_ids.shape[0]) if isinstance(input_ids, torch.Tensor) else int(sequences.shape[0])
        call = GenerateCall(batch_size=batch, forwards=active.forwards, total_ms=(t2 - t0) * 1e3)
        if active.forwards:
            call.prefill_ms = (active.t_first_end - t0) * 1e3
            call.prefill_forward_ms = (active.t_first_end - active.t_first_start) * 1e3
            call.decode_ms = (t2 - active.t_first_end) * 1e3
        if isinstance(input_ids, torch.Tensor) and isinstance(sequences, torch.Tensor):
            eos = kwargs.get("eos_token_id", getattr(self.model.generation_config, "eos_token_id", None))
            call.generated_tokens = generated_tokens(sequences[:, input_ids.shape[1]:], eos)
        if self._devices:
            call.peak_memory_bytes = int(sum(torch.cuda.max_memory_allocated(d) for d in self._devices))
        call.stats = _rows(list(self.stats_source() or []), len(call.generated_tokens) or batch)
        self.calls.append(call)
        return out

    @contextmanager
    def paused(self):
        """Nothing recorded inside (warm-up)."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled

    def take(self) -> list[GenerateCall]:
        """The calls recorded since the last ``take``."""
        calls, self.calls = self.calls, []
        return calls


def generated_tokens(new: torch.Tensor, eos: int | Sequence[int] | None) -> list[int]:
    """New tokens per row up to and including the first EOS (later ones are padding)."""
    if eos is None:
        return [int(new.shape[1])] * int(new.shape[0])
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=new.device)
    hit = torch.isin(new, eos_ids)
    first = torch.where(hit.any(1), hit.float().argmax(1) + 1, torch.full_like(hit[:, 0], new.shape[1], dtype=torch.long))
    return [int(x) for x in first.tolist()]


def _rows(stats: list[dict[str, Any]], batch: int) -> list[dict[str, Any]]:
    """The engine's stats per batch row; beam search expands each row k times (identical copies)."""
    if len(stats) == batch or not stats:
        return stats
    if batch and len(stats) % batch == 0:
        k = len(stats) // batch
        return stats[::k]
    return []
