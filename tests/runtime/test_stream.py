"""Streaming runtime: bounded queues, drop policy, timestamps, bad frames."""
import time

import numpy as np
import pytest

import omedge
from omedge.runtime.stream import ClipSampler
from tests.video_files import frame_at, write_video


@pytest.fixture(scope="module")
def us_bundle(tmp_path_factory, ckpt_dir):
    """Ultrasound frame classifier (DeblurringMIM MAE, tiny) with labels."""
    return omedge.export("deblurring-mae", ckpt_dir / "finetuned_thyroid.pth", labels=["benign", "malignant"],
                         formats=["onnx"], out=tmp_path_factory.mktemp("s") / "us")


def test_clip_sampler_follows_source_time_not_frame_count():
    """Live sources at 30 and 60 fps: one clip spans the same 8 * 32 / 30 s of source time."""
    def first_clip_times(fps):
        s = ClipSampler(8, 8 * 32 / 30, 8 * 32 / 30, positions=False)
        for i in range(int(9 * fps)):
            for ids in s.push(i, i / fps, i / fps)[1]:
                return [k / fps for k in ids]
    t30, t60 = first_clip_times(30), first_clip_times(60)
    assert t30[-1] == pytest.approx(255 / 30) and np.allclose(t30, t60, atol=1 / 30)
    s = ClipSampler(1, 1.0, 1.0, positions=False)  # one frame a second
    times = [0, 0.5, 1.0, 7.0, 7.2, 8.0, 8.1]
    taken = [times[ids[0]] for i, t in enumerate(times) for ids in s.push(i, t, t)[1]]
    assert taken == [0, 1.0, 7.0, 8.0]  # a gap: no burst


def test_frame_stream_matches_predict_and_counts(us_bundle):
    p = omedge.load(us_bundle)
    frames = [frame_at(i, (256, 256)) for i in range(6)]
    results = list(p.stream(iter(frames), drop="block"))
    assert [r["index"] for r in results] == list(range(6))
    expected = p.predict(frames)
    np.testing.assert_allclose(np.stack([r["outputs"]["logits"] for r in results]), expected, atol=1e-5)
    assert all(r["label"] in ("benign", "malignant") and r["latency_ms"] > 0 for r in results)
    assert p.last_stream_stats["frames_in"] == 6 and p.last_stream_stats["dropped"] == 0
    assert len(list(p.stream(iter(frames), stride=2, drop="block"))) == 3


def test_slow_consumer_drops_frames_with_bounded_memory(us_bundle):
    p = omedge.load(us_bundle)

    def camera(n=60):
        for i in range(n):
            yield i / 30, frame_at(i, (256, 256))
            time.sleep(0.001)  # a fast source
    results = []
    for r in p.stream(camera(), queue_size=2, drop="oldest"):
        results.append(r)
        time.sleep(0.05)  # inference + display slower than the source
    stats = p.last_stream_stats
    assert stats["dropped"] > 0 and stats["frames_in"] == 60
    assert stats["frames_used"] + stats["dropped"] <= 60 and len(results) == stats["results"]
    # with "oldest" dropping, the newest frame always gets through
    assert results[-1]["t_end"] == pytest.approx(59 / 30)


def test_bad_frames_are_skipped_counted_and_the_stream_goes_on(us_bundle, caplog):
    p = omedge.load(us_bundle)
    frames = [frame_at(0, (256, 256)), np.zeros((256, 256, 5), np.uint8), frame_at(1, (240, 300)),
              frame_at(2, (256, 256))[..., 0], np.dstack([frame_at(3, (256, 256)), np.full((256, 256), 255, np.uint8)]),
              np.full((256, 256, 3), np.nan, np.float32)]
    results = list(p.stream(iter(frames), drop="block"))
    stats = p.last_stream_stats
    assert len(results) == 4 and stats["corrupt"] == 2 and stats["size_changes"] >= 2
    assert "skipping frame" in caplog.text


def test_video_file_stream_uses_timestamps(us_bundle, tmp_path):
    video = write_video(tmp_path / "us.mp4", 20, fps=10, size=(240, 320))
    p = omedge.load(us_bundle)
    results = list(p.stream(video))
    assert len(results) == 20 and results[-1]["t_end"] == pytest.approx(1.9, abs=0.02)
    assert p.last_stream_stats["dropped"] == 0  # files are read at the consumer's pace
