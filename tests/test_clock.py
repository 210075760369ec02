"""The dropper's clock: nested spans charge only the innermost, a decode step's spans join its prefill."""

import time

import pytest

from v2drop_eval.engine.clock import CATEGORIES, DropperClock


def test_nested_spans_are_exclusive():
    clock = DropperClock()
    t0 = time.perf_counter()
    clock.open("bookkeeping")
    time.sleep(0.02)
    t1 = time.perf_counter()
    clock.open("score")  # bookkeeping pauses
    time.sleep(0.05)
    clock.close()
    t2 = time.perf_counter()
    time.sleep(0.02)
    clock.close()
    t3 = time.perf_counter()
    t = clock.totals()
    assert set(t) == set(CATEGORIES)
    # each span's time is the wall time it was innermost (to a few ms: the marks sit inside open/close)
    assert t["score"] == pytest.approx((t2 - t1) * 1e3, abs=5) and t["score"] >= 50
    assert t["bookkeeping"] == pytest.approx(((t1 - t0) + (t3 - t2)) * 1e3, abs=5) and t["bookkeeping"] >= 40
    assert t["gather"] == t["decode"] == 0.0


def test_adopt_charges_another_clock_to_one_category():
    prefill, step = DropperClock(), DropperClock()
    step.open("bookkeeping")
    step.open("gather")
    time.sleep(0.01)
    step.close()
    step.close()
    prefill.adopt(step, "decode")
    t = prefill.totals()
    assert t["decode"] >= 10 and t["gather"] == t["bookkeeping"] == 0.0
