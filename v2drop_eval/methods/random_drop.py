"""``random``: the seeded random baseline, at any schedule. Its presets and its counts are V2Drop's
(``max(1, int(alive x ratio))``), so it keeps as many tokens as V2Drop at the same schedule."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any

from v2drop_eval.engine.method import EXACT_COUNTS, ROW_IDENTITY, Method, ScoreContext
from v2drop_eval.methods.v2drop import PRESETS as V2DROP_PRESETS
from v2drop_eval.methods.v2drop import ZERO_DROPS_ALL, v2drop_count

if TYPE_CHECKING:
    import torch


def random_scores(row_keys: list[bytes], n: int, seed: int, layer: int, device: torch.device) -> torch.Tensor:
    """Seeded uniform scores ``[B, n]``; each row's stream depends only on (seed, layer, the row's
    real tokens), so a sample drops the same tokens whatever batch it is run in."""
    import torch

    rows = []
    for key in row_keys:
        gen = torch.Generator().manual_seed(zlib.crc32(key, (seed * 1_000_003 + layer) & 0xFFFFFFFF))
        rows.append(torch.rand(n, generator=gen))
    return torch.stack(rows).to(device)


class RandomDrop(Method):
    name = "random"
    label = "Random"
    style = ("tab:gray", "s")
    summary = "keeps a seeded random subset (same count as the schedule)"
    needs = frozenset({ROW_IDENTITY})
    takes_seed = True
    presets = V2DROP_PRESETS
    options = (EXACT_COUNTS, ZERO_DROPS_ALL)

    def keep_count(self, alive: int, ratios: tuple[float, ...], initial: int,
                   options: frozenset[str] = frozenset(), **row: Any) -> int:
        return v2drop_count(alive, ratios[-1], options)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        # Keyed on each token's ordinal among its row's vision tokens: batch-independent.
        row_keys, ordinal, n = ctx.signals[ROW_IDENTITY]
        table = random_scores(row_keys, n, ctx.seed, ctx.layer, ctx.hidden.device)
        return table.gather(1, ordinal)


METHOD = RandomDrop()
