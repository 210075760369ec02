"""`v2drop-eval bench`: prefill and generation speed against the FLOPs limit, and the dropper's own cost.

Random-weight models with real shapes (full 7B shapes on a GPU; ``7b-slice``: LLaVA-1.5-7B's layer
width on a CPU; ``small`` for quick checks). Everything runs in one process with pinned threads.

- The dropper's cost is measured inside its hooks (``v2drop_eval.engine.clock``: CUDA events on a GPU,
  ``perf_counter`` on a CPU) and reported as a share of the LLM prefill of the same run.
- Repeats are paired and interleaved: each repeat runs every configuration once, in an order rotated
  by one each repeat, so drift of the machine hits all of them alike; a method is compared with its
  reference in the same repeat (``v2drop_eval.bench.report``: medians of paired ratios, 95% bootstrap
  intervals, verdicts met / missed / undecided).

Timing: forward pre/post hooks on the top model time each forward call of ``generate``; the first
is the prefill (time to first token), the rest are decode steps. Hooks on the LLM decoder time the
decoder alone (``llm_prefill_ms``), which is what the analytic FLOPs describe. On CUDA these outer
stamps follow ``torch.cuda.synchronize()`` (the dropper's own hooks never synchronize). The vision
encoder's forward (``vision_ms``) is timed by the dropper's encoder hooks; ``--encoder-schedules``
adds each configuration again with V2Drop's stages inside the encoder.
On slice shapes (``v2drop_eval.bench.shapes``) the rows also give the time to first token extrapolated to
the whole model and the vision encoder's share of it (docs/bench.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from v2drop_eval.bench.configs import BenchConfig, bench_configs, bench_options
from v2drop_eval.bench.options import ATTNS, DTYPES, check_args, check_device
from v2drop_eval.bench.report import PLAIN, check_writable, summarize, write_outputs
from v2drop_eval.bench.shapes import (
    SHAPES,
    build_model,
    encoder_pair,
    encoder_schedules_of,
    make_inputs,
    runs_on,
    vision_depth,
)
from v2drop_eval.methods import METHODS
from v2drop_eval.methods.api import attach
from v2drop_eval.methods.presets import preset_table, scaled_schedule
from v2drop_eval.methods.rules import validate, validate_encoder

__all__ = ["DTYPES", "ATTNS", "check_args", "SHAPES", "SHAPE_DEFAULTS", "PLAIN", "scaled_schedule", "run_bench", "pin_threads", "machine_info", "main"]

# Per-shape defaults of the command line (any flag given wins). ``extras``: also time ``plain`` (no
# hooks) and V2Drop with hooks on and nothing dropped (``keep1.0``), cross-checks of the hooks' cost.
COMMON_DEFAULTS: dict[str, Any] = dict(attn="sdpa,eager", batch_sizes="1,8", methods=",".join(METHODS), budgets=None,
                                       repeats=5, warmup=1, new_tokens=32, extras=True, threads=None, time_budget=None,
                                       encoder_schedules=None)
SHAPE_DEFAULTS: dict[str, dict[str, Any]] = {
    # About 10 minutes on 2 quiet cores (one 636-token LLM prefill at width 4096 takes ~2.5 s a layer);
    # the time guard ends it after 25 minutes on a busy machine. One thread: on a shared machine an
    # OpenMP barrier waits for a descheduled peer thread, which inflates short ops (the dropper's)
    # many-fold and would bias the dropper share (docs/bench.md). The targets' configurations only.
    "7b-slice": dict(attn="sdpa", batch_sizes="1", methods="none,v2drop,random,fastv_attn", budgets="128",
                     repeats=10, warmup=1, new_tokens=2, extras=False, threads=1, time_budget=1500),
    # The vision share, with and without V2Drop inside the encoder (a few repeats: each takes minutes).
    "7b-slice-vision": dict(attn="sdpa", batch_sizes="1", methods="none,v2drop", budgets="128", repeats=3, warmup=1,
                            new_tokens=2, extras=False, threads=1, time_budget=1500, encoder_schedules="default"),
    "qwen2-vl-hires-slice": dict(attn="sdpa", batch_sizes="1", methods="none", budgets="128", repeats=3, warmup=1,
                                 new_tokens=2, extras=False, threads=1, time_budget=1500, encoder_schedules="default"),
}


class _Timer:
    """Times every forward call of a module (synchronizing on CUDA: the bench's outer stamps only)."""

    def __init__(self, module: nn.Module, cuda: bool) -> None:
        self.cuda = cuda
        self.times: list[float] = []
        self.ends: list[float] = []  # when each forward returned
        self._t0 = 0.0
        self._hooks = [module.register_forward_pre_hook(self._start), module.register_forward_hook(self._stop)]

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _start(self, *_: Any) -> None:
        self._t0 = self.now()

    def _stop(self, *_: Any) -> None:
        end = self.now()
        self.times.append(end - self._t0)
        self.ends.append(end)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def _measure(model: nn.Module, inputs: dict, cfg: BenchConfig, new_tokens: int, cuda: bool) -> dict:
    """One ``generate`` of ``new_tokens`` under ``cfg``: the figures of one repeat."""
    handle = None if cfg.method == PLAIN else attach(model, cfg.schedule, method=cfg.method, options=cfg.options,
                                                     encoder_schedule=cfg.encoder_schedule)
    top = _Timer(model, cuda)
    llm = _Timer(model.model.language_model, cuda)
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = top.now()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 return_dict_in_generate=True)
        total = top.now() - t0
        cache = out.past_key_values
        kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        kv -= (new_tokens - 1) * sum(layer.keys[:, :, :1].numel() * 2 * layer.keys.element_size() for layer in cache.layers)
        # read after generate: on CUDA the dropper's events are resolved here, outside its hot path
        stats = handle.last_stats if handle is not None else None
        dropper = handle.dropper_times() if handle is not None else None
    finally:
        top.remove()
        llm.remove()
        if handle is not None:
            handle.detach()
    decode = top.times[1:]
    return {
        # generate entry -> first forward returned: from transformers 5.24 on generate runs the vision
        # encoder before that forward, so the forward alone no longer holds it (docs/design.md §3)
        "prefill_ms": (top.ends[0] - t0) * 1e3,
        "prefill_forward_ms": top.times[0] * 1e3,
        "llm_prefill_ms": llm.times[0] * 1e3,
        "decode_ms_per_token": (sum(decode) / len(decode) * 1e3) if decode else 0.0,
        "generate_ms": total * 1e3,
        "kv_cache_bytes": int(kv),
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
        "dropper": dropper,
        "vision_per_layer": stats[0]["vision_per_layer"] if stats else None,
        "vision_ms": stats[0].get("vision_ms") if stats else None,
        "vision_flops": sum(s.get("vision_flops") or 0 for s in stats) if stats else None,
    }


def rotated(items: Sequence[Any], shift: int) -> list[Any]:
    """``items`` started at ``shift`` (mod its length): repeat r runs the configurations in this order."""
    k = shift % len(items) if items else 0
    return [*items[k:], *items[:k]]


def pin_threads(threads: int | None) -> int:
    """Fix torch's intra-op threads (and OMP / MKL for anything started from here); returns the count."""
    n = int(threads) if threads is not None else int(os.cpu_count() or 1)
    if n < 1:
        raise ValueError(f"threads={threads!r} is not allowed; give a count >= 1")
    torch.set_num_threads(n)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    return n


@dataclass
class TimeGuard:
    """Stops repeats early so a run ends by its deadline: each (attn, batch size) group gets an equal
    share of the time left, and a repeat starts only if the last one still fits in that share (at
    least one recorded repeat per group). One guard can span several shapes (the GPU suite)."""

    budget_s: float | None
    groups: int
    done: int = 0
    start: float = field(default_factory=time.monotonic)
    stopped_early: list[str] = field(default_factory=list)

    def group_deadline(self) -> float:
        if self.budget_s is None:
            return float("inf")
        now = time.monotonic()
        return now + (self.start + self.budget_s - now) / max(1, self.groups - self.done)


def run_bench(
    shape_name: str,
    device: str = "cpu",
    attns: Sequence[str] = ("sdpa", "eager"),
    batch_sizes: Sequence[int] = (1, 8),
    methods: Sequence[str] = METHODS,
    budgets: Sequence[str] | None = None,
    repeats: int = 5,
    warmup: int = 1,
    new_tokens: int = 32,
    dtype: str | None = None,
    extras: bool = True,
    guard: TimeGuard | None = None,
    log: Callable[[str], Any] = print,
    on_group: Callable[[list[dict]], Any] | None = None,
    options: str | None = None,
    encoder_schedules: Sequence[str] = (),
    encoder_methods: Sequence[str] | None = None,
) -> list[dict]:
    """Time every (attn, batch size, method, budget[, encoder schedule]) in one process; returns the rows.
    ``options`` (``a+b``) go to each method that takes them. ``encoder_schedules``: each configuration again
    with these stages inside the vision encoder (``"real=slice"``: the stages of the whole model, and where
    the slice runs them), for the methods in ``encoder_methods`` (None: all but a pre-LLM method).
    ``on_group``: called with the rows so far after each (attn, batch size) group (to save them at once)."""
    if shape_name not in SHAPES:
        raise ValueError(f"unknown shape {shape_name!r}; allowed: {', '.join(SHAPES)}")
    for m in methods:
        validate(m)
        if not runs_on(m, SHAPES[shape_name]):
            raise ValueError(f"method {m} does not run on shape {shape_name} ({SHAPES[shape_name].family}): it needs "
                             "LLaVA-1.5's CLIP [CLS]")
    for text in encoder_schedules:
        for part in encoder_pair(text):
            validate_encoder(part)
    per_method = bench_options(methods, options)
    check_device(device)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats}, warmup={warmup}: repeats must be >= 1 and warmup >= 0")
    shape = SHAPES[shape_name]
    budgets = list(budgets) if budgets is not None else [str(b) for b in preset_table(shape.family)]
    torch_dtype = getattr(torch, dtype) if dtype else (torch.float16 if device == "cuda" else torch.float32)
    cuda = device == "cuda"
    guard = guard or TimeGuard(None, len(attns) * len(batch_sizes))
    rows: list[dict] = []
    for attn in attns:
        model = build_model(shape, attn, device, torch_dtype)
        text_cfg = model.model.language_model.config
        for bs in batch_sizes:
            deadline = guard.group_deadline()
            inputs = make_inputs(model, shape, bs, device, torch_dtype)
            configs = bench_configs(shape, methods, budgets, extras, per_method, encoder_schedules, encoder_methods)
            samples: dict[str, list[dict]] = {c.label: [] for c in configs}
            rep, last = 0, 0.0
            while rep < warmup + repeats:
                if rep > warmup and time.monotonic() + last > deadline:
                    guard.stopped_early.append(f"{shape_name} {attn} batch {bs}: {rep - warmup} of {repeats} repeats")
                    break
                t0 = time.monotonic()
                for cfg in rotated(configs, rep):  # a new order each repeat: drift hits every config alike
                    result = _measure(model, inputs, cfg, new_tokens, cuda)
                    if rep >= warmup:
                        samples[cfg.label].append(result)
                last = time.monotonic() - t0
                rep += 1
                log(f"[bench] {shape_name} {attn} bs={bs} repeat {rep}/{warmup + repeats} done ({last:.1f} s)")
            group = [(c.method, c.budget, c.schedule, samples[c.label], c.options, c.encoder_label, c.encoder_schedule)
                     for c in configs]
            scale = (shape.full_layers / shape.layers if shape.full_layers else 1.0,
                     shape.full_vision_layers / vision_depth(shape) if shape.full_vision_layers else 1.0)
            rows.extend(summarize(shape_name, device, attn, bs, group, text_cfg, shape.layers, shape.vision_tokens,
                                  shape.text_tokens + (2 if shape.family == "qwen2_vl" else 0), scale=scale))
            guard.done += 1
            if on_group is not None:
                on_group(list(rows))
        del model
        if cuda:
            torch.cuda.empty_cache()
    return rows


def machine_info(device: str) -> dict:
    """Versions, threads and the machine's load (the 1/5/15-minute load average at the time of the call)."""
    import transformers

    info: dict[str, Any] = {
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="small", help=f"model shape: {', '.join(SHAPES)} (default small)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--attn", default=None, help="comma list (default sdpa,eager; on cuda also flash_attention_2)")
    p.add_argument("--batch-sizes", default=None, help="comma list (default 1,8)")
    p.add_argument("--methods", default=None, help=f"comma list of {','.join(METHODS)}")
    p.add_argument("--budgets", default=None, help="comma list (default: every preset of the family)")
    p.add_argument("--encoder-schedules", default=None, metavar="LIST",
                   help="comma list of stages inside the vision encoder, each run with every configuration, e.g. "
                        "12:0.5/18:0.5; 'default': the shape's own (default: none)")
    p.add_argument("--options", default=None, metavar="A+B",
                   help="method options, '+'-separated, each given to the benched methods that take it "
                        "(docs/methods.md; default: every method as its authors' code runs)")
    p.add_argument("--repeats", type=int, default=None, help="paired repeats (default 5; 7b-slice 10)")
    p.add_argument("--warmup", type=int, default=None, help="rounds not recorded (default 1)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per run (default 32; 7b-slice 4)")
    p.add_argument("--extras", default=None, choices=["yes", "no"],
                   help="also time plain (no hooks) and keep1.0 (default yes; 7b-slice no)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads, pinned, at most the CPU count (default: the CPU count; 7b-slice 1)")
    p.add_argument("--force-threads", action="store_true", help="allow --threads above the CPU count")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="stop repeats early so the timing ends within S seconds (default: no limit; 7b-slice 1500)")
    p.add_argument("--dtype", default=None, help=f"{' | '.join(DTYPES)} (default: float32 on cpu, float16 on cuda)")
    p.add_argument("--output", default="results/bench", help="output folder (default results/bench)")


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, else the shape's defaults, else the common ones."""
    if args.shape not in SHAPES:
        raise ValueError(f"unknown shape {args.shape!r}; allowed: {', '.join(SHAPES)}")
    d = {**COMMON_DEFAULTS, **SHAPE_DEFAULTS.get(args.shape, {})}
    if args.device == "cuda" and args.attn is None and args.shape not in SHAPE_DEFAULTS:
        d["attn"] = "sdpa,eager,flash_attention_2"
    got = {k: getattr(args, k) for k in d if getattr(args, k, None) is not None}
    if "extras" in got:
        got["extras"] = got["extras"] == "yes"
    d.update(got)
    return d


def run_from_args(args: argparse.Namespace) -> int:
    d = resolve(args)
    lists = check_args(args, d)  # before machine_info asks CUDA for the GPU's name
    attns, batch_sizes = lists["attns"], lists["batch_sizes"]
    out = Path(args.output)
    check_writable(out)  # before the first timing: a long run must not end in a failed write
    threads = pin_threads(d["threads"])
    info_start = machine_info(args.device)
    guard = TimeGuard(d["time_budget"], len(attns) * len(batch_sizes))
    t0 = time.monotonic()
    encoders = encoder_schedules_of(args.shape, d["encoder_schedules"])

    def info(partial: bool) -> dict[str, Any]:
        return {**info_start, "threads_pinned": threads, "loadavg_end": machine_info(args.device).get("loadavg"),
                "wall_s": round(time.monotonic() - t0, 1), "stopped_early": list(guard.stopped_early),
                **({"partial": True} if partial else {})}

    # each group's rows are saved as soon as they exist: an interrupted run keeps what it measured
    rows = run_bench(
        args.shape, args.device, attns=attns, batch_sizes=batch_sizes, methods=lists["methods"],
        budgets=lists["budgets"], repeats=d["repeats"], warmup=d["warmup"],
        new_tokens=d["new_tokens"], dtype=args.dtype, extras=d["extras"], guard=guard, options=args.options,
        encoder_schedules=encoders,
        on_group=lambda so_far: write_outputs(so_far, info(True), args.shape, args.device, out),
    )
    json_path, md_path = write_outputs(rows, info(False), args.shape, args.device, out)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="v2drop-eval bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
