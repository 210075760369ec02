"""``v2drop_qwen3_vl``: lmms-eval's Qwen3-VL classes (chat ``qwen3_vl``, and the simple one with
``--force_simple``) with V2Drop.

Both parents already batch (one ``generate`` call per batch, left padding when ``batch_size > 1``) and
take images and videos, so nothing of theirs is rewritten: ``generate_until`` cuts the requests into
batches and hands each to the parent's own ``generate_until``, pre-sorted with the parent's sort key so
the dropper's per-row statistics line up with the requests (as for ``v2drop_qwen2_5_vl``). Video tokens
are vision tokens: found from the config's ``video_token_id``, dropped by the same schedule, counted in
the side-car. The parents load ``Qwen3VLMoeForConditionalGeneration`` when the checkpoint name has an
``A<n>B`` part (e.g. Qwen3-VL-30B-A3B); the adapter takes both classes.
"""

from __future__ import annotations

from typing import Any

from lmms_eval.models.chat.qwen3_vl import Qwen3_VL as Qwen3VLChat
from lmms_eval.models.simple.qwen3_vl import Qwen3_VL as Qwen3VLSimple

from v2drop_eval.plugin.args import FAMILIES
from v2drop_eval.plugin.base import V2DropMixin
from v2drop_eval.plugin.video import qwen_video_reading

__all__ = ["V2DropQwen3VL", "V2DropQwen3VLChat"]


class _Qwen3Common(V2DropMixin):
    _v2drop_family = "qwen3_vl"

    def __init__(self, pretrained: str = "Qwen/Qwen3-VL-8B-Instruct", **kwargs: Any) -> None:
        args = self._v2drop_pop_args(kwargs, pretrained, Qwen3VLSimple)
        super().__init__(pretrained=pretrained, **kwargs)
        self._v2drop_attach(args, pretrained)

    def _v2drop_generate_batch(self, requests: list[Any]) -> list[Any]:
        # The lmms-eval parent's generate_until (the class after V2DropMixin in the MRO), with a video
        # reader that exists and short clips sampled at the frames they have (plugin/video.py).
        with qwen_video_reading(FAMILIES[self._v2drop_family].lmms_model):
            return super(V2DropMixin, self).generate_until(requests)


class V2DropQwen3VL(_Qwen3Common, Qwen3VLSimple):
    """``v2drop_qwen3_vl`` with ``--force_simple``."""

    is_simple = True
    _v2drop_gen_kwargs_index = 1


class V2DropQwen3VLChat(_Qwen3Common, Qwen3VLChat):
    """``v2drop_qwen3_vl`` (chat, lmms-eval's default)."""

    is_simple = False
    _v2drop_gen_kwargs_index = 2

    def _v2drop_sort_key(self, args: tuple) -> Any:
        # The chat parent sorts by the context string.
        return (args[0], args[0])
