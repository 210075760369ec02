"""Drop schedules: at which decoder layers vision tokens are dropped, and how many survive.

A schedule is an ordered list of ``(layer, keep_ratio)`` stages. Before ``layer`` runs, the vision
tokens still alive are cut to the running method's count (``Method.stage_keep``: its authors' formula;
``floor(alive * keep_ratio)`` in exact decimal arithmetic, so ``100 x 0.29`` keeps 29, not 28, under
``exact_counts``). Layer 0 never drops: transformers reads the cache length from it.

A stage may instead be adaptive (``layer:tTHRESHOLD:MIN:MAX``, V2Drop only): each image keeps the
vision tokens whose variation is at least THRESHOLD x the mean variation of its own text tokens at
that layer, clamped to ``[floor(alive x MIN), floor(alive x MAX)]``.

The one stage at layer 0 is a pre-LLM stage, ``0:D+C`` (VisionZip only): each image reaches the LLM as D
dominant plus C contextual tokens, so the LLM sees the shorter sequence from its first layer
(docs/methods.md, "VisionZip").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from v2drop_eval.engine.method import Method, exact_floor

__all__ = ["DropSchedule", "Adaptive", "ZipCounts", "kept_count", "format_ratio", "parse_ratio", "install_preset_lookup",
           "install_method_lookup"]

# (family, budget, method) -> schedule text; installed by v2drop_eval.methods.presets (see DropSchedule.preset).
_PRESET_LOOKUP: Callable[[str, int | str, str], str] | None = None


def install_preset_lookup(lookup: Callable[[str, int | str, str], str]) -> None:
    """Where ``DropSchedule.preset`` finds its tables (the method layer calls this once)."""
    global _PRESET_LOOKUP
    _PRESET_LOOKUP = lookup


# method name ("": the default method) -> Method; installed by v2drop_eval.methods (the registry) so that a
# schedule can count as a named method counts (``DropSchedule.tokens_per_layer``) without the engine
# importing any method.
_METHOD_LOOKUP: Callable[[str], Method] | None = None


def install_method_lookup(lookup: Callable[[str], Method]) -> None:
    """Where ``DropSchedule``'s counts find a method by name (the registry calls this once)."""
    global _METHOD_LOOKUP
    _METHOD_LOOKUP = lookup


def _counting(method: Method | str) -> Method:
    if isinstance(method, Method):
        return method
    if _METHOD_LOOKUP is None:
        raise RuntimeError("counting as a named method needs the method registry: use v2drop_eval.DropSchedule, "
                           "import v2drop_eval.methods first, or pass the Method itself")
    return _METHOD_LOOKUP(method)


# ``floor(alive * keep_ratio)`` on the ratio's decimal form (the adaptive bounds, the ``exact_counts`` option).
kept_count = exact_floor


def format_ratio(value: float) -> str:
    """The shortest text that reads back as ``value`` (``0.1736112``, ``0.5``, ``0``, ``1e-05``): every
    digit the schedule was written with, never rounded (``:g`` kept 6 significant digits)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def parse_ratio(text: str) -> float:
    """A number written as ``text``, refused unless the float holds exactly that decimal, so that the
    schedule that runs is the one written (``1e-400`` would run as 0, ``0.12345678901234567891`` as
    ``0.12345678901234568``)."""
    value = float(text)  # ValueError for non-numbers: the caller names the stage
    if not math.isfinite(value):
        return value  # the range check refuses it, naming the allowed range
    try:
        written = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a decimal number") from None
    if value == 0 and written != 0:
        raise ValueError(f"{text!r} is too small to represent: it would run as 0 (write 0 to drop everything)")
    if Decimal(repr(value)) != written:
        raise ValueError(f"{text!r} cannot be represented exactly: it would run as {format_ratio(value)} "
                         "(give at most 15 significant digits)")
    return value


@dataclass(frozen=True)
class Adaptive:
    """An adaptive stage: keep tokens with variation >= ``threshold`` x the row's mean text-token
    variation, at least ``floor(alive x min_ratio)`` and at most ``floor(alive x max_ratio)``."""

    threshold: float
    min_ratio: float
    max_ratio: float

    def __post_init__(self) -> None:
        if not (0.0 <= self.threshold <= MAX_THRESHOLD) or math.isnan(self.threshold):
            raise ValueError(
                f"adaptive threshold {self.threshold} is not allowed: it must be in [0, {MAX_THRESHOLD:g}] "
                "(a multiple of the mean text-token variation)"
            )
        for name, value in (("min", self.min_ratio), ("max", self.max_ratio)):
            if not (0.0 <= value <= 1.0) or math.isnan(value):
                raise ValueError(f"adaptive {name} keep ratio {value} is not allowed: it must be in [0, 1]")
        if self.min_ratio > self.max_ratio:
            raise ValueError(
                f"adaptive min keep ratio {self.min_ratio} is greater than max {self.max_ratio}: need min <= max"
            )

    def __str__(self) -> str:
        return f"t{format_ratio(self.threshold)}:{format_ratio(self.min_ratio)}:{format_ratio(self.max_ratio)}"

    def __format__(self, spec: str) -> str:
        return str(self)


@dataclass(frozen=True)
class ZipCounts:
    """A pre-LLM stage (layer 0, written ``0:D+C``): each image reaches the LLM as ``dominant`` tokens (the
    encoder's [CLS] counted among them, as VisionZip counts it) plus ``contextual`` merged tokens."""

    dominant: int
    contextual: int

    def __post_init__(self) -> None:
        if self.dominant < 1 or self.contextual < 1:
            raise ValueError(f"pre-LLM stage {self} is not allowed: VisionZip keeps at least 1 dominant token (the "
                             "[CLS]) and 1 contextual token (write 0:D+C with integers D >= 1, C >= 1)")

    @property
    def tokens(self) -> int:
        return self.dominant + self.contextual

    def __str__(self) -> str:
        return f"{self.dominant}+{self.contextual}"

    def __format__(self, spec: str) -> str:
        return str(self)


MAX_THRESHOLD = 100.0
Stage = tuple[int, "float | Adaptive | ZipCounts"]


def _zip_counts(text: str) -> ZipCounts:
    dominant, _, contextual = text.partition("+")
    if not (dominant.strip().isdigit() and contextual.strip().isdigit()):
        raise ValueError(f"{text!r} is not D+C")
    return ZipCounts(int(dominant), int(contextual))


@dataclass(frozen=True)
class DropSchedule:
    """Ordered ``(layer, keep_ratio)`` stages; the keep ratio applies to the vision tokens still alive."""

    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        stages = tuple(
            (int(layer), ratio if isinstance(ratio, (Adaptive, ZipCounts)) else float(ratio))
            for layer, ratio in self.stages
        )
        object.__setattr__(self, "stages", stages)
        prev = 0
        for i, (layer, ratio) in enumerate(stages):
            if isinstance(ratio, ZipCounts):
                if layer != 0 or i != 0:
                    raise ValueError(f"pre-LLM stage {ratio} at layer {layer} is not allowed: a D+C stage is written "
                                     "at layer 0 and comes first (0:D+C)")
                continue
            if layer < 1:
                raise ValueError(
                    f"drop layer {layer} is not allowed: layers must be >= 1 (layer 0 never drops, "
                    "transformers reads the cache length from it)"
                )
            if layer <= prev:
                raise ValueError(
                    f"drop layer {layer} follows layer {max(prev, 0)}: layers must be strictly increasing"
                )
            if isinstance(ratio, Adaptive):
                pass
            elif not (0.0 <= ratio <= 1.0) or math.isnan(ratio):
                raise ValueError(f"keep ratio {ratio} at layer {layer} is not allowed: it must be in [0, 1]")
            prev = layer

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str | DropSchedule) -> DropSchedule:
        """Parse ``"3:0.5/17:0.3/22:0"`` (stages ``layer:keep_ratio`` separated by ``/``).

        ``""`` or ``"none"`` is the empty schedule (nothing dropped).
        """
        if isinstance(text, DropSchedule):
            return text
        if not isinstance(text, str):
            raise ValueError(f"schedule {text!r} is not a string like '3:0.5/17:0.3/22:0'")
        body = text.strip()
        if body.lower() in ("", "none"):
            return cls(())
        stages: list[Stage] = []
        for part in body.split("/"):
            layer_s, sep, ratio_s = part.strip().partition(":")
            try:
                if not sep:
                    raise ValueError
                if ratio_s.startswith("t"):
                    threshold, lo, hi = (parse_ratio(x) for x in ratio_s[1:].split(":"))
                    stages.append((int(layer_s), Adaptive(threshold, lo, hi)))
                elif "+" in ratio_s:
                    stages.append((int(layer_s), _zip_counts(ratio_s)))
                else:
                    stages.append((int(layer_s), parse_ratio(ratio_s)))
            except ValueError as err:
                if "adaptive" in str(err) or "VisionZip" in str(err):
                    raise
                if "represent" in str(err):
                    raise ValueError(f"schedule stage {part!r} in {text!r}: {err}") from None
                raise ValueError(
                    f"schedule stage {part!r} in {text!r} is not 'layer:keep_ratio', 'layer:tTHRESHOLD:MIN:MAX' or "
                    "the pre-LLM '0:D+C'; expected stages like '3:0.5/17:0.3/22:0', '3:t1.0:0.1:0.6/22:0' (integer "
                    "layer >= 1, ratios in [0, 1], separated by '/') or '0:108+20' (VisionZip)"
                ) from None
        return cls(tuple(stages))

    @classmethod
    def adaptive(
        cls, threshold: float, min_ratio: float, max_ratio: float, layers: tuple[int, ...] = (3, 17), final: int | None = 22
    ) -> DropSchedule:
        """Adaptive stages at ``layers`` (same threshold and bounds), then ``final:0`` if given."""
        stages: list[Stage] = [(layer, Adaptive(threshold, min_ratio, max_ratio)) for layer in layers]
        if final is not None:
            stages.append((final, 0.0))
        return cls(tuple(stages))

    @classmethod
    def preset(cls, family: str, budget: int | str, method: str = "") -> DropSchedule:
        """``method``'s preset schedule for ``family`` (``llava``, ``qwen2_vl``, ...) at ``budget``; ``""``:
        the default method's. The tables live with the methods (``v2drop_eval.methods.presets``, above the
        engine), which install this lookup when they load; ``v2drop_eval.DropSchedule`` loads them."""
        if _PRESET_LOOKUP is None:
            raise RuntimeError("DropSchedule.preset needs the method registry: use v2drop_eval.DropSchedule, or "
                               "import v2drop_eval.methods.presets first")
        return cls.parse(_PRESET_LOOKUP(family, budget, method))

    # -- queries ------------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(layer for layer, _ in self.stages)

    @property
    def is_empty(self) -> bool:
        return not self.stages

    @property
    def is_adaptive(self) -> bool:
        return any(isinstance(r, Adaptive) for _, r in self.stages)

    @property
    def pre_llm(self) -> ZipCounts | None:
        """The pre-LLM stage (``0:D+C``), or None."""
        return next((r for _, r in self.stages if isinstance(r, ZipCounts)), None)

    @property
    def llm_stages(self) -> tuple[Stage, ...]:
        """The stages inside the decoder (layer >= 1)."""
        return tuple((layer, r) for layer, r in self.stages if not isinstance(r, ZipCounts))

    def slug(self) -> str:
        """A file-name-safe form: ``3-0.5_17-0.3_22-0`` (adaptive: ``3-t1-0.1-0.6``)."""
        return "_".join(f"{layer}-{_ratio_text(r).replace(':', '-')}" for layer, r in self.stages) or "none"

    def check_depth(self, num_layers: int) -> None:
        """Raise if a stage names a layer the model does not have."""
        for layer, _ in self.stages:
            if layer >= num_layers:
                raise ValueError(
                    f"drop layer {layer} is past the model's depth: it has {num_layers} decoder layers, "
                    f"so layers must be in 1..{num_layers - 1}"
                )

    def tokens_per_layer(self, num_vision_tokens: int, num_layers: int, method: Method | str = "",
                         options: Iterable[str] = ()) -> list[int]:
        """Vision tokens entering each decoder layer when ``method`` (a name, ``""``: the default method, or
        the :class:`Method`) runs this schedule with ``options``: each method counts with its authors'
        formula (``Method.stage_keep``, plus the tokens it merges, ``Method.merged_count``; docs/methods.md)."""
        if self.is_adaptive:
            raise ValueError(
                f"schedule {self} is adaptive: its counts depend on each image; use bounds_per_layer() for the "
                "range, and the handle's last_stats for what was kept"
            )
        return self.bounds_per_layer(num_vision_tokens, num_layers, method, options)[0]

    def bounds_per_layer(self, num_vision_tokens: int, num_layers: int, method: Method | str = "",
                         options: Iterable[str] = ()) -> tuple[list[int], list[int]]:
        """Fewest and most vision tokens entering each layer (equal for fixed schedules)."""
        self.check_depth(num_layers)
        spec, opts = _counting(method), frozenset(options)
        ratios = dict(self.stages)
        lo = hi = initial = int(num_vision_tokens)
        so_far: list[float | Adaptive] = []
        los, his = [], []
        for layer in range(num_layers):
            r = ratios.get(layer)
            if isinstance(r, ZipCounts):  # per image of num_vision_tokens (the presets' 576-token shape)
                lo = hi = min(lo, r.tokens)
            elif isinstance(r, Adaptive):
                lo, hi = kept_count(lo, r.min_ratio), kept_count(hi, r.max_ratio)
            elif r is not None:
                so_far.append(r)
                lo, hi = (_after_stage(spec, n, tuple(so_far), initial, opts) for n in (lo, hi))
            los.append(lo)
            his.append(hi)
        return los, his

    def average_tokens(self, num_vision_tokens: int, num_layers: int, method: Method | str = "",
                       options: Iterable[str] = ()) -> float:
        """Mean over decoder layers of the vision tokens each layer sees (the papers' "retained")."""
        per_layer = self.tokens_per_layer(num_vision_tokens, num_layers, method, options)
        return sum(per_layer) / len(per_layer)

    def __str__(self) -> str:
        return "/".join(f"{layer}:{_ratio_text(ratio)}" for layer, ratio in self.stages) or "none"


def _ratio_text(ratio: float | Adaptive | ZipCounts) -> str:
    return str(ratio) if isinstance(ratio, (Adaptive, ZipCounts)) else format_ratio(ratio)


def _after_stage(spec: Method, alive: int, ratios: tuple[float, ...], initial: int, options: frozenset[str]) -> int:
    """Vision tokens after a stage: those ``spec`` keeps, plus the merged tokens it adds (SparseVLM's recycled
    ones count as vision tokens from the stage on)."""
    keep = spec.stage_keep(alive, ratios, initial, options)
    return keep + spec.merged_count(alive - keep)
