"""``v2drop_llava``: lmms-eval's ``llava_hf`` (chat and simple) with V2Drop and measurement.

Subclasses of ``lmms_eval.models.simple.llava_hf.LlavaHf`` and ``lmms_eval.models.chat.llava_hf.LlavaHf``:
loading, devices, accelerate data parallelism, tokenizer and processor set-up and every model
argument stay the parent's. Only ``generate_until`` is replaced, because the parents run one sample
per ``generate`` call (they assert ``batch_size == 1``) and swallow generation errors into empty
answers. The prompt of each row is built exactly as the parent builds it for batch size 1 (same
chat template choice, same ``<image>`` prefixing, same generation kwargs and defaults), so at
``method=none`` the answers equal the built-in ``llava_hf``'s; rows are left-padded (the parent
sets ``padding_side = "left"``) and run as one ``generate`` call.

Videos (LLaVA-OneVision checkpoints; the ``llava_hf`` model map loads them): each video is read with
the parent's own loader (``LlavaHf.load_video``: decord, ``max_frames_num`` frames sampled uniformly,
32 by default) and prompted as the simple parent prompts it (``<video>`` before the question).
Rows of a batch may mix images, videos and text. The built-in chat class hands video paths to the
processor instead, which then decodes every frame of the file; here both classes sample
``max_frames_num`` frames, so a long benchmark video stays at a fixed token count.
"""

from __future__ import annotations

from typing import Any

import PIL.Image
from lmms_eval.models.chat.llava_hf import LlavaHf as LlavaHfChat
from lmms_eval.models.simple.llava_hf import DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN, VICUNA_CHAT_TEMPLATE
from lmms_eval.models.simple.llava_hf import LlavaHf as LlavaHfSimple
from lmms_eval.protocol import ChatMessages

from v2drop_eval.plugin.base import V2DropMixin

__all__ = ["V2DropLlava", "V2DropLlavaChat"]


class _LlavaCommon(V2DropMixin):
    _v2drop_family = "llava"
    _v2drop_parent: type = LlavaHfSimple

    def __init__(self, pretrained: str = "llava-hf/llava-1.5-7b-hf", **kwargs: Any) -> None:
        config_kwargs = {k: kwargs[k] for k in ("revision", "trust_remote_code") if k in kwargs}
        args = self._v2drop_pop_args(kwargs, pretrained, self._v2drop_parent, **config_kwargs)
        super().__init__(pretrained=pretrained, **kwargs)
        self._v2drop_attach(args, pretrained)

    def _v2drop_sort_key(self, args: tuple) -> Any:
        # Longest prompt first, as the simple parent orders its requests.
        ctx = args[0]
        return (-len(self.tok_encode(ctx)), ctx) if isinstance(ctx, str) else (0, "")

    # -- one batch ------------------------------------------------------------------------------
    def _llava_row(self, request: Any) -> tuple[str, list[Any], list[Any]]:
        """``(prompt text, images, video paths)`` of one request, as the parent builds them."""
        raise NotImplementedError

    def _load_videos(self, paths: list[Any]) -> list[Any]:
        """Frames of each video (``[frames, H, W, 3]``), read by the parent's loader."""
        if not paths:
            return []
        if not self._v2drop_handle.adapter.video_token_ids:
            raise NotImplementedError(
                f"{self.pretrained} is a {self.config.model_type!r} checkpoint, which takes no videos; videos need "
                "a LLaVA-OneVision checkpoint (model_type 'llava_onevision')")
        out = []
        for path in paths:
            if not isinstance(path, str):
                raise TypeError(f"v2drop_llava: a video must be given as a file path, not {type(path).__name__}")
            out.append(self.load_video(path, self.max_frames_num))
        return out

    def _v2drop_generate_batch(self, requests: list[Any]) -> list[Any]:
        texts, images, videos = [], [], []
        for req in requests:
            text, row_images, row_videos = self._llava_row(req)
            texts.append(text)
            images += row_images
            videos += self._load_videos(row_videos)
        # The parent: processor(images=..., videos=..., text=...).to(device, model dtype); left padding for
        # batches. A flat image list, as the parent passes it: LLaVA-OneVision tiles every image as a single one.
        inputs = self._image_processor(images=images or None, videos=videos or None, text=texts, return_tensors="pt",
                                       padding=True)
        inputs = inputs.to(self._device, self.model.dtype)
        new = self._v2drop_generate(inputs, requests, pad_token_id=self.eot_token_id)
        return self._v2drop_results(requests, texts, new, [self.tokenizer.decode(ids, skip_special_tokens=True)
                                                            for ids in new])


class V2DropLlava(_LlavaCommon, LlavaHfSimple):
    """``v2drop_llava`` (simple, ``--force_simple``): prompts from ``doc_to_text`` + ``doc_to_visual``."""

    is_simple = True
    _v2drop_parent = LlavaHfSimple
    _v2drop_gen_kwargs_index = 1

    def _llava_row(self, request: Any) -> tuple[str, list[Any], list[Any]]:
        context, _, doc_to_visual, doc_id, task, split = request.args
        visuals = self.flatten([doc_to_visual(self.task_dict[task][split][doc_id])])
        images = [v for v in visuals if isinstance(v, PIL.Image.Image)]
        videos = [v for v in visuals if isinstance(v, str)]
        if len(images) + len(videos) != len(visuals):
            bad = next(v for v in visuals if not isinstance(v, (PIL.Image.Image, str)))
            raise TypeError(f"v2drop_llava takes PIL images and video file paths as visuals, not {type(bad).__name__}")
        # As LlavaHf.generate_until (simple): add <image> (or <video>) tokens if the prompt has no <image>,
        # then the chat template: the chat_template argument, else the tokenizer's, else Vicuna's.
        if DEFAULT_IMAGE_TOKEN not in context and visuals:
            tokens = [DEFAULT_IMAGE_TOKEN] * len(images) + [DEFAULT_VIDEO_TOKEN] * len(videos)
            context = f"{' '.join(tokens)}\n{context}"
        messages = [{"role": "user", "content": context}]
        if self.chat_template is not None:
            self.tokenizer.chat_template = self.chat_template
        elif self.tokenizer.chat_template is None:
            self.tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, images, videos


class V2DropLlavaChat(_LlavaCommon, LlavaHfChat):
    """``v2drop_llava`` (chat, lmms-eval's default): prompts from ``doc_to_messages``."""

    is_simple = False
    _v2drop_parent = LlavaHfSimple  # the chat class takes the simple class's __init__ arguments
    _v2drop_gen_kwargs_index = 2

    def _llava_row(self, request: Any) -> tuple[str, list[Any], list[Any]]:
        _, doc_to_messages, _, doc_id, task, split = request.args
        messages = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
        visuals, videos, _ = messages.extract_media()
        # As LlavaHf.generate_until (chat): the processor's chat template over the messages.
        text = self._image_processor.apply_chat_template(messages.model_dump()["messages"], tokenize=False,
                                                         add_generation_prompt=True)
        return text, list(visuals), list(videos)

