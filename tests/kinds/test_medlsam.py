"""MedLSAM as one bundle: export from the two official files (medlam.pth fp16 with `module.`,
a SAM-layout file), parity per role and for the whole pipeline, `omedge verify`, and
predict from Python and the CLI (no torch) on a synthetic query with a support folder."""
import json
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch

import omedge
from omedge.errors import CheckpointError, InputError, UsageError
from omedge.exporters import export
from omedge.io.volume import Volume, read_volume
from omedge.manifest import read_manifest
from omedge.verify import verify
from tests.conftest import official_state_dict
from tests.medlsam_data import phantom, save, support_folder
from tests.models.test_medlam import official_file

ROLES = ("localiser", "encoder", "decoder")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("medlsam_ckpt")
    torch.save(official_state_dict("sam", "tiny", seed=3), d / "sam_tiny.pth")
    return official_file(d / "medlam.pth"), d / "sam_tiny.pth"


@pytest.fixture(scope="module")
def bundle(files, tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)   # two busy cores: one torch thread is faster
    try:
        return export("medlsam", files[0], sam=files[1], formats=("onnx",),
                      out=tmp_path_factory.mktemp("b") / "medlsam.omedge")
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def query(tmp_path_factory):
    d = tmp_path_factory.mktemp("query")
    vol, labels = phantom(shape=(44, 40, 30), shift_mm=(2.0, 1.0, -3.0), seed=5)
    return save(d / "query_ct.nii.gz", vol.data, vol.affine), labels


def test_export_records_parity_per_role_and_the_torch_pipeline(bundle, files):
    m = read_manifest(bundle)
    assert m.kind == "volume-prompted" and m.model["variant"] == "tiny" and m.weights["source"] == "checkpoint"
    assert m.roles() == list(ROLES)
    for art in m.artifacts:
        assert art.parity["passed"], (art.role, art.parity["failures"])
    loc = next(a for a in m.artifacts if a.role == "localiser").parity
    assert set(loc["outputs"]) == {"position", "feature0", "feature1", "feature2"}
    assert min(o["cosine_min"] for o in loc["outputs"].values()) >= 0.9999 and loc["backends"]["onnxruntime"]["passed"]
    dec = next(a for a in m.artifacts if a.role == "decoder").parity
    assert dec["outputs"]["low_res_masks"]["mask_iou_min"] >= 0.99
    check = m.preprocess["pipeline_check"]
    assert sorted(check["torch_boxes"]) == ["1", "2", "3"] and sum(check["torch_voxels"].values()) > 0
    assert m.preprocess["localiser"]["patch"] == 32 and m.preprocess["sam"]["image_size"] == 128
    stored = np.load(bundle / "parity.npz")
    assert stored["pipeline_labels"].shape == (40, 40, 28)
    # the bundle itself ran the whole pipeline at export: its Dice against torch is in the manifest
    assert dec["volume_dice"]["min"] >= 0.99 and dec["pipeline_backend"] == "onnxruntime", dec.get("volume_dice")


def test_verify_reruns_every_graph_and_the_pipeline(bundle):
    report = verify(bundle)
    assert report["passed"], [r["result"] for r in report["runs"]]
    for run in report["runs"]:
        d = run["details"]
        assert d["volume_dice"]["min"] >= 0.99 and d["volume_dice"]["classes"] == 3
        assert d["volume_dice"]["boxes_equal"] and sum(d["volume_dice"]["voxels"].values()) > 0
        assert d["volume_dice"]["decisive"] and d["volume_dice"]["argmax_margin_min"] > 1e-5
        assert d["outputs"]["image_embeddings"]["cosine_min"] >= 0.9999
        assert d["outputs"]["low_res_masks"]["mask_iou_min"] >= 0.99
        assert d["outputs"]["feature0"]["cosine_min"] >= 0.9999


def test_the_pipeline_check_fails_on_a_different_decoder(bundle):
    """The same check with the decoder's logits lowered by 2: smaller masks, Dice below the gate."""
    from omedge.kinds.medlsam import KIND
    p = omedge.load(bundle, backend="onnxruntime")

    def lowered(role, feeds):
        out = p.run_graph(role, feeds)
        return {**out, "low_res_masks": out["low_res_masks"] - 2.0} if role == "decoder" else out
    stored = dict(np.load(bundle / "parity.npz"))
    record, failures = KIND.pipeline_check(lowered, {"pipeline_labels": stored["pipeline_labels"]},
                                           p.manifest.preprocess, "fp32")
    assert failures and "Dice" in failures[0] and record["volume_dice"]["min"] < 0.99


def test_python_and_cli_predict_agree_on_the_query_grid(bundle, query, tmp_path):
    path, _ = query
    pairs = support_folder(tmp_path / "support")
    p = omedge.load(bundle, backend="onnxruntime")
    seen = []
    res = p.segment_volume(path, pairs, classes=[1, 3], progress=lambda done, total: seen.append((done, total)))
    vol = read_volume(path)
    assert res.labels.shape == vol.data.shape and set(res.boxes) == {1, 3}
    assert seen and seen[-1][0] == seen[-1][1] == res.slices
    nnunet = support_folder(tmp_path / "nnunet", layout="nnunet")
    out = tmp_path / "seg.nii.gz"
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['omedge'] + sys.argv[1:]; "
            "runpy.run_module('omedge.cli', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code, "predict", str(bundle), str(path), "--support", str(nnunet),
                        "--classes", "1,3", "-o", str(out), "--json", "--backend", "onnxruntime"], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)["results"][0]
    seg = read_volume(out)
    np.testing.assert_allclose(seg.affine, vol.affine, atol=1e-5)
    np.testing.assert_array_equal(seg.data, res.labels)     # both support layouts: the same cases
    assert report["volumes_ml"] == pytest.approx(res.volumes_ml)
    assert report["boxes"] == {str(c): b for c, b in res.boxes.items()}
    voxel_ml = float(np.prod(vol.spacing)) / 1000
    assert report["volumes_ml"]["class_1"] == pytest.approx((res.labels == 1).sum() * voxel_ml, abs=1e-3)  # rounded to µl


def test_run_side_never_imports_torch(bundle, query, tmp_path):
    path, _ = query
    support_folder(tmp_path / "support")
    code = ("import sys; sys.modules['torch'] = None; import omedge; "
            f"p = omedge.load({str(bundle)!r}); r = p.segment_volume({str(path)!r}, {str(tmp_path / 'support')!r}, "
            "classes=[3]); print(sorted(r.boxes), r.slices); "
            "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules if sys.modules[m])")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("[3]")


def test_a_query_in_another_orientation_gives_the_same_organs(bundle, query, tmp_path):
    """The slice order flipped (S -> I): MedLAM sees the same LAS volume and every slice image is
    the same, so the label map is exactly the flipped one."""
    path, _ = query
    support_folder(tmp_path / "support")
    vol = read_volume(path)
    flip = vol.affine.copy()
    flip[:, 2] = -vol.affine[:, 2]
    flip[:3, 3] = vol.affine[:3, 3] + vol.affine[:3, 2] * (vol.data.shape[2] - 1)
    flipped = Volume(vol.data[:, :, ::-1].copy(), flip, "flipped")
    p = omedge.load(bundle, backend="onnxruntime")
    a = p.segment_volume(vol, tmp_path / "support", classes=[3])
    b = p.segment_volume(flipped, tmp_path / "support", classes=[3])
    assert a.labels.any()
    np.testing.assert_array_equal(b.labels, a.labels[:, :, ::-1])


def test_bad_support_and_queries_are_refused_by_name(bundle, query, tmp_path, monkeypatch, capsys):
    path, _ = query
    p = omedge.load(bundle, backend="onnxruntime")
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    vol, labels = phantom(seed=11)
    save(unlabelled / "case0.nii.gz", vol.data, vol.affine)
    with pytest.raises(InputError, match="case0.nii.gz has no label map"):
        p.segment_volume(path, unlabelled)
    lacking = support_folder(tmp_path / "lacking", n=1)
    save(lacking / "case0_label.nii.gz", np.where(labels == 2, 0, labels).astype(np.uint8), vol.affine)
    with pytest.raises(InputError, match="class 2 is not labelled"):
        p.segment_volume(path, lacking, classes=[1, 2])
    flat = Volume(read_volume(path).data[:, :, :1].copy(), read_volume(path).affine, "one slice")
    with pytest.raises(InputError, match="2-D"):
        p.segment_volume(flat, support_folder(tmp_path / "ok", n=1))
    with pytest.raises(UsageError, match="support set"):
        p.predict(path)
    for extra, code, message in (([], 2, "needs a support set"), (["--support", str(unlabelled)], 6, "no label map")):
        monkeypatch.setattr(sys, "argv", ["omedge", "predict", str(bundle), str(path), *extra])
        with pytest.raises(SystemExit) as e:
            runpy.run_module("omedge.cli", run_name="__main__")
        err = capsys.readouterr().err
        assert e.value.code == code and message in err and "Traceback" not in err


def test_swapped_files_and_missing_partner_are_refused_by_name(files, tmp_path):
    medlam, sam = files
    with pytest.raises(CheckpointError, match="SAM/MedSAM"):
        export("medlsam", sam, sam=medlam, out=tmp_path / "x.omedge")
    with pytest.raises(UsageError, match="also needs the SAM/MedSAM"):
        export("medlsam", medlam, out=tmp_path / "y.omedge")
    with pytest.raises(UsageError, match="--random-weights draws both"):
        export("medlsam", None, random_weights=True, variant="tiny", sam=sam, out=tmp_path / "z.omedge")
    with pytest.raises(UsageError, match="sam do not apply"):
        export("brow", None, random_weights=True, sam=sam, out=tmp_path / "w.omedge")
    assert not list(tmp_path.glob("*.omedge"))


def test_cli_export_with_random_weights_and_swapped_files(files, tmp_path, monkeypatch, capsys):
    medlam, sam = files
    out = tmp_path / "r.omedge"
    monkeypatch.setattr(sys, "argv", ["omedge", "export", "medlsam", "--weights", str(sam), "--sam", str(medlam),
                                      "-o", str(out)])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("omedge.cli", run_name="__main__")
    assert e.value.code == 3 and "SAM/MedSAM" in capsys.readouterr().err and not out.exists()
    torch.set_num_threads(1)
    monkeypatch.setattr(sys, "argv", ["omedge", "export", "medlsam", "--random-weights", "--variant", "tiny",
                                      "-o", str(out), "--json"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("omedge.cli", run_name="__main__")
    assert e.value.code in (0, None), capsys.readouterr().err[-2000:]
    m = read_manifest(out)
    assert m.weights["source"] == "random" and all(a.parity["passed"] for a in m.artifacts)
