"""``v2drop_internvl``: lmms-eval's ``internvl_hf`` (chat; lmms-eval 0.7.3 has no simple class for it) with
V2Drop and measurement.

Subclass of ``lmms_eval.models.chat.internvl_hf.InternVLHf``: loading (bfloat16), devices, accelerate
data parallelism, the processor and every model argument stay the parent's. Only ``generate_until``
is replaced, because the parent runs one sample per ``generate`` call (it asserts ``batch_size == 1``,
and its loop would build the prompt of a batch's first request only) and swallows generation errors
into empty answers. Each row's prompt is built as the parent builds it (the processor's chat template
over the request's messages, ``min_patches`` / ``max_patches`` for image tiles), the rows of a batch go
through the processor together (it pads on the left) and run as one ``generate`` call; answers are
decoded as the parent decodes them. So at ``method=none`` and batch size 1 the answers on image tasks
equal the built-in ``internvl_hf``'s.

Videos: the parent hands video paths to the processor, and transformers 5 decodes them only with
``torchcodec`` installed. Here each video is read by lmms-eval's own reader
(``lmms_eval.models.model_utils.load_video.read_video``: PyAV unless ``LMMS_VIDEO_DECODE_BACKEND`` says
otherwise), ``num_frames`` frames (the parent's argument, default 32; ``fps`` caps them) sampled
uniformly, and the frames go to the processor as they are.

InternVL has no video token: the processor writes each sampled frame as its own run of image tokens
(``Frame1: <img><IMG_CONTEXT>...</img>``), so video tokens are found, dropped and counted as image
tokens, and rows may mix images and videos.
"""

from __future__ import annotations

from typing import Any

from lmms_eval.models.chat.internvl_hf import InternVLHf
from lmms_eval.protocol import ChatMessages

from v2drop_eval.plugin.base import V2DropMixin

__all__ = ["V2DropInternVL"]


class V2DropInternVL(V2DropMixin, InternVLHf):
    """``v2drop_internvl`` (chat, lmms-eval's default and only class): prompts from ``doc_to_messages``."""

    is_simple = False
    _v2drop_family = "internvl"
    _v2drop_gen_kwargs_index = 2

    def __init__(self, pretrained: str = "OpenGVLab/InternVL3-8B-hf", batch_size: int | str = 1,
                 **kwargs: Any) -> None:
        config_kwargs = {k: kwargs[k] for k in ("revision", "trust_remote_code") if k in kwargs}
        kwargs["batch_size"] = batch_size  # checked (an integer >= 1) with the other arguments
        args = self._v2drop_pop_args(kwargs, pretrained, InternVLHf, **config_kwargs)
        requested = kwargs.pop("batch_size")
        super().__init__(pretrained=pretrained, batch_size=1, **kwargs)  # the parent asserts batch size 1
        self.batch_size_per_gpu = requested  # our generate_until batches
        self._v2drop_attach(args, pretrained)

    def _processor_kwargs(self) -> dict[str, Any]:
        """Tile settings, as the parent hands them to the processor; frames arrive sampled already."""
        out: dict[str, Any] = {"do_sample_frames": False}
        if self.min_patches is not None:
            out["min_patches"] = self.min_patches
        if self.max_patches is not None:
            out["max_patches"] = self.max_patches
        return out

    def _frames(self, video: Any) -> Any:
        """A video path read into sampled frames ``[T, H, W, 3]`` (anything else is passed on as given)."""
        if not isinstance(video, str):
            return video
        import numpy as np
        from lmms_eval.models.model_utils.load_video import read_video

        n = self.num_frames if self.num_frames is not None else 32
        frames = read_video(video, num_frm=n, fps=self.fps)
        if 0 < len(frames) < n:
            # A clip shorter than n frames: repeat frames uniformly, as llava_hf's loader does, so every video
            # of a batch has n frames (the video processor stacks them) whatever batch it runs in.
            frames = frames[np.linspace(0, len(frames) - 1, n).round().astype(int)]
        return frames

    def _v2drop_generate_batch(self, requests: list[Any]) -> list[Any]:
        texts, images, videos = [], [], []
        for req in requests:
            _, doc_to_messages, _, doc_id, task, split = req.args
            messages = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
            row_images, row_videos, _ = messages.extract_media()
            images += row_images  # the processor takes each kind flat, in order of appearance
            videos += [self._frames(v) for v in row_videos]
            texts.append(self.processor.apply_chat_template(messages.model_dump()["messages"], tokenize=False,
                                                            add_generation_prompt=True))
        inputs = self.processor(images=images or None, videos=videos or None, text=texts, return_tensors="pt",
                                padding=True, **self._processor_kwargs())
        inputs = inputs.to(self.device, self.model.dtype)
        new = self._v2drop_generate(inputs, requests, pad_token_id=self.pad_token_id)
        decoded = self.processor.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return self._v2drop_results(requests, texts, new, decoded)
