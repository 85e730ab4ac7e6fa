"""Real sizes, once per family: full ViT-B/16 checkpoints in the official layouts
(85.8 M parameters, random values) load strictly, export, quantize and pass parity."""
import pytest
import torch

import omedge
from tests.conftest import manifest_dict as read_manifest
from tests.conftest import mae_training_dict, official_state_dict, write_tiles
from tests.conftest import spec_io  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib_b")
    write_tiles(d, 24, seed=5)
    return d


def _bundle_mb(bundle):
    return sum(f["bytes"] for f in read_manifest(bundle)["files"].values()) / 1e6


def test_brow_vit_b_openvino_int8_under_100mb(tmp_path, calib):
    ckpt = tmp_path / "brow_backbone.pth"
    torch.save(official_state_dict("brow", "B"), ckpt)
    b = omedge.export("brow", ckpt, formats=["openvino"], precision="int8", calib=calib, out=tmp_path / "brow")
    m = read_manifest(b)
    assert m["model"]["variant"] == "B" and m["model"]["parameters"] == 85_798_656
    art = m["artifacts"][0]
    assert art["parity"]["passed"] and art["parity"]["outputs"]["embedding"]["cosine_min"] >= 0.99
    assert _bundle_mb(b) <= 100
    emb = omedge.load(b).predict(sorted(calib.iterdir())[:2])
    assert emb.shape == (2, 768)


def test_pathoduet_vit_b_onnx_int8(tmp_path, calib):
    sd = official_state_dict("pathoduet-he", "B")
    sd["head.weight"], sd["head.bias"] = torch.randn(1000, 768), torch.zeros(1000)
    ckpt = tmp_path / "checkpoint_HE.pth"
    torch.save(sd, ckpt)
    b = omedge.export("pathoduet-he", ckpt, formats=["onnx"], precision="int8", calib=calib, out=tmp_path / "pd")
    art = read_manifest(b)["artifacts"][0]
    assert art["parity"]["passed"] and _bundle_mb(b) <= 100
    assert "activation x activation" in art["quantization"]["float_nodes"]


def test_deblurring_mae_vit_b_training_dict_fp32(tmp_path):
    ckpt = tmp_path / "checkpoint-799.pth"
    torch.save(mae_training_dict(official_state_dict("deblurring-mae", "B"), 768), ckpt)
    b = omedge.export("deblurring-mae", ckpt, formats=["onnx", "openvino"], out=tmp_path / "dm")
    m = read_manifest(b)
    assert m["model"]["variant"] == "B"
    for art in m["artifacts"]:
        assert art["parity"]["passed"] and art["parity"]["outputs"]["embedding"]["cosine_min"] >= 0.9999


def test_endo_fm_timesformer_b_dino_dict_fp32(tmp_path):
    import argparse
    sd = official_state_dict("endo-fm", "B")
    teacher = {f"backbone.{k}": v for k, v in sd.items()}
    teacher["head.last_layer.weight_g"] = torch.ones(65536, 1)
    ckpt = tmp_path / "endo_fm.pth"
    torch.save({"teacher": teacher, "student": {}, "epoch": 30, "args": argparse.Namespace(arch="vit_base"),
                "dino_loss": {"center": torch.zeros(1, 65536)}}, ckpt)
    b = omedge.export("endo-fm", ckpt, formats=["onnx"], verify_size=4, out=tmp_path / "endo")
    m = read_manifest(b)
    assert m["model"]["variant"] == "B" and abs(m["model"]["parameters"] - 121.3e6) / 121.3e6 < 0.01
    assert m["artifacts"][0]["parity"]["outputs"]["embedding"]["cosine_min"] >= 0.9999


def test_convmae_b_classifier_openvino_int8(tmp_path, calib):
    ckpt = tmp_path / "checkpoint-best.pth"
    torch.save({"model": official_state_dict("deblurring-convmae", "B", num_classes=2)}, ckpt)
    b = omedge.export("deblurring-convmae", ckpt, formats=["openvino"], precision="int8", calib=calib,
                      out=tmp_path / "cm")
    m = read_manifest(b)
    assert m["model"]["variant"] == "B" and abs(m["model"]["parameters"] - 84.6e6) / 84.6e6 < 0.01
    assert m["artifacts"][0]["parity"]["passed"] and _bundle_mb(b) <= 100


def test_stunet_b_single_patch_export_parity(tmp_path):
    """STU-Net-B (58 M) on one 128^3 patch: ONNX with dynamic spatial axes, onnxruntime
    and OpenVINO fp32 against torch fp32."""
    import numpy as np
    import openvino as ov
    import onnxruntime as ort

    import omedge.models as models
    from omedge.exporters.onnx import export_onnx
    from omedge.parity import cosine_rows
    model = models.build(models.get_spec("stu-net"), "B")
    x = np.random.default_rng(0).standard_normal((1, 1, 128, 128, 128)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x))["logits"].numpy()
    export_onnx(model, torch.from_numpy(x), tmp_path / "stunet_b.onnx", *spec_io(models.get_spec("stu-net"), ["logits"]))
    got_ort = ort.InferenceSession(str(tmp_path / "stunet_b.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"volume": x})[0]
    core = ov.Core()
    got_ov = core.compile_model(core.read_model(str(tmp_path / "stunet_b.onnx")), "CPU",
                                {"INFERENCE_PRECISION_HINT": "f32"})({0: x})[0]
    for got, min_agree in ((got_ort, 0.9995), (got_ov, 0.999)):
        assert cosine_rows(ref, got)[0] > 0.9999
        assert (ref.argmax(1) == got.argmax(1)).mean() > min_agree


def test_prime_650m_onnx_external_data_int8_dynamic(tmp_path):
    """The real PRIME size: 570 official tensors (651 M parameters, 2.6 GB) load strictly,
    export to ONNX with external data and a dynamic length, quantize to dynamic INT8, and
    keep the mutation-score ranking (Spearman) of torch fp32."""
    from omedge.models import prime
    from tests.models.test_prime import synth_official
    sd = synth_official("lm", seed=0, **prime.SIZES["650M"])
    assert len(sd) == 570
    torch.save(sd, tmp_path / "prime.pt")
    del sd
    b = omedge.export("prime", tmp_path / "prime.pt", formats=["onnx"], precision="int8-dynamic", verify_size=4,
                      out=tmp_path / "prime-int8")
    m = read_manifest(b)
    assert m["model"]["variant"] == "650M" and abs(m["model"]["parameters"] - 651_074_593) < 1000
    art = m["artifacts"][0]
    assert art["parity"]["passed"] and art["parity"]["outputs"]["log_probs"]["spearman_min"] >= 0.99
    (tmp_path / "prime.pt").unlink()
    rows = omedge.load(b).score("MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", ["K2A", "T3W", "Y5F:I6G"])
    assert len(rows) == 3 and all(abs(r["score"]) < 100 for r in rows)


def test_cite_vit_b_official_file_openvino_int8_with_a_dozen_tiles(tmp_path):
    """CITE at its real size (86.7 M, mixed fp16/fp32 file) with a 1024-d one-layer BERT
    standing in for BioLinkBERT-large: INT8 from 12 tiles passes top-1 >= 98%."""
    from tests.cite_data import TEXTS, write_bert_folder, write_cite_checkpoint
    ckpt = write_cite_checkpoint(tmp_path / "cite.pth", "B", seed=4)
    bert = write_bert_folder(tmp_path / "bert-1024", hidden=1024, layers=1, heads=16)
    calib = tmp_path / "calib"
    calib.mkdir()
    write_tiles(calib, 12, seed=6)
    b = omedge.export("cite", ckpt, formats=["openvino"], precision="int8", calib=calib, text_encoder=str(bert),
                      out=tmp_path / "cite")
    m = read_manifest(b)
    assert m["model"]["variant"] == "B" and m["labels"] == TEXTS
    art = m["artifacts"][0]
    assert art["parity"]["passed"] and art["parity"]["outputs"]["logits"]["top1_agreement"] >= 0.98
    probs = omedge.load(b).predict(sorted(calib.iterdir())[:2], return_dict=True)["probabilities"]
    assert probs.shape == (2, 3)
