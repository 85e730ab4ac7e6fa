"""Endo-FM's clip pipeline against a torch re-implementation of the official evaluation
(med-air/Endo-FM: eval_finetune.py --test, UCF101 val set, one clip and crop 0 per video):
frame indices (datasets/decoder.py), crop (datasets/transform.py uniform_crop), resize
(random_short_side_scale_jitter after tensor_normalize), and the whole path end to end."""
import math
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from omedge.errors import UsageError
from omedge.kinds.video import VideoKind, VideoPredictor, first_clip
from omedge.models import get_spec
from omedge.runtime.preprocess import bilinear_taps, preprocess_frame
from omedge.runtime.stream import ClipSampler, linspace_f32
from tests.video_files import frame_at, write_video

SPEC = get_spec("endo-fm")
# torch's AVX2/AVX-512 CPU kernels (any x86 machine of the last decade, the official one too)
# fuse multiply-adds in linspace and interpolate; omedge reproduces those. Its DEFAULT kernels
# round twice and differ by one float32 ulp of the source coordinate.
needs_fma = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "DEFAULT",
                               reason="torch runs its non-FMA DEFAULT CPU kernels here")


def manifest_pre(**options):
    return VideoKind().export_request(SPEC, SPEC.preprocess, options)[0]


# ---- the official pipeline, re-implemented in torch ----
def official_indices(fps: float, n_decoded: int, start: float = 0.0) -> list[int]:
    span = 32 * 8 / 30 * fps  # sampling_rate * num_frames / target_fps * fps
    return torch.clamp(torch.linspace(start, start + span - 1, 8), 0, n_decoded - 1).long().tolist()


def official_decode(path: Path):
    """pyav_decode + decode() for clip_idx 0 of 1: frames from pts 0 up to int((span - 1) *
    duration / frames), plus the one frame past it, then the linspace indices."""
    with av.open(str(path)) as container:
        s = container.streams.video[0]
        fps = float(s.average_rate)
        end_pts = math.inf if s.duration is None else int((32 * 8 / 30 * fps - 1) * (s.duration / s.frames))
        container.seek(0, any_frame=False, backward=True, stream=s)
        kept = {}
        for frame in container.decode(video=0):
            if frame.pts < 0:
                continue
            kept[frame.pts] = frame
            if frame.pts > end_pts:
                break
        frames = torch.as_tensor(np.stack([kept[p].to_rgb().to_ndarray() for p in sorted(kept)]))
    index = official_indices(fps, len(frames))
    return frames[index], index


def official_transform(frames: torch.Tensor, spatial_idx: int = 0, size: int = 224) -> torch.Tensor:
    """tensor_normalize -> permute to CTHW -> short side to `size` (F.interpolate) -> uniform_crop."""
    x = (frames.float() / 255.0 - torch.tensor([0.45] * 3)) / torch.tensor([0.225] * 3)
    x = x.permute(3, 0, 1, 2)
    h, w = x.shape[2:]
    if min(h, w) != size:
        new = (math.floor(h / w * size), size) if w < h else (size, math.floor(w / h * size))
        x = F.interpolate(x, size=new, mode="bilinear", align_corners=False)
    h, w = x.shape[2:]
    top, left = math.ceil((h - size) / 2), math.ceil((w - size) / 2)
    if h > w:
        top = (0, top, h - size)[spatial_idx]
    else:
        left = (0, left, w - size)[spatial_idx]
    return x[:, :, top:top + size, left:left + size]


class Capture(VideoPredictor):
    """The video predictor without a bundle: records the batches it would run."""

    def __init__(self, pre):
        self.manifest, self.labels, self.batches = SimpleNamespace(preprocess=pre), None, []

    def run(self, batch, batch_size=1):
        self.batches.append(batch)
        return {"embedding": batch.reshape(len(batch), -1)[:, :4]}


# ---- 1. frame indices ----
@needs_fma
def test_linspace_is_torch_float32_linspace():
    for start, end in [(0, 255), (0, 212.33333), (34.1333, 289.1333), (0, 127.0), (0, 510.9999), (3, 3), (17.25, 801.5)]:
        for n in (1, 2, 7, 8, 16):
            np.testing.assert_array_equal(linspace_f32(start, end, n), torch.linspace(start, end, n).numpy())


def first_ids(sampler: ClipSampler, n_frames: int, fps: float, round_ms=False):
    for i in range(n_frames):
        t = round(i / fps, 3) if round_ms else i / fps
        _, done = sampler.push(i, i if sampler.positions else t, t)
        if done:
            return done[0]
    return sampler.finish()[0][0]


@needs_fma
@pytest.mark.parametrize("fps", [10, 15, 23.976, 24, 25, 29.97, 30, 50, 59.94, 60, 120])
def test_positions_are_the_official_linspace_clamped_to_the_video(fps):
    span = 32 * 8 / 30 * fps
    for n in (1, 50, int(span) - 1, int(span), int(span) + 1, 3 * int(span)):
        ids = first_ids(ClipSampler(8, span, span), n, fps)
        assert ids == official_indices(fps, n), (fps, n)
    assert official_indices(30, 10_000) == [0, 36, 72, 109, 145, 182, 218, 255]  # stride 36.4, not 32


@pytest.mark.parametrize("fps", [25, 30, 60])
def test_live_timestamps_pick_the_frames_the_file_rule_picks(fps):
    """A live source: the same linspace over the clip's source time (8 * 32 / 30 s)."""
    span = 32 * 8 / 30 * fps
    expect = official_indices(fps, 10_000)
    for round_ms in (False, True):  # containers and capture cards often round to 1 ms
        live = ClipSampler(8, 32 * 8 / 30, 32 * 8 / 30, positions=False)
        assert first_ids(live, int(span) + 40, fps, round_ms) == expect


def test_stride_one_starts_the_next_clip_one_slot_later():
    s = ClipSampler(8, 256.0, 256.0 / 8)  # stride 1: hop = span / T
    clips = [d for i in range(600) for d in s.push(i, i, i / 30)[1]]
    assert clips[0] == official_indices(30, 600) and clips[1] == official_indices(30, 600, start=32.0)
    assert len(clips) == 11  # the clips starting at 0, 32, ..., 320 end before frame 600


def test_decode_bound_clamps_like_the_extra_frame_of_pyav_decode():
    s = ClipSampler(8, 256.0, 256.0, bound=3.0)  # decode range ends at 3 s: frame 91 is the extra one
    assert first_ids(s, 300, 30) == [0, 36, 72, 91, 91, 91, 91, 91]


# ---- 2. crop position, 3. resize ----
@needs_fma
@pytest.mark.parametrize("size", [(96, 160), (160, 96), (480, 640), (720, 1280), (250, 250), (224, 300)])
@pytest.mark.parametrize("crop, index", [("official", 0), ("center", 1)])
def test_frame_matches_the_official_transform(size, crop, index):
    img = np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8)
    ref = official_transform(torch.from_numpy(img)[None], index)[:, 0].numpy()
    np.testing.assert_allclose(preprocess_frame(img, manifest_pre(crop=crop)), ref, atol=1e-6, rtol=0)


def test_official_crop_is_left_for_landscape_and_top_for_portrait():
    land = np.zeros((224, 400, 3), np.uint8)
    land[:, :224] = 255  # only the left 224 columns are bright
    assert (preprocess_frame(land, manifest_pre()) > 2).all()
    assert not (preprocess_frame(land, manifest_pre(crop="center")) > 2).all()
    portrait = np.ascontiguousarray(land.transpose(1, 0, 2))
    assert (preprocess_frame(portrait, manifest_pre()) > 2).all()
    assert manifest_pre()["crop"] == "uniform-0" and manifest_pre(crop="center")["crop"] == "center"
    with pytest.raises(UsageError):
        manifest_pre(crop="left")


@needs_fma
@pytest.mark.parametrize("n_in, n_out", [(96, 224), (640, 298), (1080, 224), (1920, 398), (101, 224), (250, 224)])
def test_bilinear_taps_are_interpolate(n_in, n_out):
    x = np.random.default_rng(n_in).random(n_in).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x).view(1, 1, 1, -1).expand(3, 8, 1, -1), size=(1, n_out),
                        mode="bilinear", align_corners=False, antialias=False)[0, 0, 0].numpy()
    i0, i1, w0, w1 = bilinear_taps(n_in, n_out)
    np.testing.assert_allclose(x[i0] * w0 + x[i1] * w1, ref, atol=1e-6, rtol=0)


# ---- end to end: a video file through omedge's video predictor path ----
VFR_SLOW_START = [i / 15 for i in range(90)] + [6 + i / 30 for i in range(150)]  # 15 fps, then 30 fps
VFR_FAST_START = [i / 30 for i in range(150)] + [5 + i / 15 for i in range(150)]


@needs_fma
@pytest.mark.parametrize("n, fps, size, times", [
    (300, 30, (96, 160), None),         # landscape: left crop
    (240, 25, (160, 96), None),         # portrait: top crop
    (540, 60, (96, 128), None),
    (100, 30, (96, 160), None),         # shorter than a clip: indices clamped to the last frame
    (240, 30, (96, 160), VFR_SLOW_START),  # the decode range ends before frame span - 1
    (300, 30, (96, 160), VFR_FAST_START)])
def test_video_file_clip_is_the_official_tensor(tmp_path, n, fps, size, times):
    video = write_video(tmp_path / "v.mp4", len(times) if times else n, fps=fps, size=size, times=times)
    frames, index = official_decode(video)
    for crop, spatial in (("official", 0), ("center", 1)):
        ref = official_transform(frames, spatial)[None].numpy()
        p = Capture(manifest_pre(crop=crop))
        results = list(p.stream(video))
        np.testing.assert_allclose(p.batches[0], ref, atol=1e-5, rtol=0)
        np.testing.assert_allclose(first_clip(video, p.manifest.preprocess)[None], ref, atol=1e-5, rtol=0)
        assert results[0]["t_start"] == 0
    if n == 100:
        assert index[-5:] == [99] * 5 and results[0]["padded_frames"] == 5
    if times is VFR_SLOW_START:
        assert index[-1] < 32 * 8 / 30 * float(av.open(str(video)).streams.video[0].average_rate) - 2


@needs_fma
def test_live_source_clip_is_the_official_tensor():
    frames = [frame_at(i, (96, 160)) for i in range(300)]
    p = Capture(manifest_pre())
    assert len(list(p.stream(iter([(i / 30, f) for i, f in enumerate(frames)]), drop="block"))) == 1
    ref = official_transform(torch.from_numpy(np.stack(frames))[official_indices(30, 300)])[None].numpy()
    np.testing.assert_allclose(p.batches[0], ref, atol=1e-5, rtol=0)
