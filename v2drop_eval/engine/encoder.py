"""Inside the vision encoder: V2Drop's variation across its blocks (``encoder_schedule=``), VisionZip's
selection at its feature layer, and the count of every block's tokens (vision FLOPs).

How tokens leave the encoder: the hooks here shorten the sequence between encoder blocks (``batched``
CLIP crops ``[crops, 1 + patches, d]``, the [CLS] never dropped; ``packed`` Qwen-VL patches ``[N, d]``
with their rotary ``position_embeddings`` and the ``cu_seqlens`` of their attention segments, whole
2x2 merge groups dropped so the merger still fuses four patches). At the encoder's output the kept
tokens are put back at their own slots of a full-size tensor whose dropped slots hold NaN, and the
model's own code carries that tensor on (projector, any-resolution packing, split per image, scatter
into the placeholders). The pre-LLM gather (``engine/prellm.py``) then removes from the decoder's
inputs every placeholder whose row is NaN: a dropped token never reaches the LLM, and a kept one reaches
it at the placeholder of its own patch. The NaN rows cost the (small) projector work on dropped slots.

Scores: at encoder stage ``l`` a token's variation is ``||h(l) - h(l-1)||_2`` over the hidden dimension
(V2Drop's L2, the block's whole update), of a merge group the norm of its four patches' updates
concatenated; each crop (LLaVA) or each image / video (Qwen) keeps its top ``floor(alive x ratio)``
(ties to the earlier slot; at least one, so that no image's encoder run empties), in their original
order. Family knowledge is in ``adapters.EncoderSpec``; the engine's VisionZip selection is the method's
(``Method.pre_llm_tokens``).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from v2drop_eval.engine import contract
from v2drop_eval.engine.adapters import EncoderSpec
from v2drop_eval.engine.clock import DropperClock
from v2drop_eval.engine.cls_tap import ClsTap
from v2drop_eval.engine.schedule import DropSchedule, ZipCounts

__all__ = ["EncoderRun", "FeatureCall", "EncoderHooks", "FEATURE_METHODS"]

# The base model's methods that run the vision encoder for the LLM's placeholders, and what they encode.
FEATURE_METHODS = {"get_image_features": "image", "get_video_features": "video"}


@dataclass
class EncoderRun:
    """What one call of the vision tower did, per item (a crop of LLaVA, an image or video of Qwen)."""

    items: int
    clock: DropperClock
    tokens: list[list[int]] = field(default_factory=list)  # per block: tokens entering it, per item
    attention_sq: list[list[int]] = field(default_factory=list)  # per block: sum of squared segment lengths
    patches: list[int] = field(default_factory=list)  # per item: patches the encoder started with
    out_tokens: list[int] = field(default_factory=list)  # per item: tokens leaving the encoder (kept)
    # running state
    idx: torch.Tensor | None = None  # batched [B, t]: original slot of each slot; packed [n]: original row
    item_of_row: torch.Tensor | None = None  # packed: [N] item of each original row
    prev: torch.Tensor | None = None  # hidden states entering the block before a stage
    gathered: dict[Any, Any] = field(default_factory=dict)
    layouts: dict[int, torch.Tensor] = field(default_factory=dict)  # batched: alive length -> idx
    kept: dict[int, torch.Tensor] = field(default_factory=dict)  # stage block -> original slots / rows alive from it

    @property
    def vision_ms(self) -> float:
        """The tower's forward, in ms (on CUDA read from events: call after the forward)."""
        return self.clock.totals().get("vision", 0.0)


@dataclass
class FeatureCall:
    """One ``get_image_features`` / ``get_video_features`` call: its images (or videos) in order, how many
    placeholders each fills, and the tower runs (and items of them) that encoded each."""

    kind: str  # "image" | "video"
    placeholders: list[int]  # per image
    items: list[int]  # per image: items of the runs (crops of an any-resolution image, 1 otherwise)
    runs: list[EncoderRun]


class EncoderHooks:
    """Hooks on one model's vision encoder: token counts always; ``schedule`` stages (encoder blocks) and
    VisionZip's ``zip`` counts when given. Finished runs wait in ``runs`` until the prefill takes them."""

    def __init__(self, base: nn.Module, spec: EncoderSpec, schedule: DropSchedule | None = None,
                 zip_counts: ZipCounts | None = None, zip_tokens: Any = None) -> None:
        self.base, self.spec = base, spec
        self.stages = {layer: Fraction(repr(r)) for layer, r in (schedule.stages if schedule else ())}
        self.zip, self.zip_tokens = zip_counts, zip_tokens
        self.runs: list[EncoderRun] = []
        self.calls: list[FeatureCall] = []
        self.last_calls: list[FeatureCall] = []  # what the last prefill took (for inspection)
        self._run: EncoderRun | None = None
        self._wrapped = [name for name in FEATURE_METHODS if hasattr(base, name)]
        for name in self._wrapped:
            setattr(base, name, self._feature_method(name, getattr(base, name)))
        self._hooks: list[Any] = [
            spec.tower.register_forward_pre_hook(self._start, with_kwargs=True),
            spec.output.register_forward_hook(self._finish, with_kwargs=True, always_call=True),
        ]
        if spec.output is not spec.tower:
            self._hooks.append(spec.tower.register_forward_hook(self._tower_done, always_call=True))
        for i, block in enumerate(spec.blocks):
            self._hooks.append(block.register_forward_pre_hook(self._block_hook(i), with_kwargs=True))
        self._tap = ClsTap(spec.blocks[spec.cls_attention_block].self_attn) if zip_counts is not None else None

    @property
    def reduces(self) -> bool:
        """Whether fewer tokens than placeholders may leave the encoder."""
        return bool(self.stages) or self.zip is not None

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for name in self._wrapped:
            if name in self.base.__dict__:
                delattr(self.base, name)
        self._wrapped = []
        if self._tap is not None:
            self._tap.remove()
            self._tap = None

    def take(self) -> list[FeatureCall]:
        """The feature calls finished since the last take (a prefill's images, then its videos)."""
        calls, self.calls = self.calls, []
        self.runs.clear()
        self.last_calls = calls
        return calls

    def _feature_method(self, name: str, method: Any) -> Any:
        kind = FEATURE_METHODS[name]
        signature = inspect.signature(method)

        @functools.wraps(method)  # generate reads the signature (transformers 5.24 encodes before the prefill)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            first = len(self.runs)
            out = method(*args, **kwargs)
            runs = self.runs[first:]
            pooled = getattr(out, "pooler_output", None)
            if isinstance(pooled, (list, tuple)) and runs:
                placeholders = [int(x.shape[0]) for x in pooled]
                items = sum(r.items for r in runs)
                named = signature.bind_partial(*args, **kwargs).arguments
                crops = self.spec.crops_per_image(named) if self.spec.crops_per_image is not None else None
                if crops is None or sum(crops) != items:
                    per = items // max(1, len(placeholders))
                    crops = [per] * len(placeholders) if per * len(placeholders) == items else None
                if crops is not None:
                    self.calls.append(FeatureCall(kind, placeholders, crops, runs))
            return out

        return wrapper

    # -- a tower call ---------------------------------------------------------------------------
    def _start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        pixels = kwargs.get("pixel_values", kwargs.get("hidden_states", args[0] if args else None))
        clock = DropperClock(pixels.device)
        if self.spec.layout == "batched":
            run = EncoderRun(items=int(pixels.shape[0]), clock=clock)
        else:
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            if not isinstance(grid, torch.Tensor):
                raise contract.contract_error(f"{type(module).__name__} was called without grid_thw")
            per_item = grid.prod(-1)
            run = EncoderRun(items=int(grid.shape[0]), clock=clock, patches=[int(x) for x in per_item.tolist()])
            run.item_of_row = torch.repeat_interleave(torch.arange(len(per_item), device=grid.device), per_item)
        clock.open("vision")
        self._run = run

    def _tower_done(self, module: nn.Module, args: tuple, output: Any) -> None:
        run, self._run = self._run, None
        if run is not None:
            run.clock.close()
            self.runs.append(run)

    def _finish(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        run = self._run
        if run is None:
            return None
        if self.spec.layout == "batched":
            output = self._finish_batched(run, output)
            self._tower_done(module, args, output)
            return output
        return self._finish_packed(run, output)

    # -- per block ------------------------------------------------------------------------------
    def _block_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            run = self._run
            if run is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if self.spec.layout == "batched":
                out = self._batched(run, layer, hidden, args, kwargs)
            else:
                out = self._packed(run, layer, hidden, args, kwargs)
            if layer + 1 in self.stages:
                new = out[0][0] if out is not None and out[0] else (
                    out[1]["hidden_states"] if out is not None else hidden)
                run.prev = new
            return out

        return hook

    def _batched(self, run: EncoderRun, layer: int, hidden: torch.Tensor, args: tuple, kwargs: dict):
        B, T, _ = hidden.shape
        if run.idx is None:
            run.idx = torch.arange(T, device=hidden.device).expand(B, T)
            run.patches = [T - self.spec.prefix] * B
            run.layouts[T] = run.idx
        new_hidden = None
        if layer in self.stages:
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            if mask is not None:
                raise contract.contract_error(f"encoder block {layer} got an attention mask; dropping inside the "
                                              "encoder expects none (every crop attends to all its tokens)")
            new_hidden = self._drop_batched(run, layer, hidden)
            T = new_hidden.shape[1]
        run.tokens.append([T] * B)
        run.attention_sq.append([T * T] * B)
        if new_hidden is None:
            return None
        if args:
            return (new_hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new_hidden}

    def _drop_batched(self, run: EncoderRun, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        B, T, d = hidden.shape
        p = self.spec.prefix
        alive = T - p
        keep_k = max(min(1, alive), (alive * self.stages[layer].numerator) // self.stages[layer].denominator)
        if keep_k == alive:
            return hidden
        score = (hidden[:, p:] - run.prev[:, p:]).norm(dim=-1)  # [B, alive]
        order = score.argsort(dim=1, descending=True, stable=True)[:, :keep_k]
        kept = order.sort(dim=1).values + p
        pos = torch.cat([torch.arange(p, device=hidden.device).expand(B, p), kept], dim=1)  # [B, p + k]
        run.idx = run.idx.gather(1, pos)
        run.layouts[pos.shape[1]] = run.kept[layer] = run.idx
        return hidden.gather(1, pos[..., None].expand(-1, -1, d))

    def _packed(self, run: EncoderRun, layer: int, hidden: torch.Tensor, args: tuple, kwargs: dict):
        cu = kwargs.get("cu_seqlens")
        if not isinstance(cu, torch.Tensor):
            raise contract.contract_error(f"encoder block {layer} got no cu_seqlens tensor")
        if run.idx is None:
            run.idx = torch.arange(hidden.shape[0], device=hidden.device)
        new_hidden = None
        if layer in self.stages:
            new_hidden = self._drop_packed(run, layer, hidden)
        changed = run.idx.shape[0] != int(cu[-1])
        new_kwargs = dict(kwargs)
        if changed:
            new_kwargs.update(self._packed_inputs(run, kwargs))
        new_cu = new_kwargs["cu_seqlens"]
        lengths = new_cu[1:] - new_cu[:-1]
        seg_item = run.item_of_row[run.idx[new_cu[:-1].clamp(max=run.idx.shape[0] - 1)]] if len(lengths) else lengths
        run.tokens.append(torch.bincount(run.item_of_row[run.idx], minlength=run.items).tolist())
        run.attention_sq.append(torch.bincount(seg_item, weights=(lengths * lengths).double(),
                                               minlength=run.items).long().tolist())
        if not changed:
            return None
        hidden_out = hidden if new_hidden is None else new_hidden
        if args:
            new_kwargs.pop("hidden_states", None)
            return (hidden_out, *args[1:]), new_kwargs
        new_kwargs["hidden_states"] = hidden_out
        return args, new_kwargs

    def _drop_packed(self, run: EncoderRun, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        g = self.spec.group
        n, d = hidden.shape
        groups = n // g
        ratio = self.stages[layer]
        item = run.item_of_row[run.idx[::g]]  # [groups]
        alive = torch.bincount(item, minlength=run.items)
        keep_k = torch.maximum((alive * ratio.numerator) // ratio.denominator, alive.clamp(max=1))
        if bool((keep_k == alive).all()):
            return hidden
        score = (hidden - run.prev).reshape(groups, g * d).norm(dim=-1)
        order = score.argsort(descending=True, stable=True)
        order = order[item[order].argsort(stable=True)]  # by item, best first within each
        starts = torch.cumsum(alive, 0) - alive
        rank = torch.arange(groups, device=hidden.device) - starts[item[order]]
        keep = torch.zeros(groups, dtype=torch.bool, device=hidden.device)
        keep[order] = rank < keep_k[item[order]]
        rows = keep.repeat_interleave(g)
        run.idx = run.kept[layer] = run.idx[rows]
        run.gathered.clear()
        return hidden[rows]

    def _packed_inputs(self, run: EncoderRun, kwargs: dict) -> dict:
        """The block's cu_seqlens, max_seqlen and rotary for the alive rows (built once per object)."""
        out = {}
        cu = kwargs["cu_seqlens"]
        key = ("cu", id(cu))
        if key not in run.gathered:
            segment = torch.searchsorted(cu[1:], run.idx, right=True)  # original segment of each alive row
            counts = torch.bincount(segment, minlength=cu.shape[0] - 1)
            counts = counts[counts > 0]  # segments with nothing left are left out
            new_cu = torch.cat([cu.new_zeros(1), counts.cumsum(0).to(cu.dtype)])
            run.gathered[key] = (new_cu, int(counts.max()) if len(counts) else 0, cu)
        new_cu, longest, _ = run.gathered[key]
        out["cu_seqlens"] = new_cu
        if "max_seqlen" in kwargs and kwargs["max_seqlen"] is not None:
            old = kwargs["max_seqlen"]
            out["max_seqlen"] = torch.as_tensor(longest, dtype=old.dtype, device=old.device) if isinstance(
                old, torch.Tensor) else longest
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            key = ("pe", id(pe))
            if key not in run.gathered:
                run.gathered[key] = (tuple(t[run.idx] for t in pe), pe)
            out["position_embeddings"] = run.gathered[key][0]
        return out

    # -- the encoder's output -------------------------------------------------------------------
    def _finish_batched(self, run: EncoderRun, output: Any) -> Any:
        states = getattr(output, "hidden_states", None)
        if states is None:
            raise contract.contract_error(f"{type(self.spec.tower).__name__} returned no hidden_states")
        B = run.items
        full = run.layouts and max(run.layouts)
        if full:
            states = tuple(self._scatter_batched(run, h, full) for h in states)
            output.last_hidden_state = self._scatter_batched(run, output.last_hidden_state, full)
        feature = states[self.spec.feature_index]
        if self.zip is not None:
            states = list(states)
            states[self.spec.feature_index] = feature = self._visionzip(feature)
            states = tuple(states)
        output.hidden_states = states
        start = 0 if self.spec.placeholders_include_prefix else self.spec.prefix
        kept = (~torch.isnan(feature[:, start:, 0])).sum(1) if B else feature.new_zeros(0)
        run.out_tokens = [int(k) for k in kept.tolist()]
        run.idx = run.prev = None
        run.gathered.clear()
        return output

    @staticmethod
    def _scatter_batched(run: EncoderRun, h: torch.Tensor, full: int) -> torch.Tensor:
        if h is None or h.shape[1] == full:  # transformers keeps only the hidden states the model reads
            return h
        idx = run.layouts.get(h.shape[1])
        if idx is None:
            raise contract.contract_error(f"an encoder hidden state of {h.shape[1]} tokens matches no kept set")
        out = h.new_full((h.shape[0], full, h.shape[2]), float("nan"))
        return out.scatter(1, idx[..., None].expand(-1, -1, h.shape[2]), h)

    def _visionzip(self, feature: torch.Tensor) -> torch.Tensor:
        tap = self._tap
        if tap.cls_attention is None:
            raise contract.contract_error("VisionZip's block ran no attention this call")
        B, T, d = feature.shape
        p = self.spec.prefix
        tokens = self.zip_tokens(feature, tap.cls_attention, tap.keys, self.zip.dominant, self.zip.contextual)
        tap.cls_attention = tap.keys = None
        out = feature.new_full((B, T, d), float("nan"))
        out[:, :p] = feature[:, :p]  # the [CLS] slot: the model's feature selection removes it
        out[:, p:p + tokens.shape[1]] = tokens
        return out

    def _finish_packed(self, run: EncoderRun, output: torch.Tensor) -> torch.Tensor:
        g = self.spec.group
        total = run.item_of_row.shape[0] // g
        if run.idx is None or run.idx.shape[0] == total * g:
            run.out_tokens = [p // g for p in run.patches]
            return output
        groups = run.idx[::g] // g  # merger rows kept, in the merger's (possibly windowed) order
        full = output.new_full((total, output.shape[-1]), float("nan"))
        full[groups] = output
        run.out_tokens = torch.bincount(run.item_of_row[run.idx[::g]], minlength=run.items).tolist()
        run.idx = run.prev = None
        run.gathered.clear()
        return full
