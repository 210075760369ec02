"""The authors' selection code of each method, transcribed for comparison with the engine's kept sets.

One module per method, each naming its repository, commit, path and licence. The lines are the
authors' own; what had to change to run them outside their model classes (their config and ``self``
read from arguments, transformers 5's rotary API, keys repeated for grouped-query models) is marked
``# adapted:``. ``topk`` is a parameter so that a test can break ties at the cut in favour of a given set
(half precision: the engine's set must be a valid top-k under the original's own scores).
"""

from __future__ import annotations

import torch


def topk(values: torch.Tensor, k: int, offset: int = 0, real: list[int] | None = None) -> torch.Tensor:
    """``values.topk(k).indices``, as the originals call it (``offset``, ``real``: see :func:`topk_preferring`)."""
    return values.topk(k).indices


def topk_preferring(prefer: set[int]):
    """A ``topk`` that breaks ties among equal values towards the sequence indices in ``prefer``, then the
    lower index: the original's top-k, its ties broken as another selection broke them. Entry ``i`` of
    ``values`` stands for sequence index ``offset + i`` (or ``real[i]``)."""

    def pick(values: torch.Tensor, k: int, offset: int = 0, real: list[int] | None = None) -> torch.Tensor:
        index = real if real is not None else [offset + i for i in range(values.shape[0])]
        order = sorted(range(values.shape[0]), key=lambda i: (-float(values[i]), index[i] not in prefer, index[i]))
        return torch.tensor(order[:k], dtype=torch.long)

    return pick
