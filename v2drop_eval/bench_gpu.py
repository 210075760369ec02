"""Shim: ``python -m v2drop_eval.bench_gpu`` (README, Makefile of earlier releases) runs the GPU suite, which
now lives in :mod:`v2drop_eval.bench.gpu` (CONTRIBUTING.md lists the shims)."""

from v2drop_eval.bench.gpu import main

if __name__ == "__main__":
    raise SystemExit(main())
