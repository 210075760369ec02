"""The signals methods score with (``v2drop_eval.engine.method.SIGNALS``), taken from a running model.

Attention and keys come from an :class:`AttentionTap`: the attention module gets a private copy of its
config whose attention implementation is a recording wrapper; the wrapper records what the model's own
kernel (sdpa, eager, flash) is handed and then calls that kernel, so outputs are unchanged. For
PyramidDrop's probe the layer's own attention module is called on the layer's normed input and the
wrapper stops right after recording: the layer's real q/k projections, norms and rotary, no copied code.
For published FastV (``PREV_ATTENTION_WEIGHTS``) the wrapper runs that one layer's prefill with the
model's own eager attention instead, and the weights are read where ``output_attentions`` reads them:
the attention module's second output. For ``PREV_QUERY_ATTENTION`` the wrapper records the attention
rows of the prompt tokens the method chose (``Method.query_rows``, asked once per prefill with the
decoder's input embeddings), with the mask the kernel got. Work done for a method is charged to the
dropper's clock.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from v2drop_eval.engine import contract
from v2drop_eval.engine.adapters import ModelAdapter
from v2drop_eval.engine.clock import DropperClock
from v2drop_eval.engine.gather import Layout
from v2drop_eval.engine.method import (
    NORMED_HIDDEN,
    PREV_ATTENTION,
    PREV_ATTENTION_WEIGHTS,
    PREV_HIDDEN,
    PREV_KEYS,
    PREV_QUERY_ATTENTION,
    PROBE_ATTENTION,
    ROW_IDENTITY,
    Method,
    QueryContext,
)

__all__ = ["AttentionTap", "Signals", "TAP_ATTENTION", "additive_mask"]

TAP_ATTENTION = "v2drop_attention_tap"


class _Probed(Exception):
    """Raised by a tap in probe mode once it has what it came for (the attention output is not needed)."""


def _tapped_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any):
    tap: AttentionTap = module._v2drop_tap
    if tap.mode == "eager":
        tap.mode = None
        return tap.run_eager(module, query, key, *args, **kwargs)
    if tap.mode is not None:
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        with tap.timed():
            tap.record(query, key, mask, kwargs.get("scaling"))
        if tap.mode == "probe":
            tap.mode = None
            raise _Probed
        tap.mode = None
    return tap.inner(module, query, key, *args, **kwargs)


AttentionInterface.register(TAP_ATTENTION, _tapped_attention)


class _Span:
    """``with tap.timed():`` charges the block to the clock's ``score`` (nothing without a clock)."""

    def __init__(self, clock: DropperClock | None) -> None:
        self.clock = clock

    def __enter__(self) -> None:
        if self.clock is not None:
            self.clock.open("score")

    def __exit__(self, *exc: object) -> None:
        if self.clock is not None:
            self.clock.close()


def _own_eager(attn_module: torch.nn.Module) -> Callable:
    """The model's own eager attention function, from the attention module's modeling file."""
    fn = getattr(sys.modules[type(attn_module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise contract.contract_error(
            f"{type(attn_module).__module__} has no eager_attention_forward for {type(attn_module).__name__}"
        )
    return fn


def additive_mask(mask: torch.Tensor | None, q_len: int, k_len: int, dtype: torch.dtype) -> torch.Tensor:
    """The mask in eager attention's format (float, added to the logits) from the one the model built
    for its own kernel: None (causal), a 2D padding mask (flash), a 4D bool or a 4D float mask."""
    if mask is not None and mask.dim() == 4 and mask.is_floating_point():
        return mask.to(dtype)
    if mask is not None and mask.dim() == 4:
        allowed = mask.bool()
    else:
        device = mask.device if mask is not None else None
        q_pos = torch.arange(k_len - q_len, k_len, device=device)
        allowed = (torch.arange(k_len, device=device)[None, :] <= q_pos[:, None])[None, None]
        if mask is not None:
            allowed = allowed & mask.bool()[:, None, None, :k_len]
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _rows_bias(mask: torch.Tensor | None, rows: torch.Tensor, q_len: int, k_len: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1|H, R, k_len]`` additive bias of query ``rows [B, R]`` from the mask the kernel got: a 4D bool or
    float mask (its rows), or None / a 2D padding mask (causal, and padding keys out)."""
    B, R = rows.shape
    if mask is not None and mask.dim() == 4:
        m = mask.expand(B, -1, -1, -1)
        m = m.gather(2, rows[:, None, :, None].expand(B, m.shape[1], R, m.shape[-1]))[..., :k_len]
        if m.dtype != torch.bool:
            return m.to(dtype)
        allowed = m
    else:
        keys = torch.arange(k_len, device=rows.device)
        allowed = keys[None, None, :] <= (rows + (k_len - q_len))[:, :, None]  # [B, R, k_len]
        if mask is not None:
            allowed = allowed & mask.bool()[:, None, :k_len]
        allowed = allowed[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=rows.device).masked_fill(~allowed, float("-inf"))


class AttentionTap:
    """Records, at one attention module, the last query row's head-averaged attention, the keys and/or the
    head-averaged attention of chosen query rows (``rows``); or (``eager``) runs the module's prefill with
    eager attention and reads its attention weights."""

    def __init__(self, attn_module: torch.nn.Module, attention: bool, keys: bool, eager: bool = False,
                 rows: bool = False, float32: bool = False) -> None:
        self.module = attn_module
        self.want_attention, self.want_keys, self.want_rows = attention, keys, rows
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = None  # ([B, R] query slots, [B, R] which are real)
        self.rows_attention: torch.Tensor | None = None
        self.float32 = float32  # score in float32 (the ``float32_scores`` option) instead of the model's dtype
        self.original_config = attn_module.config
        impl = self.original_config._attn_implementation or "eager"
        # The model's own eager function lives in its modeling file; other kernels are registered.
        self.inner: Callable = _own_eager(attn_module) if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
        self.eager: Callable | None = _own_eager(attn_module) if eager else None
        self.mode: str | None = None  # None (pass through), "record" (once), "probe" (record, then stop), "eager"
        self.clock: DropperClock | None = None
        self.attention: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self.weights_row: torch.Tensor | None = None
        self._expect_weights = False
        self._hook = attn_module.register_forward_hook(self._read_weights) if eager else None
        cfg = copy.copy(self.original_config)
        cfg._attn_implementation_internal = TAP_ATTENTION
        attn_module.config = cfg
        attn_module._v2drop_tap = self

    def timed(self) -> _Span:
        return _Span(self.clock)

    def run_eager(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any):
        """This call with the model's own eager attention (as ``attn_implementation="eager"`` would run it)."""
        args = list(args)
        with self.timed():
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            mask = additive_mask(mask, query.shape[-2], key.shape[-2], query.dtype)
            if len(args) > 1:
                args[1] = mask
            else:
                kwargs["attention_mask"] = mask
        self._expect_weights = True
        return self.eager(module, query, key, *args, **kwargs)

    def _read_weights(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        # The attention module's second output is what output_attentions collects for this layer.
        if not self._expect_weights:
            return
        self._expect_weights = False
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if not isinstance(weights, torch.Tensor) or weights.dim() != 4:
            raise contract.contract_error(
                f"{type(module).__name__} under eager attention did not return its attention weights "
                f"[batch, heads, q, k] as its second output (what output_attentions reads; got "
                f"{type(weights).__name__})"
            )
        with self.timed():
            # As published FastV: the head average of the whole map, then the last query's row.
            self.weights_row = (weights.float() if self.float32 else weights).mean(dim=1)[:, -1, :]

    def record(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float | None) -> None:
        """The last query row's attention, head-averaged, as eager attention computes it: ``q k^T``, scaled,
        masked, softmax in float32 then back to the model's dtype, mean over heads (``float32``: all in
        float32). Keys are kept repeated to the query heads, as the attention multiplies them."""
        heads = query.shape[1]
        if self.want_keys:
            self.keys = key.detach().repeat_interleave(heads // key.shape[1], dim=1)
        if self.want_rows and self.rows is not None:
            self._record_rows(query, key, mask, scaling)
        if not self.want_attention:
            return
        dtype = torch.float32 if self.float32 else query.dtype
        q = query[:, :, -1:, :].to(dtype)  # [B, H, 1, hd]
        k = key.to(dtype)  # [B, Hkv, S, hd]
        if k.shape[1] != heads:
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
        logits = torch.matmul(q, k.transpose(-1, -2))  # [B, H, 1, S]
        head_dim = q.shape[-1]
        # FastV's and PyramidDrop's code divide by math.sqrt(head_dim); the model's own scaling otherwise.
        if scaling is None or scaling == head_dim ** -0.5:
            logits = logits / math.sqrt(head_dim)
        else:
            logits = logits * scaling
        if mask is not None:
            if mask.dim() == 2:  # flash-attention padding mask [B, S]
                logits = logits.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
            else:
                row = mask[:, :, -1:, : k.shape[-2]]
                logits = logits.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else logits + row.to(dtype)
        weights = logits.softmax(dim=-1, dtype=torch.float32).to(dtype)
        self.attention = weights.mean(dim=1)[:, 0, :]  # [B, S]

    def _record_rows(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float | None) -> None:
        # As SparseVLM computes its raters' attention: (q k^T) x scale plus the mask, softmax over every key,
        # mean over heads, all in the model's dtype.
        rows = self.rows[0]
        B, H, S, hd = query.shape
        q = query.gather(2, rows[:, None, :, None].expand(B, H, rows.shape[1], hd))
        k = key if key.shape[1] == H else key.repeat_interleave(H // key.shape[1], dim=1)
        scale = scaling if scaling is not None else hd ** -0.5
        logits = (q @ k.transpose(-1, -2)) * scale
        logits = logits + _rows_bias(mask, rows, S, k.shape[-2], logits.dtype)
        self.rows_attention = logits.softmax(dim=-1).mean(dim=1)  # [B, R, S]

    def take(self, what: str) -> torch.Tensor:
        value = getattr(self, what)
        setattr(self, what, None)
        if value is None:
            raise RuntimeError(f"the attention tap recorded no {what} at this prefill")
        return value

    def clear(self) -> None:
        self.attention = self.keys = self.weights_row = self.rows_attention = None
        self.rows = None
        self.mode = None
        self._expect_weights = False

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        self.module.config = self.original_config
        del self.module._v2drop_tap


class Signals:
    """What one method needs, for one attached model: taps installed, state kept between layers."""

    def __init__(self, adapter: ModelAdapter, method: Method, drop_layers: tuple[int, ...], float32: bool = False) -> None:
        self.adapter = adapter
        self.method = method
        self.needs = method.needs
        self.drop_layers = set(drop_layers)
        self.taps: dict[int, AttentionTap] = {}
        prev_attention, prev_keys = PREV_ATTENTION in self.needs, PREV_KEYS in self.needs
        eager = PREV_ATTENTION_WEIGHTS in self.needs
        rows = PREV_QUERY_ATTENTION in self.needs
        for layer in drop_layers:
            if prev_attention or prev_keys or eager or rows:
                self.taps[layer - 1] = AttentionTap(self._parts(layer - 1)[1], prev_attention, prev_keys, eager=eager,
                                                    rows=rows, float32=float32)
            if PROBE_ATTENTION in self.needs:
                self.taps[layer] = AttentionTap(self._parts(layer)[1], attention=True, keys=False, float32=float32)
        self.prev_hidden: torch.Tensor | None = None
        self.rows: tuple[list[bytes], torch.Tensor, int] | None = None
        self.query: torch.Tensor | None = None  # [B, S] the method's query tokens (PREV_QUERY_ATTENTION)

    def first_hooked_layer(self, first_drop: int) -> int:
        """The first decoder layer the engine must watch for a first drop at ``first_drop``: layer 0 when the
        method picks query rows from the input embeddings, the layer before for the other PREV_* signals."""
        if PREV_QUERY_ATTENTION in self.needs and self.drop_layers:
            return 0
        return first_drop - (1 if self.needs & {PREV_HIDDEN, PREV_ATTENTION, PREV_ATTENTION_WEIGHTS, PREV_KEYS} else 0)

    def _parts(self, layer: int) -> tuple[torch.nn.Module, torch.nn.Module]:
        module = self.adapter.layers[layer]
        norm, attn = getattr(module, "input_layernorm", None), getattr(module, "self_attn", None)
        if norm is None or attn is None:
            raise contract.contract_error(f"decoder layer {layer} has no input_layernorm and self_attn")
        return norm, attn

    # -- during a prefill ------------------------------------------------------------------------
    def start(self, input_ids: torch.Tensor, real: torch.Tensor | None, ordinal: torch.Tensor, found: list[int],
              clock: DropperClock | None = None) -> None:
        self.clear()
        for tap in self.taps.values():
            tap.clock = clock  # work inside the attention kernels is the dropper's too
        if ROW_IDENTITY in self.needs:
            rows = input_ids.cpu() if real is None else [r[m] for r, m in zip(input_ids.cpu(), real.cpu(), strict=True)]
            self.rows = ([r.numpy().tobytes() for r in rows], ordinal, max(found) or 1)

    def before_layer(self, layer: int, hidden: torch.Tensor, layout: Layout) -> None:
        """Called with the hidden states entering ``layer`` (after any drop there) at prefill, and the
        layout of their slots."""
        if layer == 0 and PREV_QUERY_ATTENTION in self.needs and self.drop_layers:
            self.query = self._query_rows(hidden, layout)
        if layer + 1 in self.drop_layers:
            if PREV_HIDDEN in self.needs:
                self.prev_hidden = hidden
            tap = self.taps.get(layer)
            if tap is not None and PREV_ATTENTION_WEIGHTS in self.needs:
                tap.mode = "eager"  # this layer's prefill only: decode steps pass through to the model's kernel
            elif tap is not None and self.needs & {PREV_ATTENTION, PREV_KEYS, PREV_QUERY_ATTENTION}:
                if PREV_QUERY_ATTENTION in self.needs:
                    tap.rows = self._query_slots(layout)
                tap.mode = "record"

    def _query_rows(self, embeddings: torch.Tensor, layout: Layout) -> torch.Tensor:
        real = layout.valid
        ctx = QueryContext(embeddings=embeddings, vision=layout.vision & real, text=real & ~layout.vision)
        query = self.method.query_rows(ctx)
        if query.shape != real.shape or query.dtype != torch.bool or bool((query & ~ctx.text).any()):
            raise ValueError(f"method {self.method.name}'s query_rows must return a [batch, seq] bool mask of real "
                             "non-vision tokens")
        return query

    def _query_slots(self, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, R] the slots of the query tokens, [B, R] which are real) in ``layout``, in slot order."""
        here = self.query.gather(1, layout.idx) & layout.valid & ~layout.vision
        n = here.shape[1]
        R = max(int(here.sum(1).max()), 1)
        slots = torch.where(here, torch.arange(n, device=here.device), n).sort(dim=1).values[:, :R]
        return slots.clamp(max=n - 1), slots < n

    def collect(self, layer: int, hidden: torch.Tensor, kwargs: dict, idx: torch.Tensor) -> dict[str, Any]:
        """The signals for dropping before ``layer``; ``kwargs`` are the layer's inputs for the slots
        of ``hidden`` (before this drop), ``idx [B, n]`` their original positions."""
        out: dict[str, Any] = {}
        if PREV_HIDDEN in self.needs:
            out[PREV_HIDDEN] = self.prev_hidden
        if PREV_ATTENTION in self.needs:
            out[PREV_ATTENTION] = self.taps[layer - 1].take("attention").to(hidden.device)
        if PREV_ATTENTION_WEIGHTS in self.needs:
            out[PREV_ATTENTION_WEIGHTS] = self.taps[layer - 1].take("weights_row").to(hidden.device)
        if PREV_KEYS in self.needs:
            out[PREV_KEYS] = self.taps[layer - 1].take("keys")
        if PREV_QUERY_ATTENTION in self.needs:
            tap = self.taps[layer - 1]
            valid = tap.rows[1] if tap.rows is not None else None
            out[PREV_QUERY_ATTENTION] = (tap.take("rows_attention").to(hidden.device), valid)
        if PROBE_ATTENTION in self.needs:
            out[PROBE_ATTENTION] = self._probe(layer, hidden, kwargs)
        if NORMED_HIDDEN in self.needs:
            norm = getattr(self.adapter.decoder, "norm", None)
            if norm is None:
                raise contract.contract_error("the decoder has no final norm (decoder.norm)")
            out[NORMED_HIDDEN] = norm(hidden)
        if ROW_IDENTITY in self.needs:
            keys, ordinal, n = self.rows
            out[ROW_IDENTITY] = (keys, ordinal.gather(1, idx), n)
        return out

    def _probe(self, layer: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        norm, attn = self._parts(layer)
        tap = self.taps[layer]
        tap.mode = "probe"
        try:
            attn(hidden_states=norm(hidden), attention_mask=kwargs.get("attention_mask"),
                 position_ids=kwargs.get("position_ids"), position_embeddings=kwargs.get("position_embeddings"))
        except _Probed:
            pass
        finally:
            tap.mode = None
        return tap.take("attention")

    def clear(self) -> None:
        self.prev_hidden = None
        self.rows = None
        self.query = None
        for tap in self.taps.values():
            tap.clear()

    def remove(self) -> None:
        for tap in self.taps.values():
            tap.remove()
        self.taps.clear()
