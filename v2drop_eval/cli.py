"""``v2drop-eval``: the command line (``sweep``, ``status``, ``tables``, ``compare``, ``bench``, ``demo``).

A user error (a bad value, a missing file, a failed ``prepare`` step) is one line on stderr and exit
status 2; ``--debug`` (anywhere on the line) shows the traceback instead. A closed stdout (``| head``)
ends quietly.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from v2drop_eval.sweep.fields import EXECUTORS

__all__ = ["main", "build_parser", "select_points", "DELEGATED", "USER_ERRORS", "DEBUG_FLAG"]

DEBUG_FLAG = "--debug"
# What a user's input can cause; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, RuntimeError, ImportError)
EXIT_USER_ERROR = 2
EXIT_BROKEN_PIPE = 141  # as if killed by SIGPIPE, like other tools in a pipe

# Subcommands that own their argument parsing: ``v2drop-eval NAME ARGS`` calls ``module.main(ARGS)``.
DELEGATED = {
    "bench": ("v2drop_eval.bench.run", "time prefill/decode of the engine on synthetic inputs (see --help)"),
    "demo": ("v2drop_eval.demo.__main__", "the embedded demo's models and task (see --help)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="v2drop-eval", description="V2Drop evaluation: lmms-eval sweeps, paper tables and plots, benchmarks, demo.")
    parser.add_argument(DEBUG_FLAG, action="store_true", help="show the traceback of an error (any position)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sw = sub.add_parser("sweep", help="run the grid of a sweep config through lmms-eval (resumable)")
    sw.add_argument("config", type=Path, help="sweep config, e.g. configs/smoke.yaml")
    sw.add_argument("--output", type=Path, default=None, help="sweep directory (default: the config's output)")
    sw.add_argument("--dry-run", action="store_true", help="print the points and their exact commands; run nothing")
    sw.add_argument("--only", action="append", default=[], metavar="PATTERN",
                    help="run only points whose id matches PATTERN (glob, or substring without wildcards); repeatable")
    sw.add_argument("--limit", type=float, default=None, metavar="N",
                    help="lmms-eval --limit for every point, overriding the config's (a short check run; "
                         "give it its own --output)")
    sw.add_argument("--jobs", type=int, default=None, metavar="N",
                    help="run N points at the same time (default: the config's jobs, else 1)")
    sw.add_argument("--executor", default=None, choices=list(EXECUTORS),
                    help="where points run: inline (here, the default), local (submitit jobs on this machine, "
                         "--jobs at a time) or slurm (a job array); overrides the config's executor")
    sw.add_argument("--force", action="store_true",
                    help="run into a folder that holds another sweep (refused otherwise); says what it mixes")
    sw.add_argument("--wait", action="store_true",
                    help="slurm: wait for the submitted jobs and report them (default: submit and return)")
    sw.set_defaults(func=_cmd_sweep)

    st = sub.add_parser("status", help="what every point of a sweep directory is doing (done, failed, "
                                       "queued/running with job id, pending)")
    st.add_argument("results", type=Path, help="sweep directory, e.g. results/llava15_7b")
    st.add_argument("--json", action="store_true", help="the same as JSON, for scripts")
    st.set_defaults(func=_cmd_status)

    tb = sub.add_parser("tables", help="build accuracy/efficiency tables and plots from a sweep directory")
    tb.add_argument("results", type=Path, help="sweep directory, e.g. results/smoke")
    tb.add_argument("--output", type=Path, default=None, help="where to write (default: RESULTS/tables)")
    tb.add_argument("--allow-missing", action="store_true",
                    help="build the tables even when grid points are missing (never run, failed, damaged, made "
                         "with other settings), a model's reference (none) point is missing, or none finished; "
                         "each is listed")
    tb.set_defaults(func=_cmd_tables)

    cp = sub.add_parser("compare", help="accuracy per point of a sweep against a reference sweep (same or different)")
    cp.add_argument("results", type=Path, help="sweep directory, e.g. results/demo-run")
    cp.add_argument("reference", type=Path, help="reference sweep directory, e.g. results/demo")
    cp.add_argument("--tolerance", type=float, default=None, metavar="T",
                    help="scores within T (in the tables' units, e.g. points of %%) count as the same (default 1e-9)")
    cp.set_defaults(func=_cmd_compare)

    for name, (_, text) in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def select_points(points: list, patterns: Sequence[str]) -> list:
    """Points whose id matches any pattern (``fnmatch`` glob; a pattern without wildcards is a substring)."""
    if not patterns:
        return list(points)
    pats = [p if any(c in p for c in "*?[") else f"*{p}*" for p in patterns]
    return [pt for pt in points if any(fnmatch.fnmatchcase(pt.id, p) for p in pats)]


def _cmd_sweep(args: argparse.Namespace) -> int:
    from v2drop_eval.sweep.config import ConfigError, expand, load_config
    from v2drop_eval.sweep.runner import dry_run, run_sweep

    try:
        cfg = load_config(args.config, output=args.output)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.jobs is not None and args.jobs < 1:
        print(f"error: --jobs {args.jobs} is not allowed; give an integer >= 1 (points run at the same time)",
              file=sys.stderr)
        return 2
    if args.limit is not None:
        if args.limit <= 0:
            print(f"error: --limit {args.limit:g} is not allowed; give a positive item count or fraction < 1",
                  file=sys.stderr)
            return 2
        cfg.limit = int(args.limit) if args.limit >= 1 else args.limit
        cfg.raw["limit"] = cfg.limit  # the saved sweep.yaml says what ran (status and tables check points by it)
    points = select_points(expand(cfg), args.only)
    if not points:
        print(f"error: no point of {args.config} matches {args.only}", file=sys.stderr)
        return 2
    executor = args.executor or cfg.executor
    if executor != "inline":
        from v2drop_eval.sweep.jobs import require_submitit

        require_submitit(executor)  # before anything runs, dry run included
    if args.dry_run:
        from v2drop_eval.sweep.origin import owner_problem

        error, note = owner_problem(cfg, cfg.output, args.force)
        if error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        if note:
            print(f"note: {note}")
        from v2drop_eval.sweep.point import preflight_problems

        if not cfg.prepare:  # with a prepare step the files may not exist yet: checked when it has run
            problems = preflight_problems(cfg, points)
            if problems:
                print("error: " + "; ".join(problems), file=sys.stderr)
                return 2
        if executor == "inline":
            dry_run(cfg, points, cfg.output)
        else:
            from v2drop_eval.sweep.dispatch import dry_run_jobs

            dry_run_jobs(cfg, points, cfg.output, executor)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the running point, then exit
    try:
        report = run_sweep(cfg, points, cfg.output, jobs=args.jobs, executor=executor, wait=args.wait,
                           force=args.force)
    except KeyboardInterrupt:
        print("interrupted; finished points are kept, run the same command to resume", file=sys.stderr)
        return 130
    return 0 if report.ok else 1


def _cmd_status(args: argparse.Namespace) -> int:
    from v2drop_eval.sweep.status import format_status, status_json, sweep_status

    if not args.results.is_dir():
        print(f"error: {args.results} is not a directory", file=sys.stderr)
        return 2
    points = sweep_status(args.results)
    print(status_json(args.results, points) if args.json else format_status(args.results, points))
    return 1 if any(p.state == "failed" for p in points) else 0


def _cmd_tables(args: argparse.Namespace) -> int:
    from v2drop_eval.report.build import IncompleteSweep, write_tables

    if not args.results.is_dir():
        print(f"error: {args.results} is not a directory", file=sys.stderr)
        return 2
    try:
        built = write_tables(args.results, args.output, allow_missing=args.allow_missing)
    except IncompleteSweep as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in built.written:
        print(path)
    for pid, why in built.missing:
        print(f"not included: {pid}: {why}")
    if built.missing:
        print(f"warning: {len(built.missing)} point(s) not included (listed above and under each table)",
              file=sys.stderr)
    if not built.points:
        print(f"warning: no finished point in {args.results}: the tables are empty", file=sys.stderr)
    if built.no_reference:
        print(f"warning: no reference (none) point for model(s) {', '.join(built.no_reference)}: their speed-up "
              "and Average are blank", file=sys.stderr)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from v2drop_eval.report.build import check_sweep_folder
    from v2drop_eval.report.compare import SAME_TOLERANCE, compare_sweeps, format_comparison

    tolerance = SAME_TOLERANCE if args.tolerance is None else args.tolerance
    if not tolerance >= 0:
        print(f"error: --tolerance {args.tolerance} is not allowed; give a number >= 0", file=sys.stderr)
        return 2
    for folder in (args.results, args.reference):
        if not folder.is_dir():
            print(f"error: {folder} is not a directory", file=sys.stderr)
            return 2
        check_sweep_folder(folder)
    df = compare_sweeps(args.results, args.reference, tolerance)
    print(format_comparison(df, args.results, args.reference))
    if df.empty or (df["verdict"] != "same").any():
        print("error: the sweeps differ (or there is nothing to compare); see the verdicts above", file=sys.stderr)
        return 1
    return 0


def _delegate(name: str, argv: Sequence[str]) -> int:
    import importlib

    module = importlib.import_module(DELEGATED[name][0])
    return int(module.main(list(argv)) or 0)


def _run(argv: list[str]) -> int:
    if argv and argv[0] in DELEGATED:
        return _delegate(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get("V2DROP_DEBUG") == "1"
    argv = [a for a in argv if a != DEBUG_FLAG]  # global: the delegated parsers do not know it
    try:
        return _run(argv)
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except USER_ERRORS as exc:
        if debug:
            traceback.print_exc()
        message = " ".join(str(exc).split()) or type(exc).__name__
        try:
            print(f"error: {message} (--debug for the traceback)", file=sys.stderr)
        except BrokenPipeError:
            pass
        return EXIT_USER_ERROR


def _quiet_stdout() -> None:
    """The reader went away: point stdout at /dev/null so that the exit's flush raises nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (tests capture it)
        pass


if __name__ == "__main__":
    sys.exit(main())
