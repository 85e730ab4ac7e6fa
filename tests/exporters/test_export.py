"""export(): every format and precision is verified against torch fp32 and recorded;
bad requests fail clearly and leave no partial bundle."""
import errno
import json

import numpy as np
import pytest

import omedge
import omedge.exporters as exporters
import omedge.exporters.verify  # noqa: F401  (monkeypatched below)
import omedge.parity as parity
from omedge.bundle import verify_files
from omedge.manifest import read_manifest as read_manifest_obj
from tests.conftest import manifest_dict as read_manifest
from omedge.errors import ExportError, InputError, ParityError, UsageError
from tests.conftest import write_tiles


def _no_leftovers(folder):
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_int8_bundle_both_formats_parity_recorded(brow_bundle, tiles):
    m = read_manifest(brow_bundle)
    verify_files(brow_bundle, read_manifest_obj(brow_bundle))
    assert [a["name"] for a in m["artifacts"]] == ["onnx-int8", "openvino-int8"]
    for a in m["artifacts"]:
        p = a["parity"]
        assert p["passed"] and p["gates"]["cosine_min"] == 0.99
        assert 0.99 <= p["outputs"]["embedding"]["cosine_min"] <= 1.0
        assert a["quantization"]["calibration_samples"] >= 1
    assert m["calibration"]["source"] == "folder"
    # verification used images held out of calibration, not the calibration set itself
    from omedge.bundle import sha256
    tile_hashes = {sha256(t)[:16] for t in tiles}
    held = m["verification"]["held_out_calibration"]
    assert held["count"] == len(held["sha256"]) >= 1 and set(held["sha256"]) <= tile_hashes
    assert set(m["calibration"]["sha256"]) <= tile_hashes and not set(m["calibration"]["sha256"]) & set(held["sha256"])
    assert m["calibration"]["samples"] + held["count"] == len(tiles)
    assert "names" not in held and "folder" not in m["calibration"]  # no file names unless asked
    assert m["weights"]["source"] == "checkpoint" and len(m["weights"]["sha256"]) == 64
    assert m["export"]["onnx"]["opset"] == 17 and m["export"]["onnx"]["dynamic_axes"]["pixel_values"] == {"0": "batch"}
    assert m["forced"] is False and "openvino" in m["tools"] and "nncf" in m["tools"]
    assert m["artifacts"][1]["parity"]["measured_with"]["inference_precision"] in ("f32", "bf16")
    assert not (brow_bundle / ".work").exists()


@pytest.mark.parametrize("model_id,ckpt,precision,formats", [
    ("pathoduet-he", "checkpoint_HE.pth", "fp32", ["onnx", "openvino"]),
    ("pathoduet-ihc", "checkpoint_IHC.pth", "int8-dynamic", ["onnx", "openvino"]),
    ("deblurring-mae", "checkpoint-799.pth", "bf16", ["openvino"]),
    ("deblurring-mae", "finetuned_thyroid.pth", "fp16", ["onnx", "openvino"]),
])
def test_each_model_and_precision(tmp_path, ckpt_dir, model_id, ckpt, precision, formats):
    out = omedge.export(model_id, ckpt_dir / ckpt, formats=formats, precision=precision,
                        out=tmp_path / "b.omedge")
    m = read_manifest(out)
    assert [a["precision"] for a in m["artifacts"]] == [precision] * len(formats)
    assert all(a["parity"]["passed"] for a in m["artifacts"])
    assert m["model"]["licence"] == "CC-BY-NC-4.0"
    if ckpt == "finetuned_thyroid.pth":
        assert "logits" in [o["name"] for o in m["outputs"]]
        assert all(a["parity"]["outputs"]["logits"]["top1_agreement"] == 1.0 for a in m["artifacts"])


def test_classifier_labels_recorded(tmp_path, ckpt_dir):
    out = omedge.export("deblurring-mae", ckpt_dir / "finetuned_thyroid.pth", labels=["benign", "malignant"],
                        out=tmp_path / "thyroid")
    assert out.name == "thyroid.omedge" and read_manifest(out)["labels"] == ["benign", "malignant"]
    with pytest.raises(UsageError, match="no classification head"):
        omedge.export("deblurring-mae", ckpt_dir / "checkpoint-799.pth", labels=["a", "b"], out=tmp_path / "x")


def test_synthetic_calibration_only_on_request_and_recorded(tmp_path):
    with pytest.raises(UsageError, match="--calib"):
        omedge.export("brow", random_weights=True, variant="tiny", precision="int8", out=tmp_path / "a")
    out = omedge.export("brow", random_weights=True, variant="tiny", precision="int8", calib="synthetic",
                        calib_size=8, out=tmp_path / "b")
    m = read_manifest(out)
    assert m["calibration"]["source"] == "synthetic" and "synthetic" in m["calibration"]["warning"]
    assert m["weights"]["source"] == "random" and "RANDOM" in m["weights"]["warning"]
    assert m["verification"]["synthetic"] == 8


def test_parity_gate_failure_writes_nothing_unless_forced(tmp_path, ckpt_dir, monkeypatch):
    # an unreachable gate (cosine > 1) must fail, leave no bundle, and --force keeps it marked
    monkeypatch.setitem(parity.TENSOR_GATES, "fp32", {"cosine_min": 1.5, "top1_agreement": 1.0})
    with pytest.raises(ParityError, match="failed its parity gate"):
        omedge.export("brow", ckpt_dir / "brow_tiny.pth", out=tmp_path / "gate")
    assert not (tmp_path / "gate.omedge").exists() and not _no_leftovers(tmp_path) and not list(tmp_path.iterdir())
    out = omedge.export("brow", ckpt_dir / "brow_tiny.pth", out=tmp_path / "gate", force=True)
    m = read_manifest(out)
    assert m["forced"] is True and m["artifacts"][0]["parity"]["passed"] is False


def test_output_exists_refused_unless_overwrite(tmp_path, ckpt_dir):
    out = omedge.export("brow", ckpt_dir / "brow_tiny.pth", out=tmp_path / "b")
    before = (out / "manifest.json").read_text()
    with pytest.raises(UsageError, match="already exists.*--overwrite|already exists"):
        omedge.export("brow", ckpt_dir / "brow_tiny.pth", out=tmp_path / "b")
    assert (out / "manifest.json").read_text() == before
    omedge.export("brow", ckpt_dir / "brow_tiny.pth", out=tmp_path / "b", overwrite=True, formats=["openvino"])
    assert [a["format"] for a in read_manifest(out)["artifacts"]] == ["openvino"]
    assert not _no_leftovers(tmp_path)


def test_interrupted_export_leaves_nothing(tmp_path, ckpt_dir, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(exporters.verify, "verify_artifact", interrupt)
    with pytest.raises(KeyboardInterrupt):
        omedge.export("brow", ckpt_dir / "brow_tiny.pth", out=tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_old_bundle(tmp_path, ckpt_dir, monkeypatch):
    out = omedge.export("brow", ckpt_dir / "brow_tiny.pth", out=tmp_path / "b")
    monkeypatch.setattr(exporters.verify, "verify_artifact", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        omedge.export("brow", ckpt_dir / "brow_tiny.pth", out=out, overwrite=True)
    verify_files(out, read_manifest_obj(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.omedge"]


def test_full_disk_is_reported_and_cleaned(tmp_path, ckpt_dir, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "savez_compressed", full)
    with pytest.raises(ExportError, match="full"):
        omedge.export("brow", ckpt_dir / "brow_tiny.pth", out=tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_free_space_checked_before_writing(tmp_path, ckpt_dir, monkeypatch):
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ExportError, match="not enough disk space.*MB needed"):
        omedge.export("brow", ckpt_dir / "brow_tiny.pth", out=tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_missing_or_bad_calibration_folder(tmp_path, ckpt_dir):
    with pytest.raises(InputError, match="image folder not found"):
        omedge.export("brow", ckpt_dir / "brow_tiny.pth", precision="int8", calib=tmp_path / "nope",
                      out=tmp_path / "b")
    calib = tmp_path / "calib"
    write_tiles(calib, 4)
    (calib / "tile_zz.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="calibration image .*tile_zz.png"):
        omedge.export("brow", ckpt_dir / "brow_tiny.pth", precision="int8", calib=calib, out=tmp_path / "b")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no images"):
        omedge.export("brow", ckpt_dir / "brow_tiny.pth", precision="int8", calib=empty, out=tmp_path / "b")
    assert not (tmp_path / "b.omedge").exists()


def test_unsupported_requests(tmp_path, ckpt_dir):
    with pytest.raises(UsageError, match="bf16"):
        omedge.export("brow", ckpt_dir / "brow_tiny.pth", precision="bf16", formats=["onnx"], out=tmp_path / "b")
    with pytest.raises(UsageError, match="tensorrt"):
        omedge.export("brow", ckpt_dir / "brow_tiny.pth", formats=["trt"], out=tmp_path / "b")
    with pytest.raises(UsageError, match="unknown model id"):
        omedge.export("brow2", ckpt_dir / "brow_tiny.pth", out=tmp_path / "b")
    with pytest.raises(UsageError, match="--random-weights"):
        omedge.export("brow", out=tmp_path / "b")


def test_manifest_is_plain_json_with_hashes(brow_fp32_bundle):
    m = json.loads((brow_fp32_bundle / "manifest.json").read_text())
    assert set(m["files"]) == {"model.onnx", "openvino/model-fp32.xml", "openvino/model-fp32.bin", "parity.npz"}
    assert m["preprocess"]["center_crop"] == 224 and m["preprocess"]["mean"][0] == 0.485


def test_declared_constants_are_stored_hashed_and_served(tmp_path, monkeypatch):
    """A spec's constants (CITE's class-text embeddings, say) travel with the bundle."""
    import torch

    import omedge.models as models
    from omedge.errors import BundleIntegrityError
    from omedge.spec import ModelSpec, embedding_output, image_input

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 8)
            self.register_buffer("text", torch.randn(3, 8))

        def forward(self, x):
            return {"embedding": self.proj(x.mean(dim=(2, 3)))}

        def constants(self):
            return {"class_text": self.text}

    spec = ModelSpec(id="tiny-const", title="test", kind="image", variants=("tiny",), default_variant="tiny",
                     inputs=(image_input(),), outputs=(embedding_output(),), primary_output="embedding",
                     preprocess=dict(models.get_spec("brow").preprocess), licence="-", source="-",
                     build=lambda variant: Tiny(), remap=None, constants=("class_text",))
    real = models.all_specs
    monkeypatch.setattr(models, "all_specs", lambda: {**real(), spec.id: spec})
    b = omedge.export("tiny-const", random_weights=True, out=tmp_path / "c")
    m = read_manifest(b)
    assert m["constants"]["class_text"]["shape"] == [3, 8] and "constants/class_text.npy" in m["files"]
    p = omedge.load(b)
    assert p.constant("class_text").shape == (3, 8)
    np.save(b / "constants" / "class_text.npy", np.zeros((3, 8), np.float32))
    with pytest.raises(BundleIntegrityError, match="class_text"):
        omedge.load(b)


def test_a_refusal_names_the_formats_that_passed(tmp_path, ckpt_dir, monkeypatch):
    """All artifacts are verified before refusing, so the user is told what would work."""
    real = exporters.verify.verify_artifact

    def openvino_fails(art, *args, **kwargs):
        real(art, *args, **kwargs)
        if art.format == "openvino":
            art.parity.update(passed=False, failures=["forced failure for the test"])
            art.verified_backends = []
    monkeypatch.setattr(exporters.verify, "verify_artifact", openvino_fails)
    with pytest.raises(ParityError, match="openvino-fp32 failed") as e:
        omedge.export("brow", ckpt_dir / "brow_tiny.pth", formats=["onnx", "openvino"], out=tmp_path / "b")
    assert "onnx-fp32 passed: rerun with --format onnx" in e.value.hint
    assert list(tmp_path.iterdir()) == []
