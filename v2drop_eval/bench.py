"""`v2drop-eval bench`: prefill and generation speed against the FLOPs limit, side by side.

Random-weight models with real shapes (full 7B shapes on a GPU; a scaled-down shape with 576 vision
tokens on a CPU). Every configuration is timed in one process, round-robin after warm-up (so slow
drifts of the machine hit all of them alike), and the median of the repeats is reported.

Timing: forward pre/post hooks on the top model time each forward call of ``generate``; the first
is the prefill (time to first token), the rest are decode steps. Hooks on the LLM decoder time the
decoder alone (``llm_prefill_ms``), which is what the analytic FLOPs describe. On CUDA every time
stamp follows ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from v2drop_eval import flops, validate
from v2drop_eval.adapters import forward_takes
from v2drop_eval.atomic import write_text_atomic
from v2drop_eval.engine import attach
from v2drop_eval.schedule import DropSchedule, preset_table, scaled_schedule

__all__ = ["SHAPES", "scaled_schedule", "run_bench", "main"]


@dataclass(frozen=True)
class Shape:
    family: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    vision: dict[str, int]  # vision tower config
    text_tokens: int = 41


SHAPES: dict[str, Shape] = {
    "llava-1.5-7b": Shape("llava", 4096, 11008, 32, 32, 32, 32064,
                          dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)),
    "qwen2-vl-7b": Shape("qwen2_vl", 3584, 18944, 28, 28, 4, 152064,
                         dict(depth=32, embed_dim=1280, num_heads=16)),
    # CPU: the LLaVA layout (576 vision tokens) at a width a 2-core machine times in minutes.
    "small": Shape("llava", 512, 1376, 8, 8, 8, 32064,
                   dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)),
    # CI smoke: checks the plumbing, not speed.
    "tiny": Shape("llava", 64, 128, 4, 4, 2, 1024,
                  dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)),
}
VISION_TOKENS = 576
METHODS = ("none", *(m for m in validate.METHODS if m != "none"))  # the reference first


def build_model(shape: Shape, attn: str, device: str, dtype: torch.dtype) -> nn.Module:
    """A random-weight model of ``shape`` (weights are irrelevant to speed)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    text = dict(hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        if shape.family == "llava":
            cfg = LlavaConfig(
                vision_config=CLIPVisionConfig(image_size=336, patch_size=14, **shape.vision),
                text_config=LlamaConfig(**text), image_token_id=shape.vocab - 64,
            )
            model = LlavaForConditionalGeneration(cfg)
        else:
            cfg = Qwen2VLConfig(
                text_config=dict(**text, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                          "mrope_section": [16, 24, 24]}),
                vision_config=dict(hidden_size=shape.hidden, patch_size=14, spatial_merge_size=2,
                                   temporal_patch_size=2, **shape.vision),
                image_token_id=shape.vocab - 64, video_token_id=shape.vocab - 63,
                vision_start_token_id=shape.vocab - 62, vision_end_token_id=shape.vocab - 61,
            )
            model = Qwen2VLForConditionalGeneration(cfg)
    model = model.to(dtype).eval()
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model


def make_inputs(model: nn.Module, shape: Shape, batch_size: int, device: str, dtype: torch.dtype) -> dict:
    """One image (576 vision tokens) between ``text_tokens`` text tokens, repeated over the batch."""
    gen = torch.Generator().manual_seed(0)
    cfg = model.config
    text = torch.randint(10, 1000, (shape.text_tokens,), generator=gen)
    head, tail = text[: shape.text_tokens // 2], text[shape.text_tokens // 2 :]
    if shape.family == "llava":
        vision = torch.full((VISION_TOKENS,), cfg.image_token_id)
        ids = torch.cat([head, vision, tail])
        extra = {"pixel_values": torch.randn(batch_size, 3, 336, 336, generator=gen)}
    else:
        vision = torch.full((VISION_TOKENS,), cfg.image_token_id)
        ids = torch.cat([head, torch.tensor([cfg.vision_start_token_id]), vision,
                         torch.tensor([cfg.vision_end_token_id]), tail])
        grid = torch.tensor([[1, 48, 48]] * batch_size)
        extra = {
            "pixel_values": torch.randn(batch_size * 48 * 48, 3 * 2 * 14 * 14, generator=gen),
            "image_grid_thw": grid,
        }
        if forward_takes(model, "mm_token_type_ids"):
            extra["mm_token_type_ids"] = (ids == cfg.image_token_id).long().expand(batch_size, -1).clone()
    out = {"input_ids": ids.expand(batch_size, -1).clone(), "attention_mask": torch.ones(batch_size, ids.numel(), dtype=torch.long), **extra}
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in out.items()}


class _Timer:
    """Times every forward call of a module (synchronizing on CUDA)."""

    def __init__(self, module: nn.Module, cuda: bool) -> None:
        self.cuda = cuda
        self.times: list[float] = []
        self._t0 = 0.0
        self._hooks = [module.register_forward_pre_hook(self._start), module.register_forward_hook(self._stop)]

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _start(self, *_: Any) -> None:
        self._t0 = self._now()

    def _stop(self, *_: Any) -> None:
        self.times.append(self._now() - self._t0)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


@dataclass
class _Config:
    method: str
    budget: str
    schedule: DropSchedule
    label: str  # "plain" (no hooks), "none", or the method


def _configs(shape: Shape, methods: Sequence[str], budgets: Sequence[str]) -> list[_Config]:
    out = [_Config("plain", "-", DropSchedule(()), "plain")]
    if "none" in methods:
        out.append(_Config("none", "-", DropSchedule(()), "none"))
    for budget in budgets:
        for method in methods:
            if method == "none":
                continue
            out.append(_Config(method, str(budget), scaled_schedule(shape.family, budget, method, shape.layers), method))
    if "v2drop" in methods and "fastv" in methods:
        # V2Drop at FastV's own one-stage schedule: the two scorers compared at the same token counts.
        for budget in budgets:
            sched = scaled_schedule(shape.family, budget, "fastv", shape.layers)
            out.append(_Config("v2drop", f"{budget}@fastv", sched, "v2drop"))
    v2 = [c for c in out if c.method == "v2drop"]
    if v2:
        # hooks on every layer, nothing dropped: the cost of the machinery alone
        keep_all = DropSchedule(tuple((layer, 1.0) for layer, _ in v2[0].schedule.stages))
        out.append(_Config("v2drop", "keep1.0", keep_all, "v2drop"))
    return out


def _measure(model: nn.Module, inputs: dict, cfg: _Config, new_tokens: int, cuda: bool) -> dict:
    handle = None if cfg.method == "plain" else attach(model, cfg.schedule, method=cfg.method)
    top = _Timer(model, cuda)
    llm = _Timer(model.model.language_model, cuda)
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = top._now()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 return_dict_in_generate=True)
        total = top._now() - t0
        cache = out.past_key_values
        kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        kv -= (new_tokens - 1) * sum(layer.keys[:, :, :1].numel() * 2 * layer.keys.element_size() for layer in cache.layers)
        stats = handle.last_stats if handle is not None else None
    finally:
        top.remove()
        llm.remove()
        if handle is not None:
            handle.detach()
    decode = top.times[1:]
    return {
        "prefill_ms": top.times[0] * 1e3,
        "llm_prefill_ms": llm.times[0] * 1e3,
        "decode_ms_per_token": (sum(decode) / len(decode) * 1e3) if decode else 0.0,
        "generate_ms": total * 1e3,
        "kv_cache_bytes": int(kv),
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
        "stats": stats,
    }


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
    log: Any = print,
) -> list[dict]:
    """Time every (attn, batch size, method, budget) in one process; returns the result rows."""
    if shape_name not in SHAPES:
        raise ValueError(f"unknown shape {shape_name!r}; allowed: {', '.join(SHAPES)}")
    for m in methods:
        validate.validate(m)
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; allowed: cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    shape = SHAPES[shape_name]
    budgets = list(budgets) if budgets is not None else [str(b) for b in _family_budgets(shape.family)]
    torch_dtype = getattr(torch, dtype) if dtype else (torch.float16 if device == "cuda" else torch.float32)
    cuda = device == "cuda"
    text_cfg = None
    rows: list[dict] = []
    for attn in attns:
        model = build_model(shape, attn, device, torch_dtype)
        text_cfg = model.model.language_model.config
        for bs in batch_sizes:
            inputs = make_inputs(model, shape, bs, device, torch_dtype)
            configs = _configs(shape, methods, budgets)
            samples: dict[int, list[dict]] = {i: [] for i in range(len(configs))}
            for rep in range(warmup + repeats):
                for i, cfg in enumerate(configs):  # round-robin: drift hits every config alike
                    result = _measure(model, inputs, cfg, new_tokens, cuda)
                    if rep >= warmup:
                        samples[i].append(result)
                log(f"[bench] {shape_name} {attn} bs={bs} repeat {rep + 1}/{warmup + repeats} done")
            rows.extend(_rows(shape_name, device, attn, bs, configs, samples, text_cfg, shape))
        del model
    return rows


def _iqr(values: Any) -> float:
    v = sorted(values)
    if len(v) < 2:
        return 0.0
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[2] - q[0]


def _family_budgets(family: str) -> list[str | int]:
    return list(preset_table(family))


def _rows(shape_name: str, device: str, attn: str, bs: int, configs: list[_Config], samples: dict,
          text_cfg: Any, shape: Shape) -> list[dict]:
    rows = []
    text_tokens = shape.text_tokens + (2 if shape.family == "qwen2_vl" else 0)
    for i, cfg in enumerate(configs):
        runs = samples[i]
        med = {k: statistics.median(r[k] for r in runs) for k in
               ("prefill_ms", "llm_prefill_ms", "decode_ms_per_token", "generate_ms")}
        vision = cfg.schedule.tokens_per_layer(VISION_TOKENS, shape.layers) if cfg.method not in ("plain", "none") \
            else [VISION_TOKENS] * shape.layers
        tokens = [text_tokens + v for v in vision]
        stats = runs[0]["stats"]
        if stats is not None:  # the engine's own count must agree with the schedule arithmetic
            assert stats[0]["vision_per_layer"] == vision, (cfg, stats[0]["vision_per_layer"], vision)
        rows.append({
            "shape": shape_name, "device": device, "attn": attn, "batch_size": bs, "method": cfg.method,
            "budget": cfg.budget, "schedule": str(cfg.schedule), "avg_vision_tokens": sum(vision) / len(vision),
            **{k: round(v, 3) for k, v in med.items()},
            "prefill_flops": flops.prefill_flops(text_cfg, tokens) * bs,
            "kv_cache_bytes": runs[0]["kv_cache_bytes"],
            "peak_memory_bytes": max((r["peak_memory_bytes"] or 0) for r in runs) or None,
            "repeats": len(runs),
            # the run-to-run spread of this config, (p75 - p25) / median of the LLM prefill: the noise
            # floor against which the 1-2% targets must be read
            "llm_prefill_spread": round(_iqr(r["llm_prefill_ms"] for r in runs) / med["llm_prefill_ms"], 4),
        })
    base = next(r for r in rows if r["method"] == "none") if any(r["method"] == "none" for r in rows) else rows[0]
    randoms = {r["budget"]: r for r in rows if r["method"] == "random"}
    at_fastv = {r["budget"].split("@")[0]: r for r in rows if r["method"] == "v2drop" and r["budget"].endswith("@fastv")}
    for r in rows:
        r["fastv_over_v2drop"] = (
            round(r["llm_prefill_ms"] / at_fastv[r["budget"]]["llm_prefill_ms"] - 1, 4)
            if r["method"] == "fastv" and r["budget"] in at_fastv else None
        )
        r["speedup"] = round(base["prefill_ms"] / r["prefill_ms"], 3)
        r["llm_speedup"] = round(base["llm_prefill_ms"] / r["llm_prefill_ms"], 3)
        r["flops_speedup"] = round(base["prefill_flops"] / r["prefill_flops"], 3)
        r["efficiency"] = round(r["llm_speedup"] / r["flops_speedup"], 3)
        r["overhead_vs_random"] = (
            round(r["llm_prefill_ms"] / randoms[r["budget"]]["llm_prefill_ms"] - 1, 4)
            if r["method"] == "v2drop" and r["budget"] in randoms else None
        )
    return rows


def machine_info(device: str) -> dict:
    import transformers

    info = {
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


COLUMNS = ["attn", "batch_size", "method", "budget", "schedule", "avg_vision_tokens", "prefill_ms", "llm_prefill_ms",
           "decode_ms_per_token", "generate_ms", "speedup", "llm_speedup", "flops_speedup", "efficiency",
           "overhead_vs_random", "fastv_over_v2drop", "llm_prefill_spread", "kv_cache_bytes", "peak_memory_bytes"]


def targets(rows: list[dict]) -> list[str]:
    """The four speed targets of the project, checked on ``rows`` (one Markdown bullet each).

    Prefill efficiency >= 0.9 at budget 128; v2drop within 2% of random at the same schedule; hooks
    with nothing dropped (``keep1.0``) within 1% of the plain model; v2drop faster than FastV under
    sdpa at FastV's schedule. Reported, never asserted: timings are the machine's, not the code's.
    """
    def fmt(vals: list[float], pct: bool = False) -> str:
        return ", ".join(f"{v:+.1%}" if pct else f"{v:.3f}" for v in vals) or "n/a"

    def verdict(vals: list[float], ok: Any) -> str:
        return "n/a" if not vals else ("met" if all(ok(v) for v in vals) else "**missed**")

    groups = sorted({(r["attn"], r["batch_size"]) for r in rows}, key=str)
    out = []
    for attn, bs in groups:
        g = [r for r in rows if r["attn"] == attn and r["batch_size"] == bs]
        eff = [r["efficiency"] for r in g if r["method"] == "v2drop" and r["budget"] == "128"]
        over = [r["overhead_vs_random"] for r in g if r["overhead_vs_random"] is not None]
        plain = next((r for r in g if r["method"] == "plain"), None)
        keep = next((r for r in g if r["budget"] == "keep1.0"), None)
        hooks = [keep["llm_prefill_ms"] / plain["llm_prefill_ms"] - 1] if plain and keep else []
        fastv = [r["fastv_over_v2drop"] for r in g if r["fastv_over_v2drop"] is not None]
        parts = [
            f"efficiency at 128 {fmt(eff)} (>= 0.9: {verdict(eff, lambda e: e >= 0.9)})",
            f"v2drop over random {fmt(over, True)} (<= 2%: {verdict(over, lambda o: o <= 0.02)})",
            f"keep1.0 over plain {fmt(hooks, True)} (<= 1%: {verdict(hooks, lambda h: abs(h) <= 0.01)})",
        ]
        if attn == "sdpa":
            parts.append(f"FastV over v2drop {fmt(fastv, True)} (> 0: {verdict(fastv, lambda f: f > 0)})")
        spreads = [r["llm_prefill_spread"] for r in g if r.get("llm_prefill_spread") is not None]
        none = next((r for r in g if r["method"] == "none"), None)
        noise = [none["llm_prefill_ms"] / plain["llm_prefill_ms"] - 1] if plain and none else []
        if spreads or noise:
            parts.append(f"noise: none over plain (the same work) {fmt(noise, True)}, median run-to-run spread "
                         f"(IQR / median) {statistics.median(spreads) if spreads else float('nan'):.1%}")
        out.append(f"- {attn}, batch {bs}: " + "; ".join(parts))
    return out


def to_markdown(rows: list[dict], info: dict, shape: str, device: str) -> str:
    lines = [f"# Bench: {shape} on {device}", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
             "Medians of interleaved repeats. `speedup`: prefill (time to first token) vs `none`; `llm_speedup`: the "
             "LLM decoder's prefill alone; `flops_speedup`: analytic (" + flops.CONVENTION + "); `efficiency` = "
             "llm_speedup / flops_speedup; `overhead_vs_random`: v2drop's LLM prefill over random's at the same "
             "schedule; `fastv_over_v2drop`: FastV's LLM prefill over V2Drop's at FastV's schedule (budget `B@fastv`); "
             "`plain` = model without any hooks; budget `keep1.0` = hooks on, nothing dropped.", "",
             "| " + " | ".join(COLUMNS) + " |", "| " + " | ".join("---" for _ in COLUMNS) + " |"]
    for r in rows:
        cells = []
        for c in COLUMNS:
            v = r.get(c)
            cells.append("-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Targets (LLM prefill, medians; reported, not asserted)", "", *targets(rows)]
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[dict], info: dict, shape: str, device: str, out_dir: Path) -> tuple[Path, Path]:
    """``<out>/<device>-<shape>.json`` (rows + machine) and the Markdown table beside it, atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{device}-{shape}"
    payload = {"machine": info, "shape": shape, "device": device, "rows": rows}
    paths = []
    for path, text in ((stem.with_suffix(".json"), json.dumps(payload, indent=1)),
                       (stem.with_suffix(".md"), to_markdown(rows, info, shape, device))):
        paths.append(write_text_atomic(path, text))
    return paths[0], paths[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="small", help=f"model shape: {', '.join(SHAPES)} (default small)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--attn", default=None, help="comma list (default sdpa,eager; on cuda also flash_attention_2)")
    p.add_argument("--batch-sizes", default="1,8", help="comma list (default 1,8)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {','.join(METHODS)}")
    p.add_argument("--budgets", default=None, help="comma list (default: every preset of the family)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: float32 on cpu, float16 on cuda)")
    p.add_argument("--output", default="results/bench", help="output folder (default results/bench)")


def run_from_args(args: argparse.Namespace) -> int:
    attns = args.attn.split(",") if args.attn else (["sdpa", "eager", "flash_attention_2"] if args.device == "cuda" else ["sdpa", "eager"])
    rows = run_bench(
        args.shape, args.device, attns=attns, batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
        methods=args.methods.split(","), budgets=args.budgets.split(",") if args.budgets else None,
        repeats=args.repeats, warmup=args.warmup, new_tokens=args.new_tokens, dtype=args.dtype,
    )
    json_path, md_path = write_outputs(rows, machine_info(args.device), args.shape, args.device, Path(args.output))
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="v2drop-eval bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
