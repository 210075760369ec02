"""The Qwen classes' video reading (plugin/video.py): a reader that exists without FORCE_QWENVL_VIDEO_READER,
clips shorter than ``max_num_frames`` sampled at the frames they have, and a clear exit 2 otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from v2drop_eval.plugin.args import ModelArgsError
from v2drop_eval.plugin.video import READER_NAME, pick_reader, qwen_video_reading

vp = pytest.importorskip("qwen_vl_utils.vision_process")


def test_a_reader_that_exists_is_picked(monkeypatch):
    monkeypatch.delenv("FORCE_QWENVL_VIDEO_READER", raising=False)
    monkeypatch.setattr(vp, "is_torchcodec_available", lambda: False)
    monkeypatch.setattr(vp, "is_decord_available", lambda: True)
    assert pick_reader(vp) == "decord"
    monkeypatch.setattr(vp, "is_torchcodec_available", lambda: True)
    assert pick_reader(vp) == "torchcodec"
    monkeypatch.setenv("FORCE_QWENVL_VIDEO_READER", "decord")
    assert pick_reader(vp) == "decord"
    monkeypatch.delenv("FORCE_QWENVL_VIDEO_READER")
    monkeypatch.setattr(vp, "is_torchcodec_available", lambda: False)
    monkeypatch.setattr(vp, "is_decord_available", lambda: False)
    assert pick_reader(vp) is None  # never qwen-vl-utils' torchvision reader (gone in torchvision 0.29)


def test_short_clips_are_sampled_at_their_frames_and_everything_is_put_back(capsys):
    before = (vp.smart_nframes, vp.FORCE_QWENVL_VIDEO_READER, dict(vp.VIDEO_READER_BACKENDS))
    with qwen_video_reading("v2drop_qwen3_vl"):
        assert vp.get_video_reader_backend() == READER_NAME
        assert vp.smart_nframes({"video": "a.mp4", "nframes": 16}, 12, 24.0) == 12
        assert vp.smart_nframes({"video": "a.mp4", "nframes": 16}, 9, 24.0) == 8  # even, as Qwen needs
        assert vp.smart_nframes({"video": "a.mp4", "nframes": 8}, 12, 24.0) == 8  # long enough: unchanged
        with pytest.raises(ModelArgsError, match=r"^v2drop_qwen3_vl: video a.mp4 has 1 frame\(s\); Qwen-VL needs at least 2"):
            vp.smart_nframes({"video": "a.mp4", "nframes": 16}, 1, 24.0)
    assert (vp.smart_nframes, vp.FORCE_QWENVL_VIDEO_READER, dict(vp.VIDEO_READER_BACKENDS)) == before
    with pytest.raises(ValueError, match="nframes should in interval"):  # qwen-vl-utils' own behaviour, outside
        vp.smart_nframes({"video": "a.mp4", "nframes": 16}, 12, 24.0)


def test_a_real_short_clip_through_qwen_vl_utils(tiny_assets, monkeypatch):
    pytest.importorskip("decord")
    monkeypatch.delenv("FORCE_QWENVL_VIDEO_READER", raising=False)
    clip = next(p for p in sorted(Path(tiny_assets["include_path"]).glob("*.mp4")) if _frames(p) == 12)
    with qwen_video_reading("v2drop_qwen2_5_vl"):
        video = vp.fetch_video({"type": "video", "video": str(clip), "nframes": 16, "min_pixels": 4 * 28 * 28,
                                "max_pixels": 64 * 28 * 28})
    assert video.shape[0] == 12


def test_no_reader_or_an_unreadable_video_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FORCE_QWENVL_VIDEO_READER", raising=False)
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video")
    with qwen_video_reading("v2drop_qwen3_vl"), pytest.raises(ModelArgsError) as err:
        vp.fetch_video({"type": "video", "video": str(bad), "nframes": 4})
    assert err.value.code == 2 and f"v2drop_qwen3_vl: cannot read video {bad} with " in str(err.value)
    monkeypatch.setattr(vp, "is_torchcodec_available", lambda: False)
    monkeypatch.setattr(vp, "is_decord_available", lambda: False)
    with qwen_video_reading("v2drop_qwen3_vl"), pytest.raises(ModelArgsError, match="no video reader: .*pip install decord"):
        vp.fetch_video({"type": "video", "video": str(bad), "nframes": 4})
    printed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(printed) == 2


def _frames(path: Path) -> int:
    import decord

    return len(decord.VideoReader(str(path)))
