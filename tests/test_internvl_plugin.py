"""``v2drop_internvl`` in-process: a batch mixing video and image rows (video read by lmms-eval's own
reader from a tiny generated clip) against each row run alone, and the side-car rows against the requests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tools.smoke_assets import INTERNVL_TOKENS_PER_TILE

SCHEDULE = "1:0.5/2:0.25/3:0"
FRAMES = 4


def _write_clip(path: Path, frames: int = 6, size: tuple[int, int] = (64, 48)) -> Path:
    """A tiny MPEG-4 clip: a bright square moving over a background that darkens frame by frame."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            arr = np.full((size[1], size[0], 3), (40 * i) % 255, dtype=np.uint8)
            arr[8:24, 8 + 4 * i: 24 + 4 * i] = 250
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def plugin(tiny_assets, tmp_path_factory) -> Any:
    from v2drop_eval.plugin.internvl import V2DropInternVL

    clip = _write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4")
    model = V2DropInternVL(pretrained=str(tiny_assets["internvl"]), schedule=SCHEDULE, batch_size=4,
                           num_frames=FRAMES, warmup=0, device="cpu", device_map="cpu")
    # Video, image of 2 tiles + thumbnail, image of one tile, video: 64, 48, 16, 64 vision tokens.
    docs = [{"video": str(clip), "q": "what happens?"}, {"image": (112, 56), "q": "what color?"},
            {"image": (56, 56), "q": "is it red? answer in one word please"}, {"video": str(clip), "q": "count"}]
    model.task_dict = {"t": {"test": docs}}
    return model, docs


def chat_messages(doc: dict) -> list[dict]:
    media = ({"type": "video", "url": doc["video"]} if "video" in doc
             else {"type": "image", "url": Image.new("RGB", doc["image"], (200, 30, 30))})
    return [{"role": "user", "content": [media, {"type": "text", "text": doc["q"]}]}]


def _requests(indices: list[int]) -> list[Any]:
    from lmms_eval.api.instance import Instance

    return [Instance(request_type="generate_until", idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1},
                     arguments=("ctx", chat_messages, {"max_new_tokens": 3}, i, "t", "test")) for i in indices]


def test_video_and_image_rows_in_one_batch_equal_rows_alone(plugin):
    model, docs = plugin
    expected = [FRAMES * INTERNVL_TOKENS_PER_TILE, 3 * INTERNVL_TOKENS_PER_TILE, INTERNVL_TOKENS_PER_TILE,
                FRAMES * INTERNVL_TOKENS_PER_TILE]
    start = len(model._v2drop_log.records)
    batch = model.generate_until(_requests(list(range(len(docs)))))
    records = model._v2drop_log.records[start:]
    assert sorted((r["doc_id"], r["batch_size"], r["vision_tokens"]) for r in records) == [
        (i, len(docs), n) for i, n in enumerate(expected)]
    model.batch_size_per_gpu = 1
    try:
        for i in range(len(docs)):
            start = len(model._v2drop_log.records)
            (alone,) = model.generate_until(_requests([i]))
            (row,) = model._v2drop_log.records[start:]
            in_batch = next(r for r in records if r["doc_id"] == i)
            assert row["vision_per_layer"] == in_batch["vision_per_layer"]
            assert row["tokens_per_layer"] == in_batch["tokens_per_layer"]
            assert alone.text == batch[i].text
    finally:
        model.batch_size_per_gpu = 4


def test_batch_size_refused_below_one(tiny_assets):
    from v2drop_eval.plugin.args import ModelArgsError
    from v2drop_eval.plugin.internvl import V2DropInternVL

    for bad in (0, "auto", "-2"):
        with pytest.raises(ModelArgsError, match=f"batch_size={bad} is not allowed; give an integer >= 1"):
            V2DropInternVL(pretrained=str(tiny_assets["internvl"]), schedule=SCHEDULE, batch_size=bad, device="cpu")
