"""The dropping engine: forward pre-hooks that shorten the decoder's sequence at the drop layers.

How it works (docs/design.md §2): the decoder builds one mask, one rotary (cos, sin) pair and one
``position_ids`` of the full prefill length S and hands the same objects to every layer. A pre-hook on
each layer from the first drop layer on swaps them for copies gathered at the kept positions, and at
a drop layer also gathers ``hidden_states``. The per-layer ``DynamicCache`` then simply holds fewer
entries for later layers. At decode, each pruned layer's mask columns are gathered with its own kept
positions plus the new tokens; rotary positions of new tokens stay the true ones.

Rows of a batch may keep different numbers of tokens: the gathered batch is cut to the longest row and
the shorter rows get surplus slots on the left, masked out as keys (each keeps its own diagonal so no
attention row is empty). No transformers ``forward`` is copied; removing the hooks restores the model.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from v2drop_eval import contract
from v2drop_eval.adapters import ModelAdapter, adapter_for
from v2drop_eval.schedule import Adaptive, DropSchedule
from v2drop_eval.scorers import FastVRecorder, random_scores, variation
from v2drop_eval.validate import METHODS, check_drop_method

__all__ = ["attach", "DropHandle", "METHODS"]


def attach(
    model: nn.Module,
    schedule: DropSchedule | str,
    method: str = "v2drop",
    metric: str = "l2",
    seed: int = 0,
) -> DropHandle:
    """Make ``model`` drop vision tokens by ``schedule`` at every prefill; returns a handle to detach.

    ``method``: ``v2drop`` (variation, ``metric`` l2 | l1 | cosine), ``random`` (seeded), ``fastv``
    (last-query attention at layer K-1, single-stage schedules only) or ``none`` (nothing changes;
    the unpruned baseline with the same accounting).
    """
    return DropHandle(model, schedule, method=method, metric=metric, seed=seed)


@dataclass
class _Layout:
    """Which original positions occupy the slots of the (rectangular) gathered batch."""

    idx: torch.Tensor  # [B, n] original positions
    valid: torch.Tensor  # [B, n] a real token (False for padding and surplus slots)
    vision: torch.Tensor  # [B, n] droppable vision token (never the row's last position)


@dataclass
class _Call:
    """State of one forward call of the top model."""

    seq_len: int  # S: the prefill length
    layout: _Layout | None = None  # current layout while the prefill runs through the layers
    initial: _Layout | None = None  # the untouched layout (nothing gathered while it applies)
    layouts: dict[int, _Layout] = field(default_factory=dict)  # drop layer -> layout from there on
    text_real: list[int] = field(default_factory=list)  # real (non-pad) text tokens per row
    prev_hidden: torch.Tensor | None = None
    row_keys: list[bytes] = field(default_factory=list)
    vision_ordinal: torch.Tensor | None = None  # [B, S] index of each vision token within its row
    vision_alive: list[list[int]] = field(default_factory=list)  # per stage, per row
    gathered: dict[tuple[int, int], Any] = field(default_factory=dict)  # (stage layer, id(obj)) -> copy
    score_s: float = 0.0
    gather_s: float = 0.0


class DropHandle:
    """Hooks of one attached dropper. ``detach()`` (or leaving a ``with`` block) removes them."""

    def __init__(self, model: nn.Module, schedule: DropSchedule | str, method: str, metric: str, seed: int):
        check_drop_method(method, metric, seed)
        schedule = DropSchedule.parse(schedule)
        self.adapter: ModelAdapter = adapter_for(model)
        if getattr(model, "_v2drop_handle", None) is not None:
            raise RuntimeError("this model already has a dropper attached; call detach() on it first")
        schedule.check_depth(self.adapter.num_layers)
        if method == "fastv" and len(schedule.stages) != 1:
            raise ValueError(
                f"method 'fastv' drops once, at one layer K; schedule {schedule} has "
                f"{len(schedule.stages)} stages (use e.g. '2:0.3', or DropSchedule.preset(family, budget, method='fastv'))"
            )
        if schedule.is_adaptive and method != "v2drop":
            raise ValueError(
                f"adaptive stages ({schedule}) rank tokens by variation: they need method 'v2drop', not {method!r}"
            )
        impl = self.adapter.attn_implementation
        if impl == "flex_attention":
            raise ValueError(
                "attn_implementation 'flex_attention' is not supported (its BlockMask cannot be gathered); "
                "use 'sdpa', 'eager' or 'flash_attention_2'"
            )
        self.model = model
        self.schedule = schedule
        self.method = method
        self.metric = metric
        self.seed = int(seed)
        self.text_config = self.adapter.text_config
        self.last_stats: list[dict[str, Any]] = []
        self.last_layouts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._ratios: dict[int, Fraction | Adaptive] = {
            layer: r if isinstance(r, Adaptive) else Fraction(repr(r)) for layer, r in schedule.stages
        }
        self._dropping = method != "none" and not schedule.is_empty
        self._call: _Call | None = None  # the prefill being run, or whose layouts decode uses
        self._mode: str | None = None  # "prefill" | "decode" | None (hooks idle) for the current call
        self._cache_ref: weakref.ref | None = None
        self._prefill: _Call | None = None  # kept for decode steps
        self._hooks: list[Any] = []
        self._fastv: FastVRecorder | None = None

        top = self.adapter.top
        self._hooks.append(top.register_forward_pre_hook(self._on_top_call, with_kwargs=True))
        self._hooks.append(top.register_forward_hook(self._on_top_return, always_call=True))
        if self._dropping:
            first = schedule.layers[0]
            start = first - 1 if method == "v2drop" else first
            for layer in range(start, self.adapter.num_layers):
                hook = self.adapter.layers[layer].register_forward_pre_hook(
                    self._layer_hook(layer), with_kwargs=True
                )
                self._hooks.append(hook)
            if method == "fastv":
                self._fastv = FastVRecorder(self.adapter.layers[first - 1].self_attn)
                hook = self.adapter.layers[first - 1].register_forward_pre_hook(self._arm_fastv)
                self._hooks.append(hook)
        model._v2drop_handle = self

    # -- lifecycle ------------------------------------------------------------------------------
    def detach(self) -> None:
        """Remove every hook and restore the model exactly."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._fastv is not None:
            self._fastv.remove()
            self._fastv = None
        if getattr(self.model, "_v2drop_handle", None) is self:
            del self.model._v2drop_handle
        self._call = self._mode = None

    def __enter__(self) -> DropHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        return f"DropHandle(method={self.method!r}, schedule='{self.schedule}', metric={self.metric!r})"

    # -- top-level hooks ----------------------------------------------------------------------
    def _on_top_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = contract.cache_of(kwargs)
        self._mode = None
        if cache is not None and not isinstance(cache, DynamicCache):
            raise ValueError(
                f"cache type {type(cache).__name__} is not supported: the dropped layers need per-layer "
                "lengths; use the default DynamicCache (no cache_implementation='static', no torch.compile cache)"
            )
        if cache is not None:
            contract.check_cache(cache, self.adapter.num_layers)
        prefill = cache is None or cache.get_seq_length() == 0
        if input_ids is None:
            if self._dropping and prefill:
                raise ValueError(
                    "inputs_embeds without input_ids is not supported: vision tokens are found from "
                    "input_ids; pass input_ids"
                )
            return
        if prefill:
            if self._dropping and kwargs.get("labels") is not None:
                raise ValueError(
                    "labels= with dropping is not supported: logits exist only for the kept positions; "
                    "compute the loss without a dropper attached (or method='none')"
                )
            contract.check_prefill_call(input_ids, kwargs.get("attention_mask"))
            self._call = self._start_prefill(input_ids, kwargs.get("attention_mask"))
            self._mode = "prefill"
            return
        if not self._dropping:
            return
        if self._call is None or self._cache_ref is None or self._cache_ref() is not cache:
            raise ValueError(
                "continuing generation from a cache this dropper did not prefill is not supported "
                "(chunked prefill, a pre-filled cache from another run)"
            )
        if input_ids.shape[1] > 1 and torch.isin(input_ids, self._vision_ids(input_ids)).any():
            raise ValueError("vision tokens after the prefill (chunked prefill) are not supported")
        self._call.gathered.clear()
        self._mode = "decode"

    def _on_top_return(self, module: nn.Module, args: tuple, output: Any) -> None:
        mode, self._mode = self._mode, None
        call = self._call
        if call is None:
            return
        call.gathered.clear()
        if mode == "prefill":
            call.prev_hidden = None
            call.layout = None
            if self._dropping and len(call.vision_alive) != len(self._ratios) + 1:
                self._call = None  # the forward raised before the last drop layer: nothing to count or decode
                return
            self._finish_stats(call)

    def _vision_ids(self, ref: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.adapter.vision_token_ids, device=ref.device)

    def _start_prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> _Call:
        B, S = input_ids.shape
        device = input_ids.device
        vision = torch.isin(input_ids, self._vision_ids(input_ids))
        # The last prompt position produces the first new token: it is never dropped.
        vision[:, -1] = False
        real = attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else None
        idx = torch.arange(S, device=device).expand(B, S)
        valid = real if real is not None else torch.ones(B, S, dtype=torch.bool, device=device)
        layout = _Layout(idx=idx, valid=valid, vision=vision & valid)
        call = _Call(seq_len=S, layout=layout, initial=layout)
        call.vision_ordinal = (vision.long().cumsum(1) - 1).clamp(min=0)
        call.vision_alive.append(vision.sum(1).tolist())
        call.text_real = ((~vision) & real).sum(1).tolist() if real is not None else (S - vision.sum(1)).tolist()
        if self.method == "random" and self._dropping:
            rows = input_ids.cpu() if real is None else [r[m] for r, m in zip(input_ids.cpu(), real.cpu(), strict=True)]
            call.row_keys = [r.numpy().tobytes() for r in rows]
        return call

    # -- per-layer hook -----------------------------------------------------------------------
    def _arm_fastv(self, module: nn.Module, args: tuple) -> None:
        self._fastv.armed = self._mode == "prefill"

    def _layer_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            call, mode = self._call, self._mode
            if mode is None:
                return None
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
                    hidden = self._drop(call, layer, hidden)
                stage = self._stage_of(layer)
                if self.method == "v2drop" and layer + 1 in self._ratios:
                    call.prev_hidden = hidden
                if stage is None:
                    return None
                t0 = time.perf_counter()
                new_kwargs = self._gather_prefill_kwargs(call, stage, kwargs)
                call.gather_s += time.perf_counter() - t0
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

        return hook

    def _stage_of(self, layer: int) -> int | None:
        """The drop layer whose layout applies at ``layer`` (None before the first drop)."""
        stage = None
        for drop_layer in self.schedule.layers:
            if drop_layer <= layer:
                stage = drop_layer
        return stage

    # -- dropping -------------------------------------------------------------------------------
    def _drop(self, call: _Call, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        lay = call.layout
        t0 = time.perf_counter()
        candidates = lay.valid & lay.vision
        alive = candidates.sum(1)
        ratio = self._ratios[layer]
        raw = None
        if isinstance(ratio, Adaptive):
            raw = self._scores(call, layer, hidden)
            keep_k = _adaptive_counts(raw, candidates, lay.valid & ~lay.vision, alive, ratio)
        else:
            keep_k = (alive * ratio.numerator) // ratio.denominator  # exact floor(alive * ratio)
        if bool((keep_k == alive).all()):
            call.layouts[layer] = lay
            call.vision_alive.append(alive.tolist())
            call.score_s += time.perf_counter() - t0
            return hidden
        raw = self._scores(call, layer, hidden) if raw is None else raw
        scores = raw.masked_fill(~candidates, float("-inf"))
        order = scores.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        # Padding goes too: a shorter row's free slots are masked like padding anyway.
        keep = lay.valid & (~lay.vision | (candidates & (rank < keep_k[:, None])))
        t1 = time.perf_counter()
        call.score_s += t1 - t0

        n_new = int(keep.sum(1).max())
        n_cur = keep.shape[1]
        # Kept slots in their original order, right-aligned; dropped slots fill the left as surplus.
        sort_key = keep.long() * (n_cur + torch.arange(n_cur, device=keep.device))
        pos = sort_key.argsort(dim=1, stable=True)[:, n_cur - n_new :]
        new = _Layout(
            idx=lay.idx.gather(1, pos),
            valid=keep.gather(1, pos),
            vision=lay.vision.gather(1, pos) & keep.gather(1, pos),
        )
        hidden = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))
        call.layout = new
        call.layouts[layer] = new
        call.vision_alive.append(keep_k.tolist())
        call.gather_s += time.perf_counter() - t1
        return hidden

    def _scores(self, call: _Call, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if self.method == "v2drop":
            return variation(hidden, call.prev_hidden, self.metric)
        if self.method == "random":
            # Keyed on each token's ordinal among its row's vision tokens: batch-independent.
            counts = call.vision_alive[0]
            table = random_scores(call.row_keys, max(counts) or 1, self.seed, layer, hidden.device)
            ordinal = call.vision_ordinal.gather(1, call.layout.idx)
            return table.gather(1, ordinal)
        scores = self._fastv.scores  # fastv: attention from layer K-1, original layout
        self._fastv.scores = None
        if scores is None:
            raise RuntimeError("FastV attention was not recorded at the layer before the drop")
        return scores.to(hidden.device)

    # -- gathering inputs ---------------------------------------------------------------------
    def _gather_prefill_kwargs(self, call: _Call, stage: int, kwargs: dict) -> dict | None:
        lay = call.layouts[stage]
        if lay is call.initial:
            return None  # nothing dropped yet: leave the layer's inputs untouched
        out = dict(kwargs)
        mask = kwargs.get("attention_mask")
        out["attention_mask"] = self._cached(call, stage, mask, lambda: self._prefill_mask(lay, mask))
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            out["position_embeddings"] = self._cached(
                call, stage, pe, lambda: tuple(_gather_seq(t, lay.idx) for t in pe)
            )
        pid = kwargs.get("position_ids")
        if isinstance(pid, torch.Tensor):
            out["position_ids"] = self._cached(call, stage, pid, lambda: _gather_seq(pid[..., None], lay.idx)[..., 0])
        return out

    def _prefill_mask(self, lay: _Layout, mask: torch.Tensor | None) -> torch.Tensor | None:
        B, n = lay.idx.shape
        surplus = not bool(lay.valid.all())
        if mask is None:
            if not surplus:
                return None  # causal over the kept slots, which keep their order
            return self._new_mask(lay.valid, q_len=n, extra=0, like=None)
        if mask.dim() == 2:  # flash-attention padding mask [B, S]
            return mask.expand(B, -1).gather(1, lay.idx) * lay.valid
        m = mask.expand(B, -1, -1, -1)
        m = m.gather(2, lay.idx[:, None, :, None].expand(B, m.shape[1], n, m.shape[-1]))
        m = m.gather(3, lay.idx[:, None, None, :].expand(B, m.shape[1], n, n))
        return _mask_surplus(m, lay.valid, n) if surplus else m

    def _gather_decode_kwargs(
        self, call: _Call, stage: int, layer: int, hidden: torch.Tensor, cache: Any, kwargs: dict
    ) -> dict | None:
        lay = call.layouts[stage]
        S = call.seq_len
        if lay is call.initial:
            return None
        mask = kwargs.get("attention_mask")
        q_len = hidden.shape[1]
        # New tokens since the prefill, the current ones included (this layer's cache is not yet updated).
        extra = (cache.layers[layer].get_seq_length() - lay.idx.shape[1] + q_len) if cache is not None else q_len
        contract.check_layer_kwargs(layer, kwargs, q=q_len, key_len=S + extra)

        def build() -> torch.Tensor | None:
            B, n = lay.idx.shape
            if mask is None:
                if bool(lay.valid.all()):
                    return None
                return self._new_mask(lay.valid, q_len=q_len, extra=extra, like=None)
            tail = torch.arange(S, S + extra, device=lay.idx.device).expand(B, extra)
            cols = torch.cat([lay.idx, tail], dim=1)
            valid = torch.cat([lay.valid, torch.ones_like(tail, dtype=torch.bool)], dim=1)
            if mask.dim() == 2:
                return mask.expand(B, -1).gather(1, cols) * valid
            m = mask.expand(B, -1, -1, -1)
            m = m.gather(3, cols[:, None, None, :].expand(B, m.shape[1], m.shape[2], cols.shape[1]))
            return _mask_keys(m, valid)

        return {**kwargs, "attention_mask": self._cached(call, stage, mask, build)}

    def _new_mask(self, valid: torch.Tensor, q_len: int, extra: int, like: Any) -> torch.Tensor:
        """A mask from scratch, in the format of the model's attention, when the model passed None."""
        B, n = valid.shape
        device = valid.device
        keys = torch.cat([valid, torch.ones(B, extra, dtype=torch.bool, device=device)], dim=1)
        fmt = self.adapter.mask_format
        if fmt == "padding2d":
            return keys.long()
        k_len = n + extra
        # Query i sits at key position k_len - q_len + i (prefill: extra=0, q_len=n).
        q_pos = torch.arange(k_len - q_len, k_len, device=device)
        causal = torch.arange(k_len, device=device)[None, :] <= q_pos[:, None]
        m = (causal[None, None] & keys[:, None, None, :]).clone()
        if extra == 0:
            m |= torch.eye(n, dtype=torch.bool, device=device)[None, None]
        if fmt == "additive":
            dtype = self.adapter.top.dtype
            return torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(~m, torch.finfo(dtype).min)
        return m

    @staticmethod
    def _cached(call: _Call, stage: int, obj: Any, build: Any) -> Any:
        key = (stage, id(obj))
        if key not in call.gathered:
            call.gathered[key] = (build(), obj)  # keep obj alive so its id stays unique
        return call.gathered[key][0]

    # -- accounting ---------------------------------------------------------------------------
    def _finish_stats(self, call: _Call) -> None:
        L = self.adapter.num_layers
        cfg = self.text_config
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        elem = torch.finfo(self.adapter.top.dtype).bits // 8
        per_token = 2 * kv_heads * head_dim * elem
        stats = []
        for b, found in enumerate(call.vision_alive[0]):
            per_layer, alive, stage_i = [], found, 0
            for layer in range(L):
                if self._dropping and layer in self._ratios:
                    stage_i += 1
                    alive = call.vision_alive[stage_i][b]
                per_layer.append(int(alive))
            text = int(call.text_real[b])
            tokens = [text + v for v in per_layer]
            stats.append(
                {
                    "vision_tokens": int(found),
                    "text_tokens": text,
                    "vision_per_layer": per_layer,
                    "tokens_per_layer": tokens,
                    "kv_cache_bytes": sum(tokens) * per_token,
                    "score_ms": call.score_s * 1e3,
                    "gather_ms": call.gather_s * 1e3,
                }
            )
        self.last_stats = stats
        self.last_layouts = {layer: (lay.idx, lay.valid) for layer, lay in call.layouts.items()}


def _adaptive_counts(
    scores: torch.Tensor, candidates: torch.Tensor, text: torch.Tensor, alive: torch.Tensor, stage: Adaptive
) -> torch.Tensor:
    """Per row: vision tokens whose variation >= threshold x the row's mean text-token variation,
    clamped to [floor(alive x min), floor(alive x max)]. The reference does not depend on the image,
    so a plain image (small variations) keeps fewer tokens than a busy one."""
    text_mean = (scores * text).sum(1) / text.sum(1).clamp(min=1)
    passing = ((scores >= stage.threshold * text_mean[:, None]) & candidates).sum(1)
    lo = (alive * Fraction(repr(stage.min_ratio)).numerator) // Fraction(repr(stage.min_ratio)).denominator
    hi = (alive * Fraction(repr(stage.max_ratio)).numerator) // Fraction(repr(stage.max_ratio)).denominator
    return torch.minimum(torch.maximum(passing, lo), hi)


def _gather_seq(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather ``t[..., B|1, S, D]`` along the sequence dim (-2) with per-row ``idx [B, n]``."""
    B, n = idx.shape
    lead = t.shape[:-3]
    t = t.expand(*lead, B, t.shape[-2], t.shape[-1])
    index = idx[..., None].expand(*lead, B, n, t.shape[-1])
    return t.gather(-2, index)


def _mask_keys(m: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """Mask out invalid key columns of a 4D mask (bool: True = attend; float: additive)."""
    cols = key_valid[:, None, None, :]
    if m.dtype == torch.bool:
        return m & cols
    return m.masked_fill(~cols, torch.finfo(m.dtype).min)


def _mask_surplus(m: torch.Tensor, valid: torch.Tensor, n: int) -> torch.Tensor:
    """Mask surplus slots as keys, and let each surplus query see itself so no row is empty."""
    m = _mask_keys(m, valid)
    diag = torch.eye(n, dtype=torch.bool, device=m.device)[None, None] & ~valid[:, None, :, None]
    if m.dtype == torch.bool:
        return m | diag
    return m.masked_fill(diag, 0.0)
