"""The plugin's own model arguments: parsed, checked and removed from ``kwargs`` before any weight loads.

lmms-eval hands every ``--model_args`` entry to the model class as a keyword argument, already
converted to bool / int / float / str. The parent classes (``llava_hf``, ``qwen2_vl``, ...)
``assert kwargs == {}``, so ours are popped first; anything that is neither ours nor the parent's is
refused here with the list of allowed names (the parent's assert would not name them).

Everything that can be checked without weights is checked here, including the schedule against the
model's depth (``num_hidden_layers`` of the text config, read with ``AutoConfig``), so that a bad run
fails in seconds and lmms-eval writes no results file.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from v2drop_eval.engine.families import (
    ENCODER_DROP_TYPES,
    FAMILIES,
    VISIONZIP_TYPES,
    get_family,
    lmms_siblings,
)
from v2drop_eval.engine.method import KEEP, RENUMBER
from v2drop_eval.methods import BASELINE, DEFAULT_METHOD, get_method, options_text
from v2drop_eval.methods.presets import DropSchedule, fitted_preset
from v2drop_eval.methods.rules import (
    DEFAULT_METRIC,
    METHODS,
    METRICS,
    as_int,
    check_drop_method,
    local_model_problem,
    validate,
    validate_encoder,
)

__all__ = ["DropArgs", "OWN_ARGS", "METHODS", "METRICS", "FAMILIES", "EXIT_USER_ERROR", "ModelArgsError",
           "user_errors", "pop_drop_args", "check_batch_size", "check_checkpoint", "allowed_args"]

OWN_ARGS = ("budget", "schedule", "method", "metric", "seed", "options", "positions", "sidecar", "warmup",
            "encoder_schedule")
EXIT_USER_ERROR = 2


class ModelArgsError(SystemExit):
    """A user error in a class's model arguments: the lmms-eval process ends with status 2 and the message.

    lmms-eval 0.7.3 runs the whole evaluation inside ``except Exception`` and then exits 0 without results,
    so a ``ValueError`` from a constructor would look like success to a script or a SLURM array. A
    ``SystemExit`` is not an ``Exception``: it passes through. Python prints nothing for an integer exit
    status, so :func:`user_errors` prints the message on stderr first."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_USER_ERROR)
        self.message = message

    def __str__(self) -> str:
        return self.message


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Around a class's argument handling: a ``ValueError`` (a bad argument, named with what is allowed)
    becomes :class:`ModelArgsError`, its one line printed on stderr."""
    try:
        yield
    except ValueError as exc:
        message = " ".join(str(exc).split("\n"))
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise ModelArgsError(message) from None


def check_batch_size(model_name: str, value: Any) -> int:
    """lmms-eval's ``--batch_size`` as our classes take it: an integer >= 1 (they batch themselves, so
    ``auto`` is not supported); anything else is refused rather than run at batch size 1."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise _fail(model_name, f"batch_size={value} is not allowed; give an integer >= 1 "
                                "(--batch_size; 'auto' is not supported by the v2drop classes)")
    return int(text)


@dataclass(frozen=True)
class DropArgs:
    """What to drop and how, as given on the command line (resolved to one schedule)."""

    family: str
    method: str
    schedule: DropSchedule
    budget: int | str | None
    metric: str | None  # methods that take one only (v2drop)
    seed: int | None  # methods that take one only (random; None: not given, then 0)
    sidecar: str | None
    warmup: int
    num_layers: int | None = None  # filled in by check_checkpoint
    options: frozenset[str] = frozenset()  # the method's named departures from its authors' rule
    positions: str | None = None  # keep | renumber; None: the method's authors' rule
    preset_scaled: bool = False  # budget's preset scaled to a model too shallow for it (check_checkpoint)
    encoder_schedule: DropSchedule | None = None  # V2Drop's stages inside the vision encoder

    def describe(self) -> dict[str, Any]:
        """The side-car's description of the run."""
        return {
            "family": self.family,
            "method": self.method,
            "schedule": None if self.schedule.is_empty else str(self.schedule),
            "budget": self.budget,
            "metric": self.metric,
            "seed": self.seed,
            "options": options_text(self.options) or None,
            "encoder_schedule": None if self.encoder_schedule is None else str(self.encoder_schedule),
            "positions": self.positions,
        }


def _fail(model_name: str, message: str) -> ValueError:
    return ValueError(f"{model_name}: {message}")


def allowed_args(parent: type, extra: Iterable[str] = ()) -> list[str]:
    """Keyword arguments the parent class's ``__init__`` names, plus ours and ``extra``."""
    names = [
        p.name for p in inspect.signature(parent.__init__).parameters.values()
        if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    return sorted(set(names) | set(OWN_ARGS) | set(extra))


def pop_drop_args(kwargs: dict[str, Any], family: str, parent: type, extra: Iterable[str] = ()) -> DropArgs:
    """Remove and validate our arguments from ``kwargs``; refuse names neither we nor ``parent`` take.

    ``extra``: names the subclass handles itself (e.g. ``attn_implementation`` for Qwen2-VL).
    Raises ``ValueError`` naming the bad value and what is allowed.
    """
    model_name = FAMILIES[family].lmms_model
    allowed = allowed_args(parent, extra)
    unknown = sorted(k for k in kwargs if k not in allowed)
    if unknown:
        raise _fail(model_name, f"unknown model argument(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")

    given = set(kwargs)
    method = str(kwargs.pop("method", DEFAULT_METHOD)).strip().lower()
    metric = kwargs.pop("metric", None)
    metric = None if metric is None else str(metric).strip().lower()
    seed = as_int(kwargs.pop("seed", None))  # lmms-eval reads seed=-1 as -1.0
    options = kwargs.pop("options", None)
    options = None if options is None else str(options)  # "a+b": lmms-eval splits model args on commas
    positions = kwargs.pop("positions", None)
    positions = None if positions is None else str(positions).strip().lower()
    try:
        validate(method, metric=metric, seed=seed, options=options, positions=positions)
        options = check_drop_method(method, options=options)
    except ValueError as exc:
        raise _fail(model_name, str(exc)) from None
    spec = get_method(method)
    if spec.takes_metric and metric is None:
        metric = DEFAULT_METRIC
    if not spec.takes_metric:
        metric = None  # the default metric, handed to a method that ranks without one
    if not spec.takes_seed and seed is not None:
        seed = None

    warmup = kwargs.pop("warmup", 1)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise _fail(model_name, f"warmup={warmup!r} is not allowed; give an integer >= 0 (untimed warm-up batches)")

    sidecar = kwargs.pop("sidecar", None)
    sidecar = None if sidecar is None else str(sidecar)

    encoder_text = kwargs.pop("encoder_schedule", None)
    try:
        encoder = validate_encoder(None if encoder_text is None else str(encoder_text), method)
    except ValueError as exc:
        raise _fail(model_name, str(exc)) from None

    budget = kwargs.pop("budget", None)
    schedule_text = kwargs.pop("schedule", None)
    if budget is not None and schedule_text is not None:
        raise _fail(model_name, f"give budget= or schedule=, not both (got budget={budget}, schedule={schedule_text})")

    if not spec.drops:
        if budget is not None:
            raise _fail(model_name, f"method=none runs the unpruned model; drop budget={budget}")
        if schedule_text is not None and DropSchedule.parse(str(schedule_text)).stages:
            raise _fail(model_name, f"method=none runs the unpruned model; drop schedule={schedule_text}")
        schedule = DropSchedule(())
    elif budget is not None:
        # v2drop_llava serves families with different preset tables (llava, llava_onevision): a budget any
        # of them has is taken here; check_checkpoint resolves it for the checkpoint's own family.
        tables = [f.name for f in lmms_siblings(family) if _has_preset(f.name, budget, method)]
        try:
            schedule = DropSchedule.preset(tables[0] if tables else family, budget, method=method)
        except ValueError as exc:
            raise _fail(model_name, f"budget={budget}: {exc}") from None
    elif schedule_text is not None:
        try:
            schedule = DropSchedule.parse(str(schedule_text))
        except ValueError as exc:
            raise _fail(model_name, f"schedule={schedule_text}: {exc}") from None
        if schedule.is_empty:
            raise _fail(model_name, f"schedule={schedule_text} drops nothing; for the unpruned baseline use method=none")
    elif encoder is not None and method == DEFAULT_METHOD and "method" not in given and not options:
        schedule = DropSchedule(())  # encoder_schedule= alone: V2Drop inside the encoder, the decoder whole
        method, metric, seed = BASELINE, None, None  # the default method's metric does not go to the baseline
    else:
        raise _fail(model_name, f"method={method} needs budget= (a published preset, e.g. budget=128) or "
                                "schedule= (e.g. schedule=3:0.5/17:0.3/22:0); for the unpruned baseline use method=none")

    try:
        validate(method, schedule)
    except ValueError as exc:
        raise _fail(model_name, str(exc)) from None

    if isinstance(budget, float) and budget.is_integer():
        budget = int(budget)
    return DropArgs(family=family, method=method, schedule=schedule, budget=budget, metric=metric, seed=seed,
                    sidecar=sidecar, warmup=warmup, options=options, encoder_schedule=encoder, positions=positions)


def _has_preset(family: str, budget: Any, method: str) -> bool:
    try:
        DropSchedule.preset(family, budget, method=method)
    except ValueError:
        return False
    return True


def check_checkpoint(args: DropArgs, pretrained: str, **config_kwargs: Any) -> DropArgs:
    """Read the checkpoint's config (no weights): right family, and every drop layer within its depth.

    The family becomes the checkpoint's own among those served by the same lmms-eval model
    (``v2drop_llava``: ``llava`` for LLaVA-1.5 / NeXT, ``llava_onevision``), and ``budget=`` takes
    that family's preset table."""
    from transformers import AutoConfig

    model_name = FAMILIES[args.family].lmms_model
    siblings = lmms_siblings(args.family)
    accepted = tuple(t for f in siblings for t in f.model_types)
    problem = local_model_problem(str(pretrained))
    if problem:  # before transformers, which would report a missing folder as a bad repo id
        raise _fail(model_name, problem)
    try:
        config = AutoConfig.from_pretrained(pretrained, **config_kwargs)
    except OSError as exc:  # a hub id not cached offline, a folder without config.json, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _fail(model_name, f"pretrained={pretrained}: cannot read its config ({first[:200]})") from None
    model_type = getattr(config, "model_type", None)
    if model_type not in accepted:
        others = [f.lmms_model for f in FAMILIES.values() if model_type in f.model_types]
        hint = f"; use --model {others[0]}" if others else ""
        raise _fail(model_name, f"{pretrained} is a {model_type!r} checkpoint; this model takes "
                                f"model_type {' or '.join(accepted)}{hint}")
    family = next(f.name for f in siblings if model_type in f.model_types)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_layers = int(text_config.num_hidden_layers)
    _check_before_llm(args, config, model_type, family, pretrained, model_name)
    schedule, scaled = args.schedule, False
    if args.budget is not None and not args.schedule.is_empty:
        try:
            schedule, scaled = fitted_preset(family, args.budget, args.method, num_layers, patches=_patches(config))
        except ValueError as exc:
            raise _fail(model_name, f"budget={args.budget} for {pretrained} ({model_type}): {exc}") from None
    try:
        schedule.check_depth(num_layers)
    except ValueError as exc:
        raise _fail(model_name, f"schedule {schedule} does not fit {pretrained}: {exc}") from None
    return DropArgs(**{**args.__dict__, "family": family, "schedule": schedule, "num_layers": num_layers,
                       "preset_scaled": scaled})


def _patches(config: Any) -> int | None:
    """Patches per crop of a CLIP-like vision config (image_size / patch_size, squared), else None."""
    vision = getattr(config, "vision_config", None)
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    return (int(size) // int(patch)) ** 2 if isinstance(size, int) and isinstance(patch, int) else None


def _check_before_llm(args: DropArgs, config: Any, model_type: str, family: str, pretrained: str,
                      model_name: str) -> None:
    """encoder_schedule= and method=visionzip against the checkpoint's type and encoder depth (no weights)."""
    if args.encoder_schedule is not None:
        if model_type not in ENCODER_DROP_TYPES:
            raise _fail(model_name, f"encoder_schedule={args.encoder_schedule} runs on {', '.join(ENCODER_DROP_TYPES)} "
                                    f"checkpoints; {pretrained} is {model_type!r}")
        vision = config.vision_config
        depth = getattr(vision, "depth", None)
        if depth is None:  # CLIP: the blocks up to the feature layer the model reads
            layer = getattr(config, "vision_feature_layer", -2)
            depth = int(layer) % (int(vision.num_hidden_layers) + 1) if isinstance(layer, int) else 0
        try:
            args.encoder_schedule.check_depth(int(depth))
        except ValueError:
            raise _fail(model_name, f"encoder_schedule={args.encoder_schedule} does not fit {pretrained}'s vision "
                                    f"encoder: stages are before its blocks 1..{int(depth) - 1}") from None
    if args.schedule.pre_llm is not None and model_type not in VISIONZIP_TYPES:
        raise _fail(model_name, f"method={args.method} runs on {', '.join(VISIONZIP_TYPES)} checkpoints (a CLIP "
                                f"[CLS] the authors' code reads); {pretrained} is {model_type!r}")
    removes_before = args.encoder_schedule is not None or args.schedule.pre_llm is not None
    if args.positions == RENUMBER and removes_before and get_family(family).mrope:
        raise _fail(model_name, f"positions={RENUMBER} before the LLM is for 1-D rotary positions; {pretrained}'s "
                                f"M-RoPE positions are each patch's time / height / width, so the tokens that reach "
                                f"its decoder keep their own (positions={KEEP})")
