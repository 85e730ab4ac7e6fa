"""Promptable segmentation end to end on tiny SAM bundles (real onnxruntime / OpenVINO,
real files): two graphs per recipe verified end to end, INT8 with a calibration folder,
the Python API against the torch model through the official pipeline, the CLI without
torch, bad prompts, and one embedding reused by many prompts."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import omedge
from omedge import models
from omedge.errors import InputError
from omedge.kinds.promptable import mask_ious, postprocess_masks, prepare_image, prompt_arrays
from omedge.verify import verify
from tests.conftest import official_state_dict


@pytest.fixture(scope="module")
def sam_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(official_state_dict("sam", "tiny", seed=2), path)
    return path


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("slices")
    rng = np.random.default_rng(1)
    for i in range(12):
        h, w = (int(v) for v in rng.integers(80, 200, 2))
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        small.resize((w, h), Image.BICUBIC).save(d / f"slice{i:02d}.png")
    return d


@pytest.fixture(scope="module")
def fp32_bundle(sam_ckpt, tmp_path_factory):
    return omedge.export("sam", sam_ckpt, formats=["onnx", "openvino"], verify_size=3,
                         out=tmp_path_factory.mktemp("b") / "sam-tiny.omedge")


@pytest.fixture(scope="module")
def int8_bundle(sam_ckpt, calib_dir, tmp_path_factory):
    # OpenVINO INT8 (NNCF): on this random tiny model the ONNX-INT8 encoder (cosine ~0.994) moves the
    # fp32 decoder's masks below the 0.95 IoU gate, which the export then refuses (as it should)
    return omedge.export("sam", sam_ckpt, formats=["openvino"], precision="int8", calib=calib_dir,
                         out=tmp_path_factory.mktemp("b") / "sam-int8.omedge")


def _manifest(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def test_fp32_bundle_holds_both_graphs_verified_end_to_end(fp32_bundle):
    m = _manifest(fp32_bundle)
    got = {(a["role"], a["name"]): a for a in m["artifacts"]}
    assert set(got) == {(r, n) for r in ("encoder", "decoder") for n in ("onnx-fp32", "openvino-fp32")}
    for (role, _), a in got.items():
        assert a["parity"]["passed"] and a["verified_backends"], a["parity"]
        if role == "encoder":
            assert a["parity"]["outputs"]["image_embeddings"]["cosine_min"] >= 0.9999
            assert a["inputs"] == ["pixel_values"]
        else:
            assert a["parity"]["outputs"]["low_res_masks"]["mask_iou_min"] >= 0.99
            assert a["parity"]["gates"]["mask_iou_min"] == 0.99
    assert got[("decoder", "onnx-fp32")]["verified_backends"] == ["onnxruntime", "openvino"]
    axes = m["export"]["onnx"]["graphs"]["decoder"]["dynamic_axes"]
    assert axes["point_coords"] == {"0": "prompts", "1": "points"}
    assert m["export"]["onnx"]["graphs"]["encoder"]["dynamic_axes"]["pixel_values"] == {}  # static
    assert m["preprocess"]["image_size"] == 128 and m["preprocess"]["resize"] == "longest_side"
    assert m["preprocess"]["mean"] == [123.675, 116.28, 103.53]
    assert m["inputs"][0]["shape"] == [1, 3, 128, 128]


def test_verify_and_bench_run_the_chain(fp32_bundle):
    report = verify(fp32_bundle)
    assert report["passed"] and {r["artifact"] for r in report["runs"]} == {"onnx-fp32", "openvino-fp32"}
    assert all("mask_iou_min" in r["summary"] for r in report["runs"])
    from omedge.bench import bench_bundle
    rows = bench_bundle(fp32_bundle, runs=2, seconds=0.1, warmup=1)
    assert rows and all("error" not in r for r in rows), rows
    assert all(r["parity"]["passed"] and r["graphs"]["decoder_p50_ms"] > 0 for r in rows)


def test_int8_calibrates_the_encoder_and_keeps_a_decoder_that_passes(int8_bundle):
    m = _manifest(int8_bundle)
    assert m["calibration"]["source"] == "folder" and m["calibration"]["samples"] == 9
    enc = [a for a in m["artifacts"] if a["role"] == "encoder"]
    dec = [a for a in m["artifacts"] if a["role"] == "decoder"]
    assert {a["precision"] for a in enc} == {"int8"}
    assert all(a["parity"]["outputs"]["image_embeddings"]["cosine_min"] >= 0.99 for a in enc)
    assert all(a["quantization"]["calibration_samples"] == 9 for a in enc if a["quantization"])
    for a in dec:  # INT8 where it passed, else the fp32 decoder with the reason recorded
        assert a["parity"]["passed"] and a["parity"]["gate_class"] == "int8"
        assert a["precision"] == "int8" or a["parity"]["fallback"]["from"].endswith("int8")
    assert verify(int8_bundle)["passed"]


def _torch_masks(ckpt, img, boxes):
    """The torch model through the official pipeline (independent of the bundle)."""
    model = models.load(models.get_spec("sam"), ckpt)[0]
    pre = {"image_size": 128, "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}
    x, size, resized = prepare_image(img, pre)
    coords, labels = prompt_arrays(size, resized, boxes=boxes)
    with torch.no_grad():
        emb = model(torch.from_numpy(x))["image_embeddings"]
        out = model.decode(emb, torch.from_numpy(coords), torch.from_numpy(labels))
    return postprocess_masks(out["low_res_masks"][:, :1].numpy(), 128, resized, size)[:, 0]


def test_python_api_matches_torch_and_one_embed_serves_many_prompts(fp32_bundle, sam_ckpt):
    p = omedge.load(fp32_bundle)
    encoder = p.graphs["encoder"][0]
    calls = []
    real_run = encoder.run
    encoder.run = lambda feeds: calls.append(1) or real_run(feeds)
    img = np.asarray(Image.fromarray(np.random.default_rng(3).integers(0, 256, (10, 14, 3), dtype=np.uint8))
                     .resize((210, 150), Image.BICUBIC))
    emb = p.embed(img)
    boxes = [[10, 10, 120, 90], [60, 30, 200, 140], [0, 0, 210, 150]]
    masks, scores = p.segment(emb, boxes=boxes)
    assert masks.shape == (3, 150, 210) and masks.dtype == bool and scores.shape == (3,)
    ref = _torch_masks(sam_ckpt, img, boxes)
    assert mask_ious(ref, masks.astype(np.float32) - 0.5, 1e-3).min() >= 0.99
    for i in range(5):
        m, s = p.segment(emb, points=[[20 + 30 * i, 40]], point_labels=[1])
        assert m.shape == (1, 150, 210)
    multi, ms = p.segment(emb, boxes=boxes[:1], points=[[50, 50]], point_labels=[0], multimask_output=True)
    assert multi.shape == (1, 3, 150, 210) and ms.shape == (1, 3)
    assert len(calls) == 1  # 9 prompts, one encoder run


@pytest.mark.parametrize("prompt,message", [
    ({"boxes": [[10, 10, 300, 90]]}, "outside the 210x150 image"),
    ({"boxes": [[-5, 10, 40, 90]]}, "outside"),
    ({"boxes": [[10, 10, 10, 90]]}, "zero area"),
    ({}, "no prompt given"),
    ({"points": [[10, 10]], "point_labels": [2]}, r"not 0 \(background\) or 1"),
    ({"points": [[10, 10]], "point_labels": [1, 0]}, "1 points but 2 point labels"),
    ({"points": [[500, 10]]}, "point 500,10 is outside"),
])
def test_bad_prompts_are_input_errors(fp32_bundle, prompt, message):
    p = omedge.load(fp32_bundle, backend="onnxruntime")
    emb = p.embed(np.zeros((150, 210, 3), np.uint8))
    with pytest.raises(InputError, match=message):
        p.segment(emb, **prompt)


def _cli_without_torch(*args):
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['omedge'] + sys.argv[1:]; "
            "runpy.run_module('omedge.cli', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)


def test_cli_predict_writes_the_mask_and_json_without_torch(fp32_bundle, tmp_path):
    img = np.asarray(Image.fromarray(np.random.default_rng(4).integers(0, 256, (9, 12, 3), dtype=np.uint8))
                     .resize((260, 200), Image.BICUBIC))
    Image.fromarray(img).save(tmp_path / "frame.png")
    out = tmp_path / "mask.png"
    r = _cli_without_torch("predict", fp32_bundle, tmp_path / "frame.png", "--box", "120,80,250,190",
                           "--point", "150,100", "-o", out, "--json", "--backend", "onnxruntime")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    mask = np.asarray(Image.open(out))
    assert mask.shape == (200, 260) and set(np.unique(mask)) <= {0, 255}
    assert report["results"][0]["area_px"] == int((mask == 255).sum())
    p = omedge.load(fp32_bundle, backend="onnxruntime")
    want, score = p.predict(tmp_path / "frame.png", boxes=[[120, 80, 250, 190]], points=[[150, 100]])
    assert np.array_equal(want[0], mask == 255) and report["results"][0]["score"] == pytest.approx(score[0], abs=1e-5)
    assert not list(tmp_path.glob(".*mask*"))  # the atomic write left no temp file
    bad = _cli_without_torch("predict", fp32_bundle, tmp_path / "frame.png", "--point", "10,10,2")
    assert bad.returncode == 6 and "not 0 (background) or 1" in bad.stderr and "Traceback" not in bad.stderr
    none = _cli_without_torch("predict", fp32_bundle, tmp_path / "frame.png")
    assert none.returncode == 6 and "no prompt given" in none.stderr


def test_cli_preview_draws_each_mask_in_its_colour(fp32_bundle, tmp_path):
    """`--preview`: the input picture, tinted in the palette colour of the prompt where its
    mask is, untouched elsewhere, with the box outlined."""
    from omedge.pictures import ALPHA, label_colours
    img = np.asarray(Image.fromarray(np.random.default_rng(5).integers(0, 256, (9, 12, 3), dtype=np.uint8))
                     .resize((260, 200), Image.BICUBIC))
    Image.fromarray(img).save(tmp_path / "frame.png")
    r = _cli_without_torch("predict", fp32_bundle, tmp_path / "frame.png", "--box", "60,40,200,160",
                           "-o", tmp_path / "mask.png", "--preview", tmp_path / "overlay.png", "--backend", "onnxruntime")
    assert r.returncode == 0, r.stderr[-2000:]
    mask = np.asarray(Image.open(tmp_path / "mask.png")) == 255
    pic = np.asarray(Image.open(tmp_path / "overlay.png").convert("RGB")).astype(int)
    assert pic.shape == img.shape
    inner = np.zeros_like(mask)
    inner[43:157, 63:197] = True  # away from the box outline
    colour = label_colours(2)[1].astype(float)
    want = np.clip((1 - ALPHA) * img.astype(float) + ALPHA * colour + 0.5, 0, 255).astype(int)
    assert mask[inner].any() and (~mask[inner]).any(), "the random model's mask should cover part of the box"
    np.testing.assert_allclose(pic[inner & mask], want[inner & mask], atol=1)
    np.testing.assert_array_equal(pic[inner & ~mask], img[inner & ~mask])
    edge = pic[40, 60:201]  # the box's top edge, in the prompt's colour
    assert (np.abs(edge - colour).max(axis=1) <= 1).mean() > 0.9


def test_a_decoder_that_takes_the_embedding_still_runs(sam_ckpt, tmp_path):
    """Bundles exported before the encoder gave image_tokens have a decoder that takes
    image_embeddings (and would refuse the extra input on onnxruntime): segment_with feeds
    each its own inputs, and both decoders give the same masks."""
    import onnxruntime as ort

    from omedge.exporters.onnx import export_onnx
    from omedge.kinds.promptable import Embedding, decoder_feeds, segment_with
    from omedge.models.layers.sam_decoder import tokens_of
    from omedge.models.sam import SAM_MEAN, SAM_STD, SIDE
    model = models.load(models.get_spec("sam"), sam_ckpt)[0].eval()

    class Older(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sam = model

        def forward(self, image_embeddings, image_q, image_k, image_v, point_coords, point_labels):
            tokens = tokens_of(image_embeddings + self.sam._dense())
            return self.sam.decode_cached(tokens, image_q, image_k, image_v, point_coords, point_labels)
    pre = {"image_size": 128, "mean": SAM_MEAN, "std": SAM_STD, "mask_threshold": 0.0}
    x = prepare_image(np.random.default_rng(3).integers(0, 255, (100, 128, 3), np.uint8), pre)[0]
    with torch.no_grad():
        enc = {k: v.numpy() for k, v in model(torch.from_numpy(x)).items()}
    coords, labels = prompt_arrays((100, 128), (100, 128), boxes=[[10, 12, 80, 70]])
    prompts = [{"name": n, "dynamic": {"0": "prompts", "1": "points"}} for n in ("point_coords", "point_labels")]
    masks = {}
    for name, module, inputs in (("current", model.graph_modules()["decoder"], SIDE),
                                 ("older", Older(), ("image_embeddings", *SIDE[1:]))):
        path = tmp_path / f"{name}.onnx"
        example = tuple(torch.from_numpy(v) for v in (*(enc[n] for n in inputs), coords, labels))
        export_onnx(module, example, path, [{"name": n} for n in inputs] + prompts,
                    [{"name": "low_res_masks", "dynamic": {"0": "prompts"}}, {"name": "iou_predictions"}])
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        side = {k: v for k, v in enc.items() if k != "image_embeddings" and (name == "current" or k != "image_tokens")}
        emb = Embedding(enc["image_embeddings"], (100, 128), (100, 128), name, side)

        def run(role, feeds, s=session):
            return dict(zip(("low_res_masks", "iou_predictions"), s.run(None, feeds)))
        masks[name] = segment_with(run, pre, emb, boxes=[[10, 12, 80, 70]])
        masks[name + " logits"] = run("decoder", decoder_feeds(emb, coords, labels))["low_res_masks"]
    np.testing.assert_allclose(masks["current logits"], masks["older logits"], rtol=1e-4, atol=1e-5)
    assert np.abs(masks["current logits"]).max() > 0.1
    assert np.array_equal(masks["current"][0], masks["older"][0])
    np.testing.assert_allclose(masks["current"][1], masks["older"][1], rtol=1e-4, atol=1e-5)
