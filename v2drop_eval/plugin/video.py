"""Video through qwen-vl-utils (``v2drop_qwen2_vl``, ``v2drop_qwen2_5_vl``, ``v2drop_qwen3_vl``): a reader that
exists, and clips shorter than asked.

qwen-vl-utils picks torchcodec, else decord, else ``torchvision.io.read_video`` (gone in torchvision 0.29), and
falls back to that last one whenever the chosen reader raises; a clip with fewer frames than ``nframes``
(``max_num_frames``) raises in every reader. Inside lmms-eval both ended in an exit 0 without results. While
our classes generate, :func:`qwen_video_reading` sets qwen-vl-utils' reader to one that exists
(``FORCE_QWENVL_VIDEO_READER`` if the user set one, else torchcodec, else decord), asks a short clip for the
frames it has (rounded down to an even count, as qwen-vl-utils needs, and said in the log: what lmms-eval's
Qwen3-VL class does when it probes a clip), and turns a video it cannot read into a one-line error and a
non-zero exit (:class:`~v2drop_eval.plugin.args.ModelArgsError`, which lmms-eval does not swallow).
Everything is put back afterwards.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from loguru import logger as eval_logger

from v2drop_eval.plugin.args import ModelArgsError

__all__ = ["READER_NAME", "pick_reader", "qwen_video_reading"]

READER_NAME = "v2drop"  # our entry in qwen-vl-utils' VIDEO_READER_BACKENDS, wrapping the one picked
_BROKEN = "torchvision"  # needs torchvision.io.read_video, removed in torchvision 0.29


def pick_reader(vp: Any) -> str | None:
    """qwen-vl-utils' reader to use: the user's ``FORCE_QWENVL_VIDEO_READER``, else torchcodec, else decord
    (None: none is installed)."""
    forced = os.environ.get("FORCE_QWENVL_VIDEO_READER")
    if forced and forced != READER_NAME:
        return forced
    if vp.is_torchcodec_available():
        return "torchcodec"
    if vp.is_decord_available():
        return "decord"
    return None


def _refuse(message: str) -> ModelArgsError:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return ModelArgsError(message)


@contextlib.contextmanager
def qwen_video_reading(model_name: str) -> Iterator[None]:
    """Around a Qwen class's generation: see the module docstring."""
    from qwen_vl_utils import vision_process as vp

    backend = pick_reader(vp)
    smart_nframes, forced = vp.smart_nframes, vp.FORCE_QWENVL_VIDEO_READER

    def clamped(ele: dict[str, Any], total_frames: int, video_fps: float) -> int:
        asked = ele.get("nframes")
        if asked is not None and vp.round_by_factor(asked, vp.FRAME_FACTOR) > total_frames:
            n = vp.floor_by_factor(total_frames, vp.FRAME_FACTOR)
            if n < vp.FRAME_FACTOR:
                raise _refuse(f"{model_name}: video {ele.get('video')} has {total_frames} frame(s); Qwen-VL needs "
                              f"at least {vp.FRAME_FACTOR}")
            eval_logger.warning(f"V2Drop: video {ele.get('video')} has {total_frames} frames, fewer than the "
                                f"{asked} asked (max_num_frames); sampling {n}")
            ele = {**ele, "nframes": n}
        return smart_nframes(ele, total_frames, video_fps)

    def read(ele: dict[str, Any]) -> Any:
        if backend is None:
            raise _refuse(f"{model_name}: no video reader: qwen-vl-utils needs decord or torchcodec (its torchvision "
                          "reader needs torchvision.io.read_video, which torchvision 0.29 removed); "
                          "pip install decord, or set FORCE_QWENVL_VIDEO_READER to an installed reader")
        try:
            return vp.VIDEO_READER_BACKENDS[backend](ele)
        except (KeyError, ImportError, RuntimeError, ValueError, OSError, AttributeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise _refuse(f"{model_name}: cannot read video {ele.get('video')} with {backend}: {first[:200]}") from None

    vp.VIDEO_READER_BACKENDS[READER_NAME] = read
    vp.FORCE_QWENVL_VIDEO_READER = READER_NAME
    vp.smart_nframes = clamped
    vp.get_video_reader_backend.cache_clear()
    try:
        yield
    finally:
        vp.smart_nframes, vp.FORCE_QWENVL_VIDEO_READER = smart_nframes, forced
        vp.VIDEO_READER_BACKENDS.pop(READER_NAME, None)
        vp.get_video_reader_backend.cache_clear()
