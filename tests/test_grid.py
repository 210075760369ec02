"""The fast tier's grid cover (tests/grid.py): every wanted pair occurs, pinned points stay, the rest are marked."""

from itertools import product

import pytest
from grid import cover, grid


def test_cover_holds_every_pair_and_the_pinned_points():
    points = list(product(["a", "b", "c", "d"], ["x", "y"], range(5)))
    facets = {"letter": lambda p: p[0], "kind": lambda p: p[1], "n": lambda p: p[2]}
    pinned = [("d", "y", 4)]
    chosen = cover(points, facets, always=pinned)
    assert pinned[0] in chosen and len(chosen) < len(points)
    for a, b in (("letter", "kind"), ("letter", "n"), ("kind", "n")):
        assert {(facets[a](p), facets[b](p)) for p in chosen} == {(facets[a](p), facets[b](p)) for p in points}
    params = grid(points, facets, always=pinned)
    full = [p for p in params if any(m.name == "grid_full" for m in p.marks)]
    assert len(full) == len(points) - len(chosen) and [tuple(p.values) for p in params] == points


def test_cover_refuses_unknown_facets_and_foreign_pins():
    with pytest.raises(ValueError, match="unknown facet"):
        cover([(1,)], {"a": lambda p: p[0]}, [("a", "b")])
    with pytest.raises(ValueError, match="not in the grid"):
        cover([(1,)], {"a": lambda p: p[0]}, always=[(2,)])
