"""Kept-set agreement with the authors' code, per method x family x dtype (docs/methods.md's tables).

Runs tests/agreement.py's comparison (tiny models, batch size 1, every stage) over seeds and prints a
Markdown table: stages whose kept set is identical to the original's, stages that are a valid top-k under
the original's own scores (ties at the cut broken either way), and the mean share of the original's
tokens the engine keeps.

    python tools/agreement.py                              # this checkout's engine, every method's default
    python tools/agreement.py --options exact_counts       # with a named option, where a method takes it
    python tools/agreement.py --positions keep             # another position rule, where a method's differs
    python tools/agreement.py --engine /path/to/checkout   # another checkout's engine (e.g. before a change)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "float16", "bfloat16")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", type=Path, default=None, help="a checkout whose v2drop_eval to compare (default: this)")
    p.add_argument("--seeds", default="0,1,2", help="comma list (default 0,1,2)")
    p.add_argument("--methods", default=None, help="comma list (default: every method with an original)")
    p.add_argument("--options", default=None, help="options for the engine, a+b (each method gets those it takes)")
    p.add_argument("--positions", default=None, choices=("keep", "renumber"),
                   help="positions= for the engine (the methods whose authors' rule differs)")
    args = p.parse_args(argv)
    if args.engine is not None:
        sys.path.insert(0, str(args.engine.resolve()))
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from agreement import FAMILIES, stages
    from test_originals import SCHEDULES

    methods = args.methods.split(",") if args.methods else list(SCHEDULES)
    seeds = [int(s) for s in args.seeds.split(",")]
    option_sets = {m: _taken(m, args.options) for m in methods}
    print(f"engine: {sys.modules['v2drop_eval'].__file__}; options: {args.options or '-'}; "
          f"positions: {args.positions or '-'}; seeds {args.seeds}")
    print("| method | family | " + " | ".join(DTYPES) + " |")
    print("| --- | --- |" + " --- |" * len(DTYPES))
    for method in methods:
        if args.options and not option_sets[method]:
            continue
        if args.positions and _own_positions(method) == args.positions:
            continue
        for family in FAMILIES:
            cells = []
            for dtype in DTYPES:
                found = [s for seed in seeds for s in stages(family, method, SCHEDULES[method], seed,
                                                              getattr(torch, dtype), option_sets[method],
                                                              positions=args.positions)]
                same = sum(s.identical for s in found)
                valid = sum(s.valid_top_k for s in found)
                overlap = sum(len(s.engine & s.original) / max(1, len(s.original)) for s in found) / len(found)
                cells.append(f"{same}/{len(found)} identical, {valid}/{len(found)} valid, {100 * overlap:.1f}%")
            print(f"| {method} | {family} | " + " | ".join(cells) + " |", flush=True)
    return 0


def _taken(method: str, options: str | None) -> str | None:
    """The options of ``options`` that ``method`` takes (None: none given, or an engine without options)."""
    if not options:
        return None
    from v2drop_eval.methods import get_method

    mine = [o for o in options.split("+") if o in {x.name for x in get_method(method).options}]
    return "+".join(mine) or None


def _own_positions(method: str) -> str:
    from v2drop_eval.methods import get_method

    return get_method(method).positions


if __name__ == "__main__":
    raise SystemExit(main())
