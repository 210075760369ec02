"""Position handling after a drop: with ``positions=renumber`` the kept tokens' rotary positions are
renumbered so that the gaps the dropped tokens leave are closed, per row, at prefill and at every decode step.

Which rule runs (:func:`renumbering`): the one the user names (``positions=keep|renumber``: ``attach``, the
model args, sweep configs), else the method's authors' rule (``Method.positions``): ``renumber`` for
PyramidDrop (Cooperx521/PyramidDrop@6444f30, ``llava/model/modeling_llama_pdrop.py``: after a stage a row's
kept tokens are numbered ``arange(cur_len)`` and decode positions are shifted down by the tokens dropped)
and SparseVLM (Gumpest/SparseVLMs v1.5: ``position_ids[:, :len(kept)]``, decode at the layer's cache
length), ``keep`` for the others; under ``keep`` nothing here runs and each kept token keeps its own
rotary position (the engine gathers the model's cos/sin). For each stage :class:`Renumbering` replaces a
layer's ``position_embeddings`` (cos, sin) and ``position_ids`` by renumbered ones.

Read for any rotary family (docs/design.md §2): a position value that only dropped tokens held is taken
off the number line and every value above it moves down by one. With 1-D positions numbered 0..S-1
(LLaVA, InternVL, the text of every family) that is exactly the originals' ``arange(cur_len)``, and a
decode position moves down by the number of tokens dropped. With M-RoPE's 3-D positions (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL; no published PyramidDrop code covers them) a value is gone only when no kept
token holds it on any axis: an image's remaining grid keeps its shape, and the text after it moves down
by the rows and columns that emptied entirely.

Merged tokens (SparseVLM's recycled ones, ``merging.py``) sit after the row's last kept vision token and
take their mask row and column from ``Layout.keys`` (the kept positions plus borrowed dropped ones, in
order); renumbering reads those keys, so with 1-D positions the slots are numbered along the row, as the
original appends its recycled tokens. On M-RoPE a merged token has no place on the image grid: there a
merging method keeps positions (a recycled token at its cluster centre's, as ModelTC/llmc's SparseVLM), and
``positions=renumber`` is refused.

The new ids go through the decoder's own rotary module (``decoder.rotary_emb``), so cos and sin come
from the model's code. Nothing is renumbered while nothing is dropped (keep ratio 1 stays bit-identical).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from v2drop_eval.engine import contract
from v2drop_eval.engine.adapters import ModelAdapter
from v2drop_eval.engine.method import KEEP, RENUMBER, Method

__all__ = ["Renumbering", "renumbering", "closed_gaps", "renumber"]


def renumbering(method: Method, asked: str | None, adapter: ModelAdapter, model_name: str) -> Renumbering | None:
    """The renumbering a drop of ``method`` runs with (None: positions kept): ``asked`` (``positions=``; None:
    the method's own rule). ``ValueError`` where renumbering cannot place the method's merged tokens (M-RoPE)."""
    rule = asked or method.positions
    if rule == RENUMBER and adapter.rotary is None and method.merges:
        if asked is not None:
            raise ValueError(f"positions=renumber cannot place method {method.name}'s merged tokens on {model_name}'s "
                             "multimodal rotary positions (M-RoPE): use positions=keep (its default there)")
        rule = KEEP
    return Renumbering(adapter.decoder) if rule == RENUMBER else None


def closed_gaps(pos: torch.Tensor, real: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``below [B, V]``: per row, how many position values up to ``v`` only dropped tokens held.

    ``pos [A, B, S]`` the rotary ids (A axes), ``real [B, S]`` the row's real tokens, ``kept [B, S]`` those
    still kept. A kept token at value ``v`` moves to ``v - below[v]``; a later (decode) one by ``below[-1]``.
    """
    A, B, S = pos.shape
    values = pos.clamp(min=0)
    size = int(values.max()) + 1 if values.numel() else 1
    held = torch.zeros(B, size, dtype=torch.long, device=pos.device)
    still = torch.zeros_like(held)
    for axis in range(A):
        held.scatter_add_(1, values[axis], real.long())
        still.scatter_add_(1, values[axis], kept.long())
    return ((held > 0) & (still == 0)).long().cumsum(1)


def renumber(pos: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
    """``pos [A, B, n]`` moved down by the values closed below each (``below`` from :func:`closed_gaps`)."""
    index = pos.clamp(0, below.shape[1] - 1)
    return pos - torch.stack([below.gather(1, index[axis]) for axis in range(pos.shape[0])])


def _as_axes(pid: torch.Tensor, batch: int) -> torch.Tensor:
    """Position ids as ``[A, B, S]`` (1-D ids ``[B|1, S]`` get one axis; a shared batch row is expanded)."""
    pid = pid[None] if pid.dim() == 2 else pid
    return pid.expand(pid.shape[0], batch, pid.shape[-1]).long()


def _like(new: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """``new [A, B, n]`` in the layout and dtype of ``original`` (2-D ids come back 2-D)."""
    return (new[0] if original.dim() == 2 else new).to(original.dtype)


class Renumbering:
    """Closes the gaps dropped tokens leave in the rotary positions of one attached model.

    A pre-hook on the decoder's rotary module records the position ids of each forward call (prefill and
    decode steps); the engine asks for a layer's (cos, sin) and ``position_ids`` at a stage's kept slots.
    """

    def __init__(self, decoder: nn.Module) -> None:
        rotary = getattr(decoder, "rotary_emb", None)
        if not isinstance(rotary, nn.Module):
            raise contract.contract_error(
                f"{type(decoder).__name__} has no rotary_emb module: renumbered positions need the decoder's own rotary"
            )
        self.rotary = rotary
        self._busy = False
        self.ids: torch.Tensor | None = None  # what the rotary got at the current forward call
        self._prefill: torch.Tensor | None = None  # [A, B, S] at the prefill
        self._real: torch.Tensor | None = None  # [B, S]
        self._below: dict[tuple[int, str], torch.Tensor] = {}  # (stage, "rotary"|"text") -> below [B, V]
        # (stage, id(source)) -> (renumbered, source) for the current forward call: every layer of a stage
        # gets the same model-wide rotary pair and ids, so they are renumbered once per call
        self._memo: dict[tuple[int, int], tuple[Any, Any]] = {}
        self._hook = rotary.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._busy:
            self.ids = args[1] if len(args) > 1 else kwargs.get("position_ids")
            self._memo.clear()

    def _once(self, stage: int, source: Any, build: Any) -> Any:
        key = (stage, id(source))
        if key not in self._memo:
            self._memo[key] = (build(), source)
        return self._memo[key][0]

    def start(self, real: torch.Tensor) -> None:
        """A new prefill whose real tokens are ``real [B, S]`` (its ids are recorded when the rotary runs)."""
        self._real, self._prefill, self.ids = real, None, None
        self._below.clear()
        self._memo.clear()

    def remove(self) -> None:
        self._hook.remove()

    def _stage_below(self, stage: int, kind: str, pos: torch.Tensor, idx: torch.Tensor,
                     valid: torch.Tensor) -> torch.Tensor:
        key = (stage, kind)
        if key not in self._below:
            kept = torch.zeros_like(self._real).scatter(1, idx, valid) & self._real
            self._below[key] = closed_gaps(pos, self._real, kept)
        return self._below[key]

    def _rotary(self, hidden: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._busy = True
        try:
            return self.rotary(hidden, position_ids=ids)
        finally:
            self._busy = False

    def prefill_inputs(self, stage: int, idx: torch.Tensor, valid: torch.Tensor, hidden: torch.Tensor,
                       kwargs: dict, out: dict) -> dict:
        """``out`` (a layer's inputs gathered at the slots ``idx``/``valid`` of ``stage``: ``Layout.keys``) with
        the rotary pair and ``position_ids`` renumbered; ``kwargs`` are the layer's inputs as the model built them."""
        B = idx.shape[0]
        if self._prefill is None:
            if self.ids is None:
                raise contract.contract_error("the decoder's rotary module was not called before its layers")
            self._prefill = _as_axes(self.ids, B)
        out = dict(out)
        pe, pid = kwargs.get("position_embeddings"), kwargs.get("position_ids")
        if isinstance(pe, tuple):
            def rotary() -> tuple[torch.Tensor, torch.Tensor]:
                below = self._stage_below(stage, "rotary", self._prefill, idx, valid)
                slots = torch.stack([a.gather(1, idx) for a in self._prefill])
                return self._rotary(hidden, _like(renumber(slots, below), self.ids))

            out["position_embeddings"] = self._once(stage, pe, rotary)
        if isinstance(pid, torch.Tensor):
            def text() -> torch.Tensor:
                ids = _as_axes(pid, B)
                below = self._stage_below(stage, "text", ids, idx, valid)
                return _like(renumber(torch.stack([a.gather(1, idx) for a in ids]), below), pid)

            out["position_ids"] = self._once(stage, pid, text)
        return out

    def decode_inputs(self, stage: int, hidden: torch.Tensor, kwargs: dict, out: dict) -> dict:
        """A decode step's layer inputs at ``stage``: positions moved down by the values closed there."""
        out = dict(out)
        B = hidden.shape[0]
        pe, pid = kwargs.get("position_embeddings"), kwargs.get("position_ids")
        if isinstance(pe, tuple) and (stage, "rotary") in self._below:
            below = self._below[(stage, "rotary")]
            out["position_embeddings"] = self._once(stage, pe, lambda: self._rotary(
                hidden, _like(renumber(_as_axes(self.ids, B), below), self.ids)))
        if isinstance(pid, torch.Tensor) and (stage, "text") in self._below:
            below = self._below[(stage, "text")]
            out["position_ids"] = self._once(stage, pid, lambda: _like(renumber(_as_axes(pid, B), below), pid))
        return out
