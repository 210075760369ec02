"""``python -m v2drop_eval.demo paths``: where the demo's models and lmms-eval task live, as JSON."""

from __future__ import annotations

import argparse
import json
import sys

from v2drop_eval.demo import paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m v2drop_eval.demo", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("paths", help="print JSON: llava, qwen2_vl (model folders), include_path, tasks")
    write = sub.add_parser("write-test-split", help="regenerate the test parquet of the lmms-eval task")
    write.add_argument("--out", default=None, help="default: the shipped task folder")
    sub.add_parser("probe", help="adaptive criteria vs object count on the demo models (see probe --help)",
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
        from v2drop_eval.demo.data import write_test_split

        out = args.out or TASKS_DIR / "v2drop_demo_vqa_test.parquet"
        print(write_test_split(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
