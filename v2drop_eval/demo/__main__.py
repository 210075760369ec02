"""``python -m v2drop_eval.demo paths``: where the demo's models and lmms-eval task live, as JSON."""

from __future__ import annotations

import argparse
import json
import sys

from v2drop_eval.demo import BENCHMARKS, paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m v2drop_eval.demo", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("paths", help="print JSON: the model folders (llava, qwen2_vl, scenes_llava, scenes_qwen2_vl), "
                                 "include_path, tasks")
    write = sub.add_parser("write-test-split", help="regenerate the test parquet of a benchmark's lmms-eval task")
    write.add_argument("--benchmark", choices=tuple(BENCHMARKS), default="vqa")
    write.add_argument("--out", default=None, help="default: the shipped task folder")
    sub.add_parser("probe", help="variation ranks, adaptive criteria vs object count (see probe --help)",
                   add_help=False)
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "probe":
        from v2drop_eval.demo.probe import main as probe_main

        return probe_main(list(argv[1:]))
    args = p.parse_args(argv)
    if args.command == "paths":
        json.dump(paths(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        from v2drop_eval.demo import TASKS_DIR

        if args.benchmark == "vqa":
            from v2drop_eval.demo.data import write_test_split
        else:
            from v2drop_eval.demo.scenes import write_test_split
        out = args.out or TASKS_DIR / f"{BENCHMARKS[args.benchmark]}_test.parquet"
        print(write_test_split(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
