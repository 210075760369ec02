"""What a dropping method is: the signal it needs, its schedule rules, its presets, and its scorer.

A method never touches the model. The engine (``v2drop_eval.engine.hooks``) gathers, masks and accounts; at
each drop layer it hands the method a :class:`ScoreContext` holding the signals the method asked for,
and the method returns per-row scores for the alive vision tokens (higher = more worth keeping). The
engine keeps each row's top ``keep`` by score, ties to the earlier slot.

Light on purpose: nothing here imports torch, so the registry can be read before anything loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

__all__ = ["Method", "ScoreContext", "QueryContext", "Merge", "Option", "FLOAT32_SCORES", "EXACT_COUNTS",
           "OPTION_SEPARATOR", "KEEP", "RENUMBER", "POSITION_RULES", "SIGNALS", "PREV_HIDDEN", "PREV_ATTENTION",
           "PREV_ATTENTION_WEIGHTS", "PREV_KEYS", "PREV_QUERY_ATTENTION", "PROBE_ATTENTION", "NORMED_HIDDEN",
           "ROW_IDENTITY"]

# The signals the engine can provide at a drop layer l (all aligned with the alive slots ``[B, n]``).
PREV_HIDDEN = "prev_hidden"  # [B, n, D] hidden states entering layer l-1
PREV_ATTENTION = "prev_attention"  # [B, n] last query row's attention at layer l-1, head-averaged
# [B, n] the same row as published FastV reads it: layer l-1 run with eager attention at prefill, its
# attention weights [B, H, n, n] (what ``output_attentions`` returns) averaged over heads, last row
PREV_ATTENTION_WEIGHTS = "prev_attention_weights"
PREV_KEYS = "prev_keys"  # [B, H, n, hd] layer l-1's keys after rotary, repeated to the query heads (as eager uses them)
PROBE_ATTENTION = "probe_attention"  # [B, n] last query row's attention with layer l's own q/k on its input
NORMED_HIDDEN = "normed_hidden"  # [B, n, D] the hidden states entering l, through the decoder's final norm
ROW_IDENTITY = "row_identity"  # (each row's real tokens as bytes, [B, n] ordinal among its vision tokens, table size)
# ([B, R, n], [B, R]) the attention rows of the method's query tokens (``Method.query_rows``, chosen once per
# prefill from the decoder's input embeddings) at layer l-1: softmax over every key, averaged over heads, in
# the model's dtype; the second tensor says which of a row's R slots hold a query token
PREV_QUERY_ATTENTION = "prev_query_attention"
SIGNALS = (PREV_HIDDEN, PREV_ATTENTION, PREV_ATTENTION_WEIGHTS, PREV_KEYS, PREV_QUERY_ATTENTION, PROBE_ATTENTION,
           NORMED_HIDDEN, ROW_IDENTITY)

# How rotary positions follow a drop (``positions=``, default ``Method.positions``; ``engine/positions.py``):
KEEP = "keep"  # each token keeps its own rotary position (V2Drop, FastV, DART as their authors' code does)
# the gaps the removed tokens leave are closed, per row (PyramidDrop, SparseVLM; VisionZip's and LLaVA's own
# code before the LLM; docs/design.md §2)
RENUMBER = "renumber"
POSITION_RULES = (KEEP, RENUMBER)


@dataclass(frozen=True)
class Option:
    """A deliberate departure from a method's published rule: off by default, named, declared once (here
    for the ones several methods take, in the method's file otherwise) and listed in docs/methods.md
    with its measured effect."""

    name: str
    summary: str  # one line: what it changes


OPTION_SEPARATOR = "+"  # between option names in one value (``a+b``): lmms-eval splits model args on commas
FLOAT32_SCORES = Option("float32_scores", "score in float32 (the authors' code scores in the model's dtype)")
EXACT_COUNTS = Option("exact_counts", "keep floor(alive x keep_ratio) at every stage, in exact decimal arithmetic "
                                      "(the same count for every method at the same schedule)")


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
    ratios: tuple[float, ...] = ()  # keep ratios of the fixed stages so far, this one last (empty: adaptive)
    initial: torch.Tensor | None = None  # [B] vision tokens each row had before the first stage
    row_pos: torch.Tensor | None = None  # [B, n] each slot's index among its row's real tokens (the row alone)
    options: frozenset[str] = frozenset()  # the options the method runs with

    @property
    def alive(self) -> torch.Tensor:
        """[B] alive vision tokens per row."""
        return self.candidates.sum(1)


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
    pre_llm: ClassVar[bool] = False  # drops before the LLM (its one stage is '0:D+C'), not inside the decoder
    positions: ClassVar[str] = KEEP  # its authors' rule for positions (POSITION_RULES)
    takes_metric: ClassVar[bool] = False
    takes_seed: ClassVar[bool] = False
    # family preset table ('llava', 'qwen2_vl') -> budget -> schedule text
    presets: ClassVar[dict[str, dict[str | int, str]]] = {}
    options: ClassVar[tuple[Option, ...]] = ()  # the named departures from its published rule it takes
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

    def pre_llm_problem(self, counts: Any, patches: int) -> str | None:
        """Why the pre-LLM ``counts`` (``schedule.ZipCounts``) cannot run on crops of ``patches`` patches
        (None if they can)."""
        return None

    def fit_pre_llm(self, counts: Any, patches: int) -> Any:
        """The preset's pre-LLM ``counts`` for an encoder with ``patches`` patches per crop."""
        return counts

    # -- a method that reads the attention rows of prompt tokens it chooses ----------------------------
    def query_rows(self, ctx: QueryContext) -> torch.Tensor:
        """``[B, S]`` bool: the prompt tokens whose attention rows ``PREV_QUERY_ATTENTION`` records. Only
        non-vision tokens (they are never dropped, so the rows exist at every stage)."""
        raise NotImplementedError(f"method {self.name} needs {PREV_QUERY_ATTENTION} but chooses no query rows")

    def merge(self, ctx: ScoreContext, scores: torch.Tensor, kept: torch.Tensor) -> Merge | None:
        """Tokens to add after the engine kept ``kept [B, n]`` (bool over the slots of ``ctx``) by
        ``scores``; None (the default) adds none."""
        return None

    @property
    def merges(self) -> bool:
        """Whether the method adds merged tokens (it overrides :meth:`merge`)."""
        return type(self).merge is not Method.merge

    def merged_count(self, dropped: int) -> int:
        """How many merged tokens a stage that drops ``dropped`` vision tokens adds (the schedule maths count
        them: ``DropSchedule.tokens_per_layer``); 0 for a method that merges none."""
        return 0

    def refit(self, scaled: Any, target: float, num_vision_tokens: int, num_layers: int) -> Any:
        """For a model shallower than the presets' (``methods.presets.scaled_schedule``): this method's preset
        with its layers already scaled (a ``DropSchedule``; typed ``Any`` because ``engine/schedule.py`` imports
        this module), refitted to the layer-averaged ``target``; None: the default refit."""
        return None

    # -- counts ---------------------------------------------------------------------------------
    def keep_count(self, alive: int, ratios: tuple[float, ...], initial: int,
                   options: frozenset[str] = frozenset(), **row: Any) -> int:
        """The method's own count: vision tokens a row keeps at a stage. ``ratios`` are the keep ratios of
        the stages so far (this one last), ``alive`` the row's vision tokens before this stage, ``initial``
        before the first. Default: ``floor(alive x ratio)`` in exact decimal arithmetic."""
        return exact_floor(alive, ratios[-1])

    def stage_keep(self, alive: int, ratios: tuple[float, ...], initial: int,
                   options: frozenset[str] = frozenset(), **row: Any) -> int:
        """What the engine and the schedule maths use: :meth:`keep_count` (or the exact floor under
        ``exact_counts``), within [0, alive]; a stage of ratio 1 keeps every token."""
        if alive <= 0:
            return 0
        if ratios[-1] >= 1:
            return alive
        if EXACT_COUNTS.name in options:
            return exact_floor(alive, ratios[-1])
        return max(0, min(alive, int(self.keep_count(alive, ratios, initial, options, **row))))

    def keep_counts(self, ctx: ScoreContext) -> torch.Tensor:
        """``[B]`` tokens each row of ``ctx`` keeps at this stage (:meth:`stage_keep` per row)."""
        import torch

        alive, initial = ctx.alive.tolist(), ctx.initial.tolist()
        counts = [self.stage_keep(a, ctx.ratios, i, ctx.options) for a, i in zip(alive, initial, strict=True)]
        return torch.tensor(counts, dtype=torch.long, device=ctx.candidates.device)

    def __repr__(self) -> str:
        return f"<method {self.name}>"


def exact_floor(alive: int, ratio: float) -> int:
    """``floor(alive x ratio)`` on the ratio's decimal form, free of float round-off (100 x 0.29 keeps 29)."""
    return math.floor(alive * Fraction(repr(float(ratio))))
