"""Which installed packages differ from the lock: what `make test-latest` tests beyond `make test`.

    python tools/lockdiff.py requirements.lock [--quiet]

Prints one line per package whose installed version is not the locked one (or that the lock does not
have), so that a failure on the newest releases names the packages and versions that moved.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib.metadata import distributions

from packaging.markers import Marker
from packaging.utils import canonicalize_name


def locked(path: str) -> dict[str, str]:
    """``name -> version`` for the lock's lines whose markers hold on this interpreter."""
    out = {}
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;]+)\s*(?:;\s*(.+))?$", line)
        if not m:
            continue
        name, version, marker = m.groups()
        if marker and not Marker(marker).evaluate():
            continue
        out[canonicalize_name(name.split("[")[0])] = version
    return out


def installed() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in distributions() if d.metadata["Name"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lock")
    ap.add_argument("--quiet", action="store_true", help="only the differing packages, no heading")
    args = ap.parse_args(argv)
    lock, have = locked(args.lock), installed()
    rows = []
    for name in sorted(have):
        if name in ("v2drop-eval", "pip", "setuptools", "wheel"):
            continue
        if name not in lock:
            rows.append(f"  {name} {have[name]} (not in the lock)")
        elif have[name] != lock[name]:
            rows.append(f"  {name} {have[name]} (lock: {lock[name]})")
    if not args.quiet:
        print(f"installed packages against {args.lock}: {len(rows)} differ")
    print("\n".join(rows) if rows else "  none: the installed versions are the locked ones")
    return 0


if __name__ == "__main__":
    sys.exit(main())
