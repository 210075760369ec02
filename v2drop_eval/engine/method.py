"""What a dropping method is: the signal it needs, its schedule rules, its presets, and its scorer.

A method never touches the model. The engine (``v2drop_eval.engine.hooks``) gathers, masks and accounts; at
each drop layer it hands the method a :class:`ScoreContext` holding the signals the method asked for,
and the method returns per-row scores for the alive vision tokens (higher = more worth keeping). The
engine keeps each row's top ``keep`` by score, ties to the earlier slot.

Light on purpose: nothing here imports torch, so the registry can be read before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from v2drop_eval.engine.schedule import ZipCounts

__all__ = ["Method", "ScoreContext", "SIGNALS", "PREV_HIDDEN", "PREV_ATTENTION", "PREV_ATTENTION_WEIGHTS", "PREV_KEYS",
           "PROBE_ATTENTION", "NORMED_HIDDEN", "ROW_IDENTITY", "POSITION_RULES", "KEEP", "RENUMBER"]

# The signals the engine can provide at a drop layer l (all aligned with the alive slots ``[B, n]``).
PREV_HIDDEN = "prev_hidden"  # [B, n, D] hidden states entering layer l-1
PREV_ATTENTION = "prev_attention"  # [B, n] last query row's attention at layer l-1, head-averaged
# [B, n] the same row as published FastV reads it: layer l-1 run with eager attention at prefill, its
# attention weights [B, H, n, n] (what ``output_attentions`` returns) averaged over heads, last row
PREV_ATTENTION_WEIGHTS = "prev_attention_weights"
PREV_KEYS = "prev_keys"  # [B, Hkv, n, hd] layer l-1's keys after rotary, as its attention kernel gets them
PROBE_ATTENTION = "probe_attention"  # [B, n] last query row's attention with layer l's own q/k on its input
NORMED_HIDDEN = "normed_hidden"  # [B, n, D] the hidden states entering l, through the decoder's final norm
ROW_IDENTITY = "row_identity"  # (each row's real tokens as bytes, [B, n] ordinal among its vision tokens, table size)
SIGNALS = (PREV_HIDDEN, PREV_ATTENTION, PREV_ATTENTION_WEIGHTS, PREV_KEYS, PROBE_ATTENTION, NORMED_HIDDEN, ROW_IDENTITY)

# How rotary positions follow tokens removed (``positions=``; ``Method.positions`` is the method's authors'
# rule): "keep" (every token keeps its position in the full prompt) or "renumber" (the shorter sequence is
# numbered again, closing the gaps: VisionZip's and LLaVA's own code before the LLM).
KEEP, RENUMBER = "keep", "renumber"
POSITION_RULES = (KEEP, RENUMBER)


@dataclass
class ScoreContext:
    """One drop layer of one prefill, as a method sees it."""

    layer: int
    hidden: torch.Tensor  # [B, n, D] entering the drop layer
    candidates: torch.Tensor  # [B, n] alive vision tokens (the droppable ones)
    text: torch.Tensor  # [B, n] real non-vision tokens
    idx: torch.Tensor  # [B, n] original positions of the slots
    keep: torch.Tensor | None  # [B] vision tokens each row keeps (None while an adaptive stage counts)
    metric: str
    seed: int
    signals: dict[str, Any] = field(default_factory=dict)


class Method:
    """A dropping method. Subclass, set the class attributes, implement :meth:`score`, and register
    an instance in ``v2drop_eval/methods/__init__.py``. Which schedules it takes follows from
    ``drops``, ``multi_stage`` and ``adaptive`` (``v2drop_eval.methods.rules.schedule_problem``)."""

    name: ClassVar[str]
    label: ClassVar[str]  # how tables and plots name it
    summary: ClassVar[str]  # one line: what it keeps
    source: ClassVar[str] = ""  # where its rule comes from
    needs: ClassVar[frozenset[str]] = frozenset()  # signals from SIGNALS
    drops: ClassVar[bool] = True  # False: the unpruned baseline
    multi_stage: ClassVar[bool] = True  # False: exactly one drop stage
    adaptive: ClassVar[bool] = False  # takes adaptive stages (layer:tT:MIN:MAX)
    pre_llm: ClassVar[bool] = False  # drops before the LLM (its one stage is '0:D+C'), not inside the decoder
    positions: ClassVar[str] = KEEP  # its authors' rule for positions (POSITION_RULES)
    takes_metric: ClassVar[bool] = False
    takes_seed: ClassVar[bool] = False
    # family preset table ('llava', 'qwen2_vl') -> budget -> schedule text
    presets: ClassVar[dict[str, dict[str | int, str]]] = {}
    style: ClassVar[tuple[str, str]] = ("tab:brown", "X")  # (matplotlib colour, marker) in the plots

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """``[B, n]`` scores for the slots of ``ctx`` (only ``ctx.candidates`` matter)."""
        raise NotImplementedError

    # -- a method that drops before the LLM (``pre_llm``), at the vision encoder's output ---------------
    def pre_llm_tokens(self, hidden: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor,
                       dominant: int, contextual: int) -> torch.Tensor:
        """The tokens each crop sends to the LLM, ``[B, dominant + contextual, d]``, from the feature
        layer's ``hidden [B, 1 + N, d]`` ([CLS] first), the [CLS] row's attention over the patches
        ``[B, N]`` and the block's keys averaged over heads ``[B, 1 + N, k]``."""
        raise TypeError(f"method {self.name} does not drop before the LLM")

    def pre_llm_problem(self, counts: ZipCounts, patches: int) -> str | None:
        """Why the pre-LLM ``counts`` cannot run on crops of ``patches`` patches (None if they can)."""
        return None

    def fit_pre_llm(self, counts: ZipCounts, patches: int) -> ZipCounts:
        """The preset's pre-LLM ``counts`` for an encoder with ``patches`` patches per crop."""
        return counts

    def __repr__(self) -> str:
        return f"<method {self.name}>"
