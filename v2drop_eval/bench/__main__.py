"""``python -m v2drop_eval.bench``: the same as ``v2drop-eval bench``."""

from v2drop_eval.bench.run import main

raise SystemExit(main())
