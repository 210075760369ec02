"""The dropping engine: forward pre-hooks that shorten the decoder's sequence at the drop layers.

How it works (docs/design.md §2): the decoder builds one mask, one rotary (cos, sin) pair and one
``position_ids`` of the full prefill length S and hands the same objects to every layer. A pre-hook on
each layer from the first drop layer on swaps them for copies gathered at the kept positions, and at
a drop layer also gathers ``hidden_states``. The per-layer ``DynamicCache`` then simply holds fewer
entries for later layers. At decode, each pruned layer's mask columns are gathered with its own kept
positions plus the new tokens; rotary positions of new tokens stay the true ones, unless positions are
renumbered (``positions=renumber``, PyramidDrop's and SparseVLM's rule: ``positions.py``).

Rows of a batch may keep different numbers of tokens: the gathered batch is cut to the longest row and
the shorter rows get surplus slots on the left, masked out as keys (each keeps its own diagonal so no
attention row is empty). No transformers ``forward`` is copied; removing the hooks restores the model.

Tokens removed before the LLM (VisionZip, ``encoder_schedule=``: ``engine/before_llm.py``) shorten the
decoder's inputs; the decoder stages then run on that sequence (its slots are the layout's coordinates).
"""

from __future__ import annotations

import weakref
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from v2drop_eval.engine import contract, gather, merging, refusals
from v2drop_eval.engine.adapters import ModelAdapter, adapter_for
from v2drop_eval.engine.before_llm import BeforeLLM, before_llm_checks
from v2drop_eval.engine.call import Call
from v2drop_eval.engine.clock import DropperClock
from v2drop_eval.engine.method import FLOAT32_SCORES, OPTION_SEPARATOR, Method, ScoreContext
from v2drop_eval.engine.positions import Renumbering, renumbering
from v2drop_eval.engine.schedule import Adaptive, DropSchedule
from v2drop_eval.engine.signals import Signals

__all__ = ["DropHandle"]


class DropHandle:
    """Hooks of one attached dropper. ``detach()`` (or leaving a ``with`` block) removes them.

    Made by ``v2drop_eval.attach``, which resolves the method by name and checks the arguments by the rules
    every entry point shares; here ``method`` is the :class:`Method` itself, ``schedule`` a parsed one,
    ``options`` the checked names of the method's options it runs with, ``encoder_schedule`` the stages
    inside the vision encoder (parsed) and ``positions`` (``keep`` | ``renumber``; None: the method's own
    rule) how rotary positions follow tokens removed, in the decoder and before it (``engine/positions.py``).
    """

    def __init__(self, model: nn.Module, schedule: DropSchedule, method: Method, metric: str, seed: int,
                 options: frozenset[str] = frozenset(), encoder_schedule: DropSchedule | None = None,
                 positions: str | None = None):
        self.adapter: ModelAdapter = adapter_for(model)
        schedule.check_depth(self.adapter.num_layers)
        self.options: frozenset[str] = frozenset(options)
        if getattr(model, "_v2drop_handle", None) is not None:
            raise RuntimeError("this model already has a dropper attached; call detach() on it first")
        refusals.check_attention(self.adapter.attn_implementation)
        spec = self.adapter.encoder
        pre_llm_positions = before_llm_checks(self.adapter, method, schedule.pre_llm, encoder_schedule, positions)
        self.model, self.schedule, self.method = model, schedule, method.name
        # positions: as given; pre_llm_positions: the rule in force for tokens removed before the LLM
        self.encoder_schedule, self.positions, self.pre_llm_positions = encoder_schedule, positions, pre_llm_positions
        self.metric, self.seed = metric, int(seed)
        self.text_config = self.adapter.text_config
        self._last_stats: list[dict[str, Any]] | Any = []  # or a builder, run on first read (see last_stats)
        self.last_layouts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Drop layers where the method merged tokens at the last prefill -> how the slots were filled (tests'
        # masking references read it).
        self.last_transfers: dict[int, merging.Transfer] = {}
        self._method = method
        self._llm = DropSchedule(schedule.llm_stages)  # the decoder's stages
        self._ratios: dict[int, Fraction | Adaptive] = {
            layer: r if isinstance(r, Adaptive) else Fraction(repr(r)) for layer, r in self._llm.stages
        }
        self._dropping = self._method.drops and not self._llm.is_empty
        self._call: Call | None = None  # the prefill being run, or whose layouts decode uses
        self._mode: str | None = None  # "prefill" | "decode" | None (hooks idle) for the current call
        self._cache_ref: weakref.ref | None = None
        self._hooks: list[Any] = []
        self._signals: Signals | None = None
        self._renumber: Renumbering | None = None

        if self._dropping:  # first: it may refuse, and then nothing is installed yet
            self._hooks += self.adapter.install_extras(self._positions, self._llm.layers)
            self._renumber = renumbering(method, positions, self.adapter, type(model).__name__)
        self._before: BeforeLLM | None = None
        if spec is not None and spec.layout:
            self._before = BeforeLLM(self.adapter, encoder_schedule, schedule.pre_llm, method.pre_llm_tokens,
                                     pre_llm_positions, self._rebase)
            self._hooks.append(self._before)
        top = self.adapter.top
        self._hooks.append(top.register_forward_pre_hook(self._on_top_call, with_kwargs=True))
        self._hooks.append(top.register_forward_hook(self._on_top_return, always_call=True))
        if self._dropping:
            # Stages that keep everything score nothing (so fastv_attn leaves its layer's kernel alone there).
            scored = tuple(layer for layer, r in self._ratios.items() if isinstance(r, Adaptive) or r != 1)
            self._signals = Signals(self.adapter, self._method, scored, float32=FLOAT32_SCORES.name in self.options)
            start = self._signals.first_hooked_layer(self._llm.layers[0])
            for layer in range(start, self.adapter.num_layers):
                hook = self.adapter.layers[layer].register_forward_pre_hook(self._layer_hook(layer), with_kwargs=True)
                self._hooks.append(hook)
        model._v2drop_handle = self

    # -- lifecycle ------------------------------------------------------------------------------
    def detach(self) -> None:
        """Remove every hook and restore the model exactly."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._signals is not None:
            self._signals.remove()
            self._signals = None
        if self._renumber is not None:
            self._renumber.remove()
            self._renumber = None
        if getattr(self.model, "_v2drop_handle", None) is self:
            del self.model._v2drop_handle
        self._call = self._mode = None

    def __enter__(self) -> DropHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        text = OPTION_SEPARATOR.join(o.name for o in self._method.options if o.name in self.options)
        opts = f", options={text!r}" if self.options else ""
        encoder = f", encoder_schedule='{self.encoder_schedule}'" if self.encoder_schedule else ""
        return f"DropHandle(method={self.method!r}, schedule='{self.schedule}'{encoder}, metric={self.metric!r}{opts})"

    # -- top-level hooks ----------------------------------------------------------------------
    def _on_top_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        # Every top call gets a clock; a prefill keeps it, a decode step's time joins its prefill's.
        clock = DropperClock(input_ids.device if isinstance(input_ids, torch.Tensor) else None)
        clock.open("bookkeeping")
        try:
            self._top_call(input_ids, kwargs, clock)
        finally:
            clock.close()
            if self._mode == "decode":
                self._call.clock.adopt(clock, "decode")

    def _top_call(self, input_ids: torch.Tensor | None, kwargs: dict, clock: DropperClock) -> None:
        cache = contract.cache_of(kwargs)
        self._mode = None
        refusals.check_cache_type(cache)
        if cache is not None:
            contract.check_cache(cache, self.adapter.num_layers)
        prefill = cache is None or cache.get_seq_length() == 0
        reduces = self._dropping or self._before is not None and self._before.reduces
        if input_ids is None:
            if reduces and prefill:
                raise ValueError(refusals.INPUTS_EMBEDS)
            return
        if prefill:
            if reduces and kwargs.get("labels") is not None:
                raise ValueError(refusals.LABELS)
            contract.check_prefill_call(input_ids, kwargs.get("attention_mask"))
            self._call = self._start_prefill(input_ids, kwargs.get("attention_mask"), clock)
            self._mode = "prefill"
            return
        if not self._dropping:
            return
        if self._call is None or self._cache_ref is None or self._cache_ref() is not cache:
            raise ValueError(refusals.FOREIGN_CACHE)
        refusals.check_decode_tokens(input_ids, self.adapter.vision_token_ids)
        self._call.gathered.clear()
        self._mode = "decode"

    def _on_top_return(self, module: nn.Module, args: tuple, output: Any) -> None:
        mode, self._mode = self._mode, None
        call = self._call
        if call is None:
            return
        call.clock.open("bookkeeping" if mode == "prefill" else "decode")
        try:
            call.gathered.clear()
            if mode == "prefill":
                call.layout = None
                if self._signals is not None:
                    self._signals.clear()
                if self._dropping and len(call.vision_alive) != len(self._ratios) + 1:
                    self._call = None  # the forward raised before the last drop layer: nothing to count or decode
                    return
                self._finish_stats(call)
        finally:
            call.clock.close()

    def _positions(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Original positions of the hidden states now between decoder layers (None: the whole sequence)."""
        call = self._call
        if self._mode != "prefill" or call is None or call.layout is None or call.layout is call.initial:
            return None
        return call.layout.idx, call.layout.valid

    def _start_prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, clock: DropperClock) -> Call:
        call = Call.start(input_ids, attention_mask, clock, self.adapter.vision_token_ids, self.adapter.video_token_ids)
        if self._before is not None:
            call.placeholders = self._before.placeholders(input_ids, call.real)
        self._restart(call)
        return call

    def _restart(self, call: Call) -> None:
        """Renumbering and signals follow the call's (initial or rebased) layout."""
        if self._renumber is not None:
            self._renumber.start(call.initial.valid)
        if self._signals is not None:
            self._signals.start(call.input_ids, call.real, call.ordinal, call.vision_alive[0], call.clock)

    def _rebase(self, idx: torch.Tensor, valid: torch.Tensor) -> None:
        """Tokens were removed before the LLM: the layout is rebased on the decoder's shorter sequence."""
        call = self._call
        if call is None or self._mode != "prefill":
            raise contract.contract_error("the decoder ran a prefill outside a call of the top model")
        call.clock.open("bookkeeping")
        try:
            call.rebase(idx, valid, self.adapter.video_token_ids)
            self._restart(call)
        finally:
            call.clock.close()

    # -- per-layer hook -----------------------------------------------------------------------
    def _layer_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            call, mode = self._call, self._mode
            if mode is None:
                return None
            call.clock.open("bookkeeping" if mode == "prefill" else "decode")
            try:
                return self._layer_inputs(layer, call, mode, args, kwargs)
            finally:
                call.clock.close()

        return hook

    def _layer_inputs(self, layer: int, call: Call, mode: str, args: tuple, kwargs: dict):
        """What the layer's pre-hook returns: None (inputs unchanged) or new (args, kwargs)."""
        hidden = contract.layer_hidden(args, kwargs)
        cache = contract.cache_of(kwargs)
        if mode == "prefill":
            contract.check_layer_kwargs(layer, kwargs, q=call.seq_len, key_len=call.seq_len)
            if hidden.shape[1] != call.layout.idx.shape[1]:
                raise contract.contract_error(
                    f"decoder layer {layer} got {hidden.shape[1]} positions where the previous layer's "
                    f"output had {call.layout.idx.shape[1]}"
                )
            if self._cache_ref is None or self._cache_ref() is not cache:
                self._cache_ref = weakref.ref(cache) if cache is not None else None
            given = hidden
            if layer in self._ratios:
                hidden = self._drop(call, layer, hidden, kwargs)
            self._signals.before_layer(layer, hidden, call.layout)
            stage = self._stage_of(layer)
            if stage is None:
                return None
            call.clock.open("gather")
            try:
                new_kwargs = self._gather_prefill_kwargs(call, stage, kwargs, hidden)
            finally:
                call.clock.close()
            if new_kwargs is None and hidden is not given:
                new_kwargs = dict(kwargs)
        else:
            stage = self._stage_of(layer)
            if stage is None:
                return None
            new_kwargs = self._gather_decode_kwargs(call, stage, layer, hidden, cache, kwargs)
        if new_kwargs is None:
            return None
        if args:
            new_kwargs.pop("hidden_states", None)
            return (hidden, *args[1:]), new_kwargs
        new_kwargs["hidden_states"] = hidden
        return args, new_kwargs

    def _stage_of(self, layer: int) -> int | None:
        """The drop layer whose layout applies at ``layer`` (None before the first drop)."""
        return max((d for d in self._llm.layers if d <= layer), default=None)

    # -- dropping -------------------------------------------------------------------------------
    def _drop(self, call: Call, layer: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        lay = call.layout
        call.clock.open("score")
        try:
            candidates = lay.valid & lay.vision
            alive = candidates.sum(1)
            ratio = self._ratios[layer]
            initial = torch.tensor(call.vision_alive[0], device=hidden.device)
            ctx = ScoreContext(layer=layer, hidden=hidden, candidates=candidates, text=lay.valid & ~lay.vision,
                               idx=lay.idx, keep=None, metric=self.metric, seed=self.seed,
                               ratios=tuple(r for d, r in self.schedule.stages if d <= layer), initial=initial,
                               row_pos=call.row_pos.gather(1, lay.idx), options=self.options)
            raw = None
            if isinstance(ratio, Adaptive):
                raw = self._score(call, ctx, kwargs)
                keep_k = gather.adaptive_counts(raw, candidates, ctx.text, alive, ratio)
            else:
                keep_k = self._method.keep_counts(ctx)  # the method's own count (its authors' formula)
            if bool((keep_k == alive).all()):
                call.layouts[layer] = lay
                call.vision_alive.append(alive.tolist())
                return hidden
            ctx.keep = keep_k
            raw = self._score(call, ctx, kwargs) if raw is None else raw
        finally:
            call.clock.close()
        call.clock.open("gather")
        try:
            new, pos = gather.select(lay, raw, keep_k)
            renumber = self._renumber is not None
            hidden, new, transfer = merging.next_slots(self._method, ctx, raw, lay, new, pos, hidden, renumber, call.clock)
            if transfer is not None:  # merged tokens join the kept ones and count as vision tokens from here on
                call.transfers[layer] = transfer
                keep_k = keep_k + (transfer.merged >= 0).sum(1)
            call.layout = call.layouts[layer] = new
            call.vision_alive.append(keep_k.tolist())
        finally:
            call.clock.close()
        return hidden

    def _score(self, call: Call, ctx: ScoreContext, kwargs: dict) -> torch.Tensor:
        # The layer's inputs for the slots before this drop (a probe runs the layer's attention on them).
        before = self._stage_of(ctx.layer - 1)
        inputs = (self._gather_prefill_kwargs(call, before, kwargs, ctx.hidden) if before is not None else None) or kwargs
        ctx.signals = self._signals.collect(ctx.layer, ctx.hidden, inputs, ctx.idx)
        return self._method.score(ctx)

    # -- gathering inputs ---------------------------------------------------------------------
    def _gather_prefill_kwargs(self, call: Call, stage: int, kwargs: dict, hidden: torch.Tensor) -> dict | None:
        lay = call.layouts[stage]
        if lay is call.initial:
            return None  # nothing dropped yet: leave the layer's inputs untouched
        out = gather.prefill_inputs(lay, kwargs, self.adapter.mask_format, self.adapter.top.dtype,
                                    lambda obj, build: call.cached(stage, obj, build))
        if self._renumber is not None:
            out = self._renumber.prefill_inputs(stage, lay.keys, lay.valid, hidden, kwargs, out)
        return out

    def _gather_decode_kwargs(
        self, call: Call, stage: int, layer: int, hidden: torch.Tensor, cache: Any, kwargs: dict
    ) -> dict | None:
        lay = call.layouts[stage]
        if lay is call.initial:
            return None
        mask = kwargs.get("attention_mask")
        q_len = hidden.shape[1]
        # New tokens since the prefill, the current ones included (this layer's cache is not yet updated).
        extra = (cache.layers[layer].get_seq_length() - lay.idx.shape[1] + q_len) if cache is not None else q_len
        contract.check_layer_kwargs(layer, kwargs, q=q_len, key_len=call.seq_len + extra)
        fmt, dtype = self.adapter.mask_format, self.adapter.top.dtype
        built = call.cached(stage, mask,
                            lambda: gather.decode_mask(lay, mask, call.seq_len, q_len, extra, fmt, dtype))
        out = {**kwargs, "attention_mask": built}
        if self._renumber is not None:
            out = self._renumber.decode_inputs(stage, hidden, kwargs, out)
        return out

    # -- accounting ---------------------------------------------------------------------------
    def _finish_stats(self, call: Call) -> None:
        layers = list(self._ratios) if self._dropping else []
        encoder = self._before.row_stats(call.placeholders) if self._before is not None else None
        # Built on first read: on CUDA the clock's events are read only then, never inside the forward.
        self._last_stats = call.stats_builder(self.text_config, torch.finfo(self.adapter.top.dtype).bits // 8,
                                              self.adapter.num_layers, layers, encoder)
        self.last_layouts = {layer: (lay.idx, lay.valid) for layer, lay in call.layouts.items()}
        self.last_transfers = dict(call.transfers)

    @property
    def last_stats(self) -> list[dict[str, Any]]:
        """Per row of the last prefill: tokens per layer, KV bytes, and the dropper's own time in ms
        (``score_ms``, ``gather_ms``, ``bookkeeping_ms``, their sum ``dropper_ms``, and ``decode_ms``,
        the decode-side work of the steps run since)."""
        if callable(self._last_stats):
            self._last_stats = self._last_stats()
        return self._last_stats

    @property
    def last_encoder_runs(self) -> list[Any]:
        """The vision tower runs of the last prefill (``encoder.EncoderRun``), images first, then videos."""
        return self._before.last_runs if self._before is not None else []

    @property
    def last_kept_slots(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(idx [B, S'], valid)``: the prompt slots the decoder ran when tokens were removed before it."""
        return self._before.kept_slots if self._before is not None else None

    @property
    def renumbers(self) -> bool:
        """Whether positions are renumbered after a drop (``positions=``; ``v2drop_eval.engine.positions``)."""
        return self._renumber is not None

    def dropper_times(self) -> dict[str, float]:
        """Milliseconds of the dropper's own work per category (``clock.CATEGORIES``) at the last
        prefill and the decode steps after it so far; empty before the first prefill."""
        return self._call.clock.totals() if self._call is not None else {}

