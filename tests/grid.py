"""The two test tiers of a grid test: an all-pairs cover in `make test`, the full product in `make test-all`.

A grid test (every case x kernel x method, say) is written once over the full product of its axes.
``grid`` keeps, for the fast tier, a subset in which every pair of values of the named facets occurs at
least once (for the engine tests: every case on both kernels, every method on every family and on both
kernels), plus the points pinned as ``always``; the rest are marked ``grid_full`` and run only in
`make test-all` (``-m "not slow and not grid_full"`` deselects them). The axes are read from the registries
(methods, the test families and cases), so a new method or case enters both tiers without a line here.

The cover is greedy (each step takes the first point that covers the most uncovered pairs), deterministic,
and within a few points of the smallest for the grids here.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from itertools import combinations
from typing import Any

import pytest

Facet = Callable[[tuple], Hashable]


def cover(points: Sequence[tuple], facets: dict[str, Facet], pairs: Iterable[tuple[str, str]] | None = None,
          always: Iterable[tuple] = ()) -> list[tuple]:
    """The points (in their given order) of a greedy all-pairs cover of ``points``.

    ``facets`` name what a point is seen as (``{"family": lambda p: p[0][0], ...}``); ``pairs`` the facet
    pairs whose value pairs must all occur (default: every pair of facets). ``always`` points are taken
    first (the cases that found bugs)."""
    pairs = list(pairs) if pairs is not None else list(combinations(facets, 2))
    for a, b in pairs:
        if a not in facets or b not in facets:
            raise ValueError(f"unknown facet in pair ({a!r}, {b!r}); facets: {', '.join(facets)}")

    def needs(p: tuple) -> set:
        return {(a, b, facets[a](p), facets[b](p)) for a, b in pairs}

    wanted = set().union(*(needs(p) for p in points)) if points else set()
    chosen: list[tuple] = []
    for p in always:
        if p not in points:
            raise ValueError(f"pinned point {p!r} is not in the grid")
        if p not in chosen:
            chosen.append(p)
            wanted -= needs(p)
    while wanted:
        best = max((p for p in points if p not in chosen), key=lambda p: len(needs(p) & wanted))
        chosen.append(best)
        wanted -= needs(best)
    keep = set(chosen)
    return [p for p in points if p in keep]


def grid(points: Sequence[tuple], facets: dict[str, Facet], pairs: Iterable[tuple[str, str]] | None = None,
         always: Iterable[tuple] = ()) -> list[Any]:
    """``points`` as ``pytest.param``s for ``parametrize``: the cover as they are, the rest ``grid_full``."""
    points = list(points)
    fast = set(cover(points, facets, pairs, always))
    return [pytest.param(*p) if p in fast else pytest.param(*p, marks=pytest.mark.grid_full) for p in points]
