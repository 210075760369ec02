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

    from v2drop_eval.engine.schedule import DropSchedule

__all__ = ["Method", "ScoreContext", "QueryContext", "Merge", "SIGNALS", "POSITION_RULES", "PREV_HIDDEN",
           "PREV_ATTENTION", "PREV_ATTENTION_WEIGHTS", "PREV_KEYS", "PREV_QUERY_ATTENTION", "PROBE_ATTENTION",
           "NORMED_HIDDEN", "ROW_IDENTITY"]

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
# ([B, R, n], [B, R]) the attention rows of the method's query tokens (``Method.query_rows``, chosen once per
# prefill from the decoder's input embeddings) at layer l-1: softmax over every key, averaged over heads, in
# the model's dtype; the second tensor says which of a row's R slots hold a query token
PREV_QUERY_ATTENTION = "prev_query_attention"
SIGNALS = (PREV_HIDDEN, PREV_ATTENTION, PREV_ATTENTION_WEIGHTS, PREV_KEYS, PREV_QUERY_ATTENTION, PROBE_ATTENTION,
           NORMED_HIDDEN, ROW_IDENTITY)
# How rotary positions follow a drop (``Method.positions``): "keep" (every token keeps its own position) or
# "renumber" (from the drop layer on, a row's tokens are numbered 0, 1, ... again from its first position, and
# new tokens continue from the count kept, as SparseVLM's and PyramidDrop's code do). "renumber" applies
# where the decoder's positions are one number per token; multimodal rotary (M-RoPE) keeps positions.
POSITION_RULES = ("keep", "renumber")


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


@dataclass
class QueryContext:
    """A prefill's input, as :meth:`Method.query_rows` sees it (original positions ``[B, S]``)."""

    embeddings: torch.Tensor  # [B, S, D] the hidden states entering decoder layer 0
    vision: torch.Tensor  # [B, S] real vision tokens
    text: torch.Tensor  # [B, S] real non-vision tokens


@dataclass
class Merge:
    """Tokens a method adds at a drop layer (:meth:`Method.merge`): each a weighted sum of the hidden
    states entering the layer. They count as vision tokens from then on (later stages may drop them).

    Where they sit: with kept positions, each at the position of its ``anchor`` (a token dropped at this
    layer), in position order; with renumbered positions, right after the row's last vision token (before
    the text that follows it), in the order given. Either way the anchor's position is its identity in
    ``DropHandle.last_layouts``.
    """

    weights: torch.Tensor  # [B, M, n] over the slots of the ScoreContext (zero outside a merged token's sources)
    valid: torch.Tensor  # [B, M] whether row b has its m-th merged token
    anchor: torch.Tensor  # [B, M] slot of a token dropped at this layer (any slot where ``valid`` is False)


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
    takes_metric: ClassVar[bool] = False
    takes_seed: ClassVar[bool] = False
    # family preset table ('llava', 'qwen2_vl') -> budget -> schedule text
    presets: ClassVar[dict[str, dict[str | int, str]]] = {}
    positions: ClassVar[str] = "keep"  # one of POSITION_RULES
    style: ClassVar[tuple[str, str]] = ("tab:brown", "X")  # (matplotlib colour, marker) in the plots

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """``[B, n]`` scores for the slots of ``ctx`` (only ``ctx.candidates`` matter)."""
        raise NotImplementedError

    def query_rows(self, ctx: QueryContext) -> torch.Tensor:
        """``[B, S]`` bool: the prompt tokens whose attention rows ``PREV_QUERY_ATTENTION`` records. Only
        non-vision tokens (they are never dropped, so the rows exist at every stage)."""
        raise NotImplementedError(f"method {self.name} needs {PREV_QUERY_ATTENTION} but chooses no query rows")

    def merge(self, ctx: ScoreContext, scores: torch.Tensor, kept: torch.Tensor) -> Merge | None:
        """Tokens to add after the engine kept ``kept [B, n]`` (bool over the slots of ``ctx``) by
        ``scores``; None (the default) adds none."""
        return None

    def tokens_per_layer(self, schedule: DropSchedule, num_vision_tokens: int, num_layers: int) -> list[int]:
        """Vision tokens entering each decoder layer for an image of ``num_vision_tokens`` (a method that
        merges counts its merged tokens too)."""
        return schedule.tokens_per_layer(num_vision_tokens, num_layers)

    def average_tokens(self, schedule: DropSchedule, num_vision_tokens: int, num_layers: int) -> float:
        """The layer-averaged vision-token count ("retained") of ``schedule`` under this method's counting."""
        per_layer = self.tokens_per_layer(schedule, num_vision_tokens, num_layers)
        return sum(per_layer) / len(per_layer)

    def refit(self, scaled: DropSchedule, target: float, num_vision_tokens: int, num_layers: int) -> DropSchedule | None:
        """For a model shallower than the presets' (``methods.presets.scaled_schedule``): this method's preset with
        its layers already scaled, refitted to the layer-averaged ``target``; None: the default refit."""
        return None

    def __repr__(self) -> str:
        return f"<method {self.name}>"
