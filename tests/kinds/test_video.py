"""Endo-FM (clips) and ConvMAE (frames) end to end: export, verify, predict a video file,
stream, and the bad inputs of a live feed."""
import argparse

import numpy as np
import pytest
import torch

import omedge
from tests.conftest import manifest_dict as read_manifest
from omedge.errors import CheckpointError
from tests.conftest import official_state_dict
from tests.video_files import frame_at, write_video


@pytest.fixture(scope="module")
def polypdiag(tmp_path_factory):
    """PolypDiag downstream file: module.-prefixed backbone + `linear` head."""
    d = tmp_path_factory.mktemp("endo")
    backbone = official_state_dict("endo-fm")
    for blk in range(2):  # a trained temporal branch is not zero
        backbone[f"blocks.{blk}.temporal_fc.weight"] = torch.randn(64, 64) * 0.02
    path = d / "polypdiag.pth"
    torch.save({"state_dict": {"module.linear.weight": torch.randn(2, 64), "module.linear.bias": torch.zeros(2)},
                "backbone_state_dict": {f"module.{k}": v for k, v in backbone.items()},
                "epoch": 20, "args": argparse.Namespace(arch="vit_base")}, path)
    return path


@pytest.fixture(scope="module")
def endo_bundle(tmp_path_factory, polypdiag):
    out = tmp_path_factory.mktemp("endo_b") / "polypdiag"
    return omedge.export("endo-fm", polypdiag, formats=["onnx", "openvino"], labels=["no_polyp", "polyp"], out=out)


def test_endo_fm_bundle_is_a_verified_clip_classifier(endo_bundle):
    m = read_manifest(endo_bundle)
    assert m["inputs"][0]["layout"] == "NCTHW" and m["inputs"][0]["shape"] == [None, 3, 8, 224, 224]
    assert "logits" in [o["name"] for o in m["outputs"]] and m["labels"] == ["no_polyp", "polyp"]
    pre = m["preprocess"]  # the official evaluation's choices, with where they come from
    assert pre["crop"] == "uniform-0" and pre["sampling"] == "linspace" and not pre["antialias"]
    assert set(pre["official"]) >= {"sampling", "crop", "resize", "entry"}
    for art in m["artifacts"]:
        assert art["parity"]["passed"] and art["parity"]["outputs"]["logits"]["top1_agreement"] == 1.0


def test_endo_fm_int8_calibrated_on_clips(tmp_path, polypdiag):
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(8):  # 9 s at 30 fps: one full 8-frame clip at the official rate each
        write_video(clips / f"clip{i}.mp4", 270, fps=30, size=(96, 128))
    b = omedge.export("endo-fm", polypdiag, formats=["openvino"], precision="int8", calib=clips,
                      out=tmp_path / "int8", force=True)
    m = read_manifest(b)
    assert m["calibration"]["source"] == "folder" and m["calibration"]["samples"] == 6
    from omedge.bundle import sha256
    assert m["verification"]["held_out_calibration"]["sha256"] == [sha256(clips / f"clip{i}.mp4")[:16] for i in (3, 7)]
    assert m["artifacts"][0]["parity"]["outputs"]["embedding"]["cosine_min"] > 0.95


OFFICIAL_30FPS = [0, 36, 72, 109, 145, 182, 218, 255]  # trunc(linspace(0, 8 * 32 / 30 * 30 - 1, 8))


def test_stream_window_equals_the_same_clip_passed_whole(endo_bundle, tmp_path):
    from omedge.io.video import iter_video
    video = write_video(tmp_path / "colon.mp4", 540, fps=30, size=(96, 128))  # 18 s: two whole clips
    p = omedge.load(endo_bundle)
    results = list(p.stream(video))
    assert len(results) == 2 and p.last_stream_stats["frames_used"] == 17  # 8 + 8 + the third clip's first
    whole = p.predict([frame_at(i, (96, 128)) for i in OFFICIAL_30FPS], return_dict=True)
    # decoding is lossy (H.264): compare with the decoded frames, not the originals
    decoded = [f for _, f in iter_video(video)]
    for k, start in enumerate((0, 256)):  # the next clip starts where this one's span ends
        exact = p.predict([decoded[start + i] for i in OFFICIAL_30FPS], return_dict=True)
        np.testing.assert_allclose(results[k]["outputs"]["logits"], exact["logits"][0], atol=1e-4)
    assert results[0]["t_start"] == 0 and results[0]["t_end"] == pytest.approx(255 / 30, abs=0.002)
    assert results[1]["t_start"] == pytest.approx(256 / 30, abs=0.002)
    assert results[0]["label"] in ("no_polyp", "polyp") and whole["logits"].shape == (1, 2)


def test_video_shorter_than_a_clip_is_clamped_like_the_official_loader(endo_bundle, tmp_path):
    from omedge.io.video import iter_video
    video = write_video(tmp_path / "short.mp4", 100, fps=30, size=(96, 128))  # 3.3 s of an 8.5 s clip
    p = omedge.load(endo_bundle)
    results = list(p.stream(video))
    assert len(results) == 1 and results[0]["padded_frames"] == 5
    decoded = [f for _, f in iter_video(video)]
    clamped = [min(i, 99) for i in OFFICIAL_30FPS]  # 0, 36, 72, then the last frame five times
    np.testing.assert_allclose(results[0]["outputs"]["logits"],
                               p.predict([decoded[i] for i in clamped], return_dict=True)["logits"][0], atol=1e-4)


def test_variable_frame_rate_is_indexed_like_the_official_decoder(endo_bundle, tmp_path):
    """pyav_decode counts decoded frames at the file's average rate, not seconds."""
    import av

    from omedge.io.video import iter_video
    times = [i / 30 for i in range(150)] + [5 + i / 15 for i in range(150)]  # 30 fps, then 15 fps
    video = write_video(tmp_path / "vfr.mp4", 300, fps=30, size=(96, 128), times=times)
    with av.open(str(video)) as c:
        rate = float(c.streams.video[0].average_rate)  # 20 fps here
    index = torch.linspace(0, 32 * 8 / 30 * rate - 1, 8).long().tolist()
    p = omedge.load(endo_bundle)
    results = list(p.stream(video))
    decoded = [f for _, f in iter_video(video)]
    np.testing.assert_allclose(results[0]["outputs"]["logits"],
                               p.predict([decoded[i] for i in index], return_dict=True)["logits"][0], atol=1e-4)
    assert results[0]["t_end"] == pytest.approx(times[index[-1]], abs=0.002) and len(results) == 1


def test_predict_video_from_the_cli(endo_bundle, tmp_path):
    import json
    import subprocess
    import sys
    video = write_video(tmp_path / "c.mp4", 270, fps=30, size=(96, 128))
    r = subprocess.run([sys.executable, "-m", "omedge.cli", "predict", str(endo_bundle), str(video), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)["results"][0]
    assert len(res["windows"]) == 1 and res["windows"][0]["label"] in ("no_polyp", "polyp")
    assert res["stats"]["corrupt"] == 0


def test_wrong_checkpoint_for_endo_fm(tmp_path, ckpt_dir):
    with pytest.raises(CheckpointError):
        omedge.export("endo-fm", ckpt_dir / "brow_tiny.pth", out=tmp_path / "x")


def test_convmae_frame_classifier_bundle(tmp_path):
    sd = official_state_dict("deblurring-convmae", num_classes=2)
    torch.save({"model": sd}, tmp_path / "thyroid_convmae.pth")
    b = omedge.export("deblurring-convmae", tmp_path / "thyroid_convmae.pth", formats=["onnx", "openvino"],
                      precision="int8", calib="synthetic", calib_size=16, out=tmp_path / "thyroid", force=True)
    m = read_manifest(b)
    assert "logits" in [o["name"] for o in m["outputs"]]
    p = omedge.load(b)
    gray = frame_at(0, (300, 400))[..., 0]  # a grayscale ultrasound frame is replicated to RGB
    assert p.predict(gray).shape == (1, 2)
    results = list(p.stream(iter([gray, gray]), drop="block"))
    assert len(results) == 2 and "label" in results[0]


def test_other_clip_length_resizes_time_embed_like_the_official_code(tmp_path, polypdiag):
    b = omedge.export("endo-fm", polypdiag, frames=4, crop="center", out=tmp_path / "t4")
    m = read_manifest(b)
    assert m["preprocess"]["frames"] == 4 and m["inputs"][0]["shape"] == [None, 3, 4, 224, 224]
    assert m["preprocess"]["crop"] == "center" and "crop_note" in m["preprocess"]
    assert m["artifacts"][0]["parity"]["passed"]
    p = omedge.load(b)
    clip = [frame_at(i, (96, 128)) for i in range(4)]
    # the official forward: time_embed resized to 4 rows by nearest interpolation (rows 0, 2, 4, 6)
    import omedge.models as models
    spec = models.get_spec("endo-fm")
    model8 = models.load(spec, polypdiag)[0]
    model4 = models.load(spec, polypdiag, num_frames=4)[0]
    assert torch.equal(model4.time_embed[:, model4.time_index], model8.time_embed[:, [0, 2, 4, 6]])
    x = torch.from_numpy(p.prepare(clip))
    with torch.no_grad():
        np.testing.assert_allclose(p.predict(clip, return_dict=True)["logits"], model4(x)["logits"].numpy(),
                                   atol=1e-4)
    with pytest.raises(omedge.errors.UsageError, match="video models"):
        omedge.export("brow", random_weights=True, variant="tiny", frames=4, out=tmp_path / "x")
