"""Prompted classification (CITE) end to end on the tiny model: export with the text tower
and a dozen calibration images (INT8), predict with the exported and with new class names,
the run-side tokenizer against transformers', the bar chart, verify and the bad inputs."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1]))
from cite_data import TEXTS, write_bert_folder, write_cite_checkpoint  # noqa: E402

import omedge  # noqa: E402
from omedge.errors import InputError, UsageError  # noqa: E402


def tiles(folder: Path, n: int, seed: int) -> Path:
    """Smooth colour fields with noise, 256 px, like H&E tiles in size (not in content)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).resize((256, 256), Image.BICUBIC)
        pixels = np.clip(np.asarray(base, np.int16) + rng.integers(-20, 21, (256, 256, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"tile{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def cite(tmp_path_factory):
    d = tmp_path_factory.mktemp("cite")
    bert = write_bert_folder(d / "BioLinkBERT-tiny")
    ckpt = write_cite_checkpoint(d / "cite_gastric.pth", "tiny", seed=1)
    calib = tiles(d / "calib", 12, seed=2)  # a user-sized folder: a dozen images
    bundle = omedge.export("cite", ckpt, out=d / "cite.omedge", formats=["onnx", "openvino"], precision="int8",
                           calib=calib, text_encoder=str(bert), with_text_encoder=True)
    plain = d / "plain.omedge"  # what a user types
    r = subprocess.run([sys.executable, "-m", "omedge.cli", "export", "cite", "--weights", str(ckpt), "--text-encoder",
                        str(bert), "--format", "onnx", "-o", str(plain)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return {"dir": d, "bert": bert, "bundle": bundle, "plain": plain, "images": sorted(tiles(d / "in", 3, 9).iterdir())}


def test_int8_bundle_passes_its_gates_with_a_dozen_images(cite):
    m = json.loads((cite["bundle"] / "manifest.json").read_text())
    assert m["labels"] == TEXTS and m["model"]["kind"] == "prompted-classification"
    assert {(a["role"], a["precision"]) for a in m["artifacts"]} == {("model", "int8"), ("text", "fp32")}
    for a in m["artifacts"]:
        assert a["parity"]["passed"], a["parity"]
        if a["role"] == "model":
            logits = a["parity"]["outputs"]["logits"]
            assert logits["top1_agreement"] >= 0.98 and a["parity"]["gates"]["top1_agreement"] == 0.98
            assert "probability_max_abs" in logits
    assert set(m["constants"]) == {"class_embeddings", "vocab"}
    assert m["preprocess"]["resize"] == {"size": [224, 224], "interpolation": "bilinear"}
    assert m["preprocess"]["text"]["lower_case"] is True
    plain = json.loads((cite["plain"] / "manifest.json").read_text())
    assert set(plain["constants"]) == {"class_embeddings"} and {a["role"] for a in plain["artifacts"]} == {"model"}
    assert [i["name"] for i in plain["inputs"]] == ["pixel_values"]


def test_predict_with_exported_and_new_class_names(cite):
    p = omedge.load(cite["bundle"], backend="onnxruntime")
    out = p.predict(cite["images"], return_dict=True)
    assert out["probabilities"].shape == (3, 3) and np.allclose(out["probabilities"].sum(1), 1, atol=1e-5)
    assert set(out["labels"]) <= set(TEXTS)
    # the numpy head on the graph's embedding with the stored constant = the graph's own logits
    emb = out["embedding"] / np.linalg.norm(out["embedding"], axis=1, keepdims=True)
    text = p.constant("class_embeddings")
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    np.testing.assert_allclose(100 * emb @ text.T, out["logits"], atol=2e-3)
    # the device's text graph (kept fp32 in an INT8 bundle) re-embeds the same names: the same logits
    again = p.predict(cite["images"], return_dict=True, classes=TEXTS)
    np.testing.assert_allclose(again["logits"], out["logits"], atol=0.05)
    assert (again["logits"].argmax(1) == out["logits"].argmax(1)).all()
    new = ["signet ring cell carcinoma", "normal gastric mucosa"]
    other = p.predict(cite["images"], return_dict=True, classes=new)
    assert other["probabilities"].shape == (3, 2) and set(other["labels"]) <= set(new)
    assert p.labels == TEXTS  # a per-call choice does not stick


def test_run_side_tokenizer_matches_transformers(cite):
    from transformers import BertTokenizer

    from omedge.kinds.prompted import wordpiece
    p = omedge.load(cite["bundle"])
    ours = wordpiece(p.constant("vocab"), lower_case=True)
    ref = BertTokenizer.from_pretrained(str(cite["bert"]), local_files_only=True)
    for text in TEXTS + ["Signet-ring CELL carcinoma.", "unseen words, gastric"]:
        assert ours.encode(text).ids == ref(text)["input_ids"], text


def test_cli_predict_plot_verify_and_bad_input(cite, tmp_path):
    cli = [sys.executable, "-m", "omedge.cli"]
    img = str(cite["images"][0])
    r = subprocess.run([*cli, "predict", str(cite["bundle"]), img, "--json", "--plot", str(tmp_path / "p.png"),
                        "--classes", "signet ring cell carcinoma,normal gastric mucosa,adenocarcinoma"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)["results"][0]
    assert res["labels"] in ("signet ring cell carcinoma", "normal gastric mucosa", "adenocarcinoma")
    chart = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    top = int(np.argmax(res["probabilities"]))
    row = chart[30 + top * 26 + 10]  # the top class's bar is drawn in palette colour 1, the others grey
    assert (np.abs(row.astype(int) - [230, 25, 75]).sum(1) < 30).sum() > 5
    r = subprocess.run([*cli, "predict", str(cite["plain"]), img, "--classes", "a,b"], capture_output=True, text=True)
    assert r.returncode == 2 and "--with-text-encoder" in r.stderr
    r = subprocess.run([*cli, "verify", str(cite["bundle"])], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "fail" not in r.stdout.lower(), r.stdout + r.stderr
    with pytest.raises(InputError, match="must not be empty"):
        omedge.load(cite["bundle"]).predict(img, classes=["", "x"])


def test_export_refuses_a_class_count_the_file_was_not_trained_for(cite):
    ckpt = cite["dir"] / "cite_gastric.pth"
    with pytest.raises(UsageError, match="trained for 3 classes"):
        omedge.export("cite", ckpt, out=cite["dir"] / "x.omedge", text_encoder=str(cite["bert"]), classes=["a", "b"])
    with pytest.raises(UsageError, match="--text-encoder"):
        omedge.export("cite", ckpt, out=cite["dir"] / "y.omedge")
    assert not (cite["dir"] / "x.omedge").exists() and not (cite["dir"] / "y.omedge").exists()
