"""The bench's command-line options checked before any model is built: one ``ValueError`` per bad
value, naming the option, the value and what is allowed."""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from v2drop_eval.methods import METHODS

__all__ = ["DTYPES", "ATTNS", "check_device", "check_args"]


def check_device(device: str) -> None:
    """ValueError unless ``device`` is cpu, or cuda on a machine that has it."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; allowed: cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")


DTYPES = ("float32", "float16", "bfloat16")
ATTNS = ("sdpa", "eager", "flash_attention_2")


def _items(option: str, text: Any) -> list[str]:
    items = [t.strip() for t in str(text).split(",")]
    if not all(items):
        raise ValueError(f"{option} {text!r}: an empty item; give a comma list without blanks, e.g. 1,8")
    return items


def _ints(option: str, text: Any, low: int) -> list[int]:
    out = []
    for item in _items(option, text):
        try:
            value = int(item)
        except ValueError:
            value = None
        if value is None or value < low:
            raise ValueError(f"{option} {text!r}: {item!r} is not allowed; give integers >= {low}")
        out.append(value)
    return out


def _check_number(option: str, value: Any, low: float, above: bool = False) -> None:
    if value is not None and (value <= low if above else value < low):
        raise ValueError(f"{option} {value:g} is not allowed; give a number {'>' if above else '>='} {low:g}")


def check_args(args: argparse.Namespace, d: dict[str, Any]) -> dict[str, Any]:
    """Every option checked, before any model is built: one ``ValueError`` naming the option, its value
    and what is allowed. Returns the parsed lists (``attns``, ``batch_sizes``, ``methods``, ``budgets``)."""
    check_device(args.device)
    attns = _items("--attn", d["attn"])
    for a in attns:
        if a not in ATTNS:
            raise ValueError(f"--attn {d['attn']!r}: unknown attention {a!r}; allowed: {', '.join(ATTNS)}")
    methods = _items("--methods", d["methods"])
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"--methods {d['methods']!r}: unknown method {m!r}; allowed: {', '.join(METHODS)}")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise ValueError(f"--dtype {args.dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    cores = os.cpu_count() or 1
    if d["threads"] is not None:
        _check_number("--threads", d["threads"], 1)
        if d["threads"] > cores and not getattr(args, "force_threads", False):
            raise ValueError(f"--threads {d['threads']} is more than this machine's {cores} CPU core(s): threads "
                             "would wait on each other and the timings mean little; give at most "
                             f"{cores}, or add --force-threads")
    _check_number("--repeats", d["repeats"], 1)
    _check_number("--warmup", d["warmup"], 0)
    _check_number("--new-tokens", d["new_tokens"], 1)
    _check_number("--time-budget", d["time_budget"], 0, above=True)
    return {"attns": attns, "batch_sizes": _ints("--batch-sizes", d["batch_sizes"], 1), "methods": methods,
            "budgets": _items("--budgets", d["budgets"]) if d["budgets"] else None}


