"""The configurations one bench group times: per method and budget its schedule (the preset scaled to the
shape's depth), V2Drop at FastV's schedule, ``plain`` and ``keep1.0`` (``--extras``), each method's named
options (``--options``), and each of them again with stages inside the vision encoder (``--encoder-schedules``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from v2drop_eval.bench.report import KEEP_ALL, PLAIN
from v2drop_eval.bench.shapes import Shape, encoder_pair
from v2drop_eval.methods import BASELINE, DEFAULT_METHOD, METHODS, get_method, parse_options
from v2drop_eval.methods.fastv import METHOD as FASTV
from v2drop_eval.methods.fastv_attn import METHOD as FASTV_ATTN
from v2drop_eval.methods.presets import DropSchedule, scaled_schedule

__all__ = ["BenchConfig", "bench_configs", "bench_options"]


@dataclass
class BenchConfig:
    method: str
    budget: str
    schedule: DropSchedule
    options: frozenset[str] = frozenset()  # the method's named options (those of --options it takes)
    encoder_schedule: DropSchedule | None = None  # the stages run (on a slice: at its blocks)
    encoder_label: str = ""  # the stages of the whole model the slice stands for
    label: str = field(init=False)  # one name per configuration: "plain", "none", "v2drop@128", ...

    def __post_init__(self) -> None:
        self.label = self.method if self.budget == "-" else f"{self.method}@{self.budget}"


def bench_options(methods: Sequence[str], options: str | None) -> dict[str, frozenset[str]]:
    """``--options a+b``: per benched method, the options it takes; ValueError for an unknown option or one
    that none of ``methods`` takes."""
    chosen = parse_options(options)
    takes = {m: frozenset(o.name for o in get_method(m).options) for m in methods}
    for name in sorted(chosen):
        if not any(name in t for t in takes.values()):
            takers = ", ".join(m for m in METHODS if name in (o.name for o in get_method(m).options))
            raise ValueError(f"option {name} applies to {takers} only; none of the benched methods "
                             f"({', '.join(methods)}) takes it")
    return {m: chosen & t for m, t in takes.items()}


def bench_configs(shape: Shape, methods: Sequence[str], budgets: Sequence[str], extras: bool,
             options: dict[str, frozenset[str]] | None = None, encoder_schedules: Sequence[str] = (),
             encoder_methods: Sequence[str] | None = None) -> list[BenchConfig]:
    out = _llm_configs(shape, methods, budgets, extras, options)
    for text in encoder_schedules:
        real, run = encoder_pair(text)
        for cfg in [c for c in out if c.method != PLAIN and not c.encoder_label and c.budget != KEEP_ALL
                    and not get_method(c.method).pre_llm and (encoder_methods is None or c.method in encoder_methods)]:
            budget = f"{cfg.budget}+e{real}" if cfg.budget != "-" else f"e{real}"
            out.append(BenchConfig(cfg.method, budget, cfg.schedule, cfg.options, DropSchedule.parse(run), real))
    return out


def _llm_configs(shape: Shape, methods: Sequence[str], budgets: Sequence[str], extras: bool,
                 options: dict[str, frozenset[str]] | None = None) -> list[BenchConfig]:
    opts = options or {}
    out = [BenchConfig(PLAIN, "-", DropSchedule(()))] if extras else []
    if BASELINE in methods:
        out.append(BenchConfig(BASELINE, "-", DropSchedule(())))
    for budget in budgets:
        for method in methods:
            if method != BASELINE:
                out.append(BenchConfig(method, str(budget), scaled_schedule(shape.family, budget, method, shape.layers),
                                   opts.get(method, frozenset())))
    if DEFAULT_METHOD in methods and ({FASTV.name, FASTV_ATTN.name} & set(methods)):
        # V2Drop at FastV's own one-stage schedule: the scorers compared at the same token counts.
        for budget in budgets:
            sched = scaled_schedule(shape.family, budget, FASTV.name, shape.layers)
            out.append(BenchConfig(DEFAULT_METHOD, f"{budget}@{FASTV.name}", sched, opts.get(DEFAULT_METHOD, frozenset())))
    v2 = [c for c in out if c.method == DEFAULT_METHOD]
    if extras and v2:
        # hooks on every layer, nothing dropped: the cost of the machinery alone
        keep_all = DropSchedule(tuple((layer, 1.0) for layer, _ in v2[0].schedule.stages))
        out.append(BenchConfig(DEFAULT_METHOD, KEEP_ALL, keep_all))
    return out
