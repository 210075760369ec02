"""``none``: the unpruned baseline, with the same hooks and accounting as every other method."""

from __future__ import annotations

from v2drop_eval.engine.method import Method


class NoDrop(Method):
    name = "none"
    label = "Vanilla"
    style = ("k", "*")
    summary = "drops nothing: the unpruned model, measured the same way"
    drops = False


METHOD = NoDrop()
