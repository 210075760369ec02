"""Qwen3-VL's DeepStack, followed through dropping.

Qwen3-VL's decoder adds vision-encoder features to the hidden states at the vision positions after
each of its first k decoder layers (k = ``len(vision_config.deepstack_visual_indexes)``):
``Qwen3VLTextModel.forward`` calls ``self._deepstack_process(hidden, visual_pos_masks, embeds[l])``
after layer l for l < k, with a ``[B, S]`` mask of the prompt and one feature row per masked position
(row-major order). A drop stage at layer L < k shortens the sequence before those additions are done;
the wrapper installed here hands ``_deepstack_process`` the mask and the feature rows of the kept slots,
so the kept tokens get exactly the features they get in the unpruned model. It wraps the bound method
on the decoder instance (no model code copied); ``remove()`` deletes the instance attribute again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from v2drop_eval.engine import contract

__all__ = ["deepstack_layers", "DeepStackGather", "install_deepstack"]

# The original positions (idx [B, n], valid [B, n]) of the hidden states now flowing between decoder
# layers, or None while the sequence is whole.
Positions = Callable[[], "tuple[torch.Tensor, torch.Tensor] | None"]


def deepstack_layers(config: Any) -> tuple[int, ...]:
    """The decoder layers after which DeepStack features are added (``0..k-1``), from the model config."""
    vision = getattr(config, "vision_config", None)
    return tuple(range(len(getattr(vision, "deepstack_visual_indexes", None) or ())))


class DeepStackGather:
    """Wraps ``decoder._deepstack_process`` so that it adds the features of the kept slots only."""

    def __init__(self, decoder: nn.Module, positions: Positions) -> None:
        self.decoder, self.positions = decoder, positions
        self.original = decoder._deepstack_process
        decoder._deepstack_process = self._process

    def _process(self, hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor,
                 visual_embeds: torch.Tensor) -> torch.Tensor:
        where = self.positions()
        if where is None:
            return self.original(hidden_states, visual_pos_masks, visual_embeds)
        idx, valid = where
        mask = visual_pos_masks.to(idx.device)
        if tuple(idx.shape) != tuple(hidden_states.shape[:2]) or mask.dim() != 2 or mask.shape[0] != idx.shape[0]:
            raise contract.contract_error(
                f"Qwen3-VL's _deepstack_process got hidden states {tuple(hidden_states.shape)} and visual_pos_masks "
                f"{tuple(mask.shape)}; expected [batch, seq, hidden] and a [batch, prompt length] mask"
            )
        if int(mask.sum()) != visual_embeds.shape[0]:
            raise contract.contract_error(
                f"Qwen3-VL's DeepStack features have {visual_embeds.shape[0]} rows for {int(mask.sum())} vision "
                "positions; expected one row per position of visual_pos_masks"
            )
        # Row of each prompt position in visual_embeds (row-major over the mask, as hidden[mask] reads).
        row = (mask.flatten().long().cumsum(0) - 1).view(mask.shape)
        kept = mask.gather(1, idx) & valid
        rows = row.gather(1, idx)[kept].to(visual_embeds.device)
        return self.original(hidden_states, kept, visual_embeds[rows])

    def remove(self) -> None:
        if self.decoder.__dict__.get("_deepstack_process") == self._process:
            del self.decoder.__dict__["_deepstack_process"]


def install_deepstack(decoder: nn.Module, config: Any, positions: Positions,
                      drop_layers: tuple[int, ...]) -> list[Any]:
    """The wrapper, when a drop stage comes before the last DeepStack addition (none needed otherwise:
    from layer k on every addition is already in the hidden states being gathered)."""
    layers = deepstack_layers(config)
    if not layers or not drop_layers or drop_layers[0] > layers[-1]:
        return []
    if not callable(getattr(type(decoder), "_deepstack_process", None)):
        raise contract.contract_error(
            f"{type(decoder).__name__} has no _deepstack_process, through which DeepStack features are added after "
            f"decoder layers {', '.join(map(str, layers))}; a drop stage at layer {drop_layers[0]} needs it "
            f"(the first drop layer that does not is {len(layers)})"
        )
    return [DeepStackGather(decoder, positions)]
