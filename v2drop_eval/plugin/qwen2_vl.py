"""``v2drop_qwen2_vl`` and ``v2drop_qwen2_5_vl``: lmms-eval's Qwen2-VL / Qwen2.5-VL classes with V2Drop.

lmms-eval 0.7.3 has ``qwen2_vl`` as a simple class only, and ``qwen2_5_vl`` as chat and simple;
each is subclassed here. These parents already batch (one ``generate`` call per batch, left
padding), so nothing of theirs is rewritten: ``generate_until`` cuts the requests into batches and
hands each batch to the parent's own ``generate_until``, which builds the prompts, runs one
``generate`` and decodes exactly as the built-in model does. The batch is pre-sorted with the
parent's own sort key, so the parent keeps its order and the dropper's per-row statistics line up
with the requests.

``attn_implementation=`` also works for ``v2drop_qwen2_vl`` although the parent takes only
``use_flash_attention_2``: ``flash_attention_2`` is passed on as that flag, ``sdpa`` / ``eager`` are
set on the loaded model. The processor's tokenizer pads on the left, so batches generate correctly
whatever the checkpoint's tokenizer config says (batch size 1 is unaffected).
"""

from __future__ import annotations

from typing import Any

from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL as Qwen2_5_VLChat
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL as Qwen2_5_VLSimple
from lmms_eval.models.simple.qwen2_vl import Qwen2_VL as Qwen2VLSimple

from v2drop_eval.plugin.args import FAMILIES, user_errors
from v2drop_eval.plugin.base import V2DropMixin
from v2drop_eval.plugin.video import qwen_video_reading

__all__ = ["V2DropQwen2VL", "V2DropQwen2_5_VL", "V2DropQwen2_5_VLChat"]

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


class _QwenCommon(V2DropMixin):
    def _v2drop_generate_batch(self, requests: list[Any]) -> list[Any]:
        # The lmms-eval parent's generate_until (the class after V2DropMixin in the MRO), with a video
        # reader that exists and short clips sampled at the frames they have.
        with qwen_video_reading(FAMILIES[self._v2drop_family].lmms_model):
            return super(V2DropMixin, self).generate_until(requests)

    def _v2drop_after_load(self) -> None:
        self.processor.tokenizer.padding_side = "left"


class V2DropQwen2VL(_QwenCommon, Qwen2VLSimple):
    """``v2drop_qwen2_vl`` (simple; lmms-eval has no chat ``qwen2_vl``)."""

    is_simple = True
    _v2drop_family = "qwen2_vl"
    _v2drop_gen_kwargs_index = 1

    def __init__(self, pretrained: str = "Qwen/Qwen2-VL-7B-Instruct", **kwargs: Any) -> None:
        args = self._v2drop_pop_args(kwargs, pretrained, Qwen2VLSimple, extra=("attn_implementation",))
        attn = kwargs.pop("attn_implementation", None)
        if attn is not None and attn not in ATTN_IMPLEMENTATIONS:
            with user_errors():
                raise ValueError(f"v2drop_qwen2_vl: attn_implementation={attn!r} is not allowed; "
                                 f"allowed: {'|'.join(ATTN_IMPLEMENTATIONS)}")
        if attn == "flash_attention_2":
            kwargs["use_flash_attention_2"] = True
        super().__init__(pretrained=pretrained, **kwargs)
        if attn in ("sdpa", "eager"):
            self.model.set_attn_implementation(attn)
        self._v2drop_after_load()
        self._v2drop_attach(args, pretrained)


class V2DropQwen2_5_VL(_QwenCommon, Qwen2_5_VLSimple):
    """``v2drop_qwen2_5_vl`` with ``--force_simple``."""

    is_simple = True
    _v2drop_family = "qwen2_5_vl"
    _v2drop_gen_kwargs_index = 1

    def __init__(self, pretrained: str = "Qwen/Qwen2.5-VL-7B-Instruct", **kwargs: Any) -> None:
        args = self._v2drop_pop_args(kwargs, pretrained, Qwen2_5_VLSimple)
        super().__init__(pretrained=pretrained, **kwargs)
        self._v2drop_after_load()
        self._v2drop_attach(args, pretrained)


class V2DropQwen2_5_VLChat(_QwenCommon, Qwen2_5_VLChat):
    """``v2drop_qwen2_5_vl`` (chat, lmms-eval's default)."""

    is_simple = False
    _v2drop_family = "qwen2_5_vl"
    _v2drop_gen_kwargs_index = 2

    def __init__(self, pretrained: str = "Qwen/Qwen2.5-VL-7B-Instruct", **kwargs: Any) -> None:
        args = self._v2drop_pop_args(kwargs, pretrained, Qwen2_5_VLSimple)
        super().__init__(pretrained=pretrained, **kwargs)
        self._v2drop_after_load()
        self._v2drop_attach(args, pretrained)

    def _v2drop_sort_key(self, args: tuple) -> Any:
        # The chat parent sorts by the context string.
        return (args[0], args[0])
