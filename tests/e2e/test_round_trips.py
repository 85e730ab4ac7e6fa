"""One round trip per kind: export on the build side, then load and run the kind's
entry point in a fresh process that must never import torch (nor nncf, transformers)."""
import json
import subprocess
import sys

import pytest
import torch

import omedge
from omedge.kinds import KINDS

RUN_SIDE = """
import json, sys
import numpy as np
import omedge
p = omedge.load(sys.argv[1])
{body}
bad = [m for m in ("torch", "nncf", "transformers", "timm") if m in sys.modules]
assert not bad, bad
print(json.dumps({{"result": result, "describe": p.describe()}}, default=str))
"""


def run_side(bundle, body: str, *args) -> dict:
    r = subprocess.run([sys.executable, "-c", RUN_SIDE.format(body=body), str(bundle), *map(str, args)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_every_kind_has_a_round_trip_here():
    tested = {name.removeprefix("test_").replace("_", "-") for name in globals() if name.startswith("test_")}
    assert set(KINDS) <= tested, set(KINDS) - tested


def test_promptable_segmentation(tmp_path):
    b = omedge.export("sam", variant="tiny", random_weights=True, formats=["onnx"], verify_size=3, out=tmp_path / "sam")
    out = run_side(b, "emb = p.embed(np.full((90, 150, 3), 120, np.uint8))\n"
                      "result = [list(p.segment(emb, boxes=[[10, 10, 80, 60]])[0].shape) for _ in range(3)]")
    assert out["result"] == [[1, 90, 150]] * 3 and out["describe"]["kind"] == "promptable-segmentation"
    assert set(out["describe"]["graphs"]) == {"encoder", "decoder"}


def test_volume_prompted(tmp_path):
    """MedLSAM: MedLAM localiser + SAM graphs in one bundle, localise-then-segment on a CT."""
    b = omedge.export("medlsam", variant="tiny", random_weights=True, formats=["onnx"], verify_size=2,
                      out=tmp_path / "medlsam")
    out = run_side(b, "from pathlib import Path\n"
                      "from omedge.medlsam_phantom import phantom, save, support_folder\n"
                      "d = Path(sys.argv[2])\n"
                      "vol, _ = phantom(shape=(40, 36, 28), seed=5)\n"
                      "q = save(d / 'q.nii.gz', vol.data, vol.affine)\n"
                      "r = p.segment_volume(q, support_folder(d / 'support'), classes=[1])\n"
                      "result = [list(r.labels.shape), sorted(r.boxes), r.slices > 0]", tmp_path)
    assert out["result"] == [[40, 36, 28], [1], True] and out["describe"]["kind"] == "volume-prompted"
    assert set(out["describe"]["graphs"]) == {"localiser", "encoder", "decoder"}


def test_prompted_classification(tmp_path):
    """CITE with its text tower: new class names are embedded on the run side (tokenizers + the
    text graph), never transformers."""
    from tests.cite_data import write_bert_folder
    bert = write_bert_folder(tmp_path / "bert")
    b = omedge.export("cite", variant="tiny", random_weights=True, text_encoder=str(bert), with_text_encoder=True,
                      verify_size=3, out=tmp_path / "cite")
    out = run_side(b, "img = np.full((300, 260, 3), 120, np.uint8)\n"
                      "r = p.predict(img, return_dict=True, classes=['gastric mucosa', 'signet ring cell carcinoma'])\n"
                      "result = [list(r['probabilities'].shape), r['labels'], list(p.predict(img).shape)]")
    assert out["result"] == [[1, 2], out["result"][1], [1, 3]] and out["describe"]["kind"] == "prompted-classification"
    assert out["result"][1][0] in ("gastric mucosa", "signet ring cell carcinoma")


def test_grounded_detection(tmp_path):
    """MIU-VL (GLIP-T layout, tiny): the caption is tokenised, the boxes decoded, scored and
    suppressed in numpy on the run side."""
    from tests.miuvl_data import write_bert_folder
    bert = write_bert_folder(tmp_path / "bert")
    b = omedge.export("miu-vl", variant="tiny", random_weights=True, text_encoder=str(bert),
                      image_size=(256, 320), formats=["onnx"], verify_size=2, out=tmp_path / "miu-vl")
    out = run_side(b, "img = np.full((240, 300, 3), 90, np.uint8)\n"
                      "dets = p.detect(img, 'pink round polyp in rectum', phrases=['polyp'], score_threshold=0.0)\n"
                      "result = [len(dets) <= 100, sorted({d['phrase'] for d in dets}), "
                      "all(0 <= d['box'][0] <= d['box'][2] <= 300 for d in dets)]")
    assert out["result"][0] and out["result"][2] and out["result"][1] in ([], ["polyp"])
    assert out["describe"]["kind"] == "grounded-detection"


def test_image(tmp_path):
    b = omedge.export("brow", variant="tiny", random_weights=True, out=tmp_path / "brow")
    out = run_side(b, "result = p.predict(np.full((256, 256, 3), 120, np.uint8)).shape")
    assert out["result"] == [1, 64] and out["describe"]["kind"] == "image"


def test_video(tmp_path):
    b = omedge.export("endo-fm", variant="tiny", random_weights=True, frames=2, out=tmp_path / "endo")
    out = run_side(b, "result = p.predict(np.zeros((2, 240, 320, 3), np.uint8)).shape")
    assert out["result"][0] == 1 and out["describe"]["kind"] == "video"


def test_volume(tmp_path):
    import nibabel as nib
    from omedge.runtime.volume import synthetic_ct
    b = omedge.export("mis-fm", variant="tiny", random_weights=True, formats=["onnx"], out=tmp_path / "misfm")
    ct = synthetic_ct(shape=(48, 48, 32), seed=4)
    nib.save(nib.Nifti1Image(ct.data, ct.affine), tmp_path / "ct.nii.gz")
    out = run_side(b, "labels, vol = p.segment(sys.argv[2]); result = list(labels.shape)", tmp_path / "ct.nii.gz")
    assert out["result"] == [48, 48, 32] and out["describe"]["kind"] == "volume"


def test_sequence(tmp_path):
    from tests.models.test_prime import synth_official
    torch.save(synth_official("lm", seed=1), tmp_path / "prime.pt")
    b = omedge.export("prime", tmp_path / "prime.pt", out=tmp_path / "prime")
    out = run_side(b, "result = p.score('MKTAYIAKQRQISFVKSHFSRQ', ['K2A', 'T3G:A4W', 'wt'])")
    scores = {r["mutant"]: r["score"] for r in out["result"]}
    assert scores["wt"] == 0.0 and len(scores) == 3 and out["describe"]["kind"] == "sequence"


def test_text_generation(tmp_path):
    pytest.importorskip("llama_cpp")
    from tests.pulse_folders import tiny_bloom
    b = omedge.export("pulse", tiny_bloom(tmp_path / "PULSE-7bv5-tiny"), precision="int8", out=tmp_path / "pulse")
    out = run_side(b, "result = p.generate('What is a fever?', max_tokens=4)")
    assert isinstance(out["result"], str) and out["describe"]["kind"] == "text-generation"
    assert out["describe"]["backend"] == "llama.cpp"


def test_load_rejects_what_an_llm_bundle_cannot_honour(tmp_path):
    """Every load() argument is honoured or rejected with its name, LLM bundles included."""
    pytest.importorskip("llama_cpp")
    from omedge.errors import OmedgeError
    from tests.pulse_folders import tiny_bloom
    b = omedge.export("pulse-7b", tiny_bloom(tmp_path / "PULSE-7bv5-tiny"), quant="Q8_0", out=tmp_path / "pulse")
    for kwargs, named in (({"backend": "openvino"}, "openvino"), ({"device": "npu"}, "npu"),
                          ({"mode": "throughput"}, "throughput"), ({"artifact": "nope"}, "nope")):
        with pytest.raises(OmedgeError, match=named):
            omedge.load(b, **kwargs)
    assert omedge.load(b, backend="llama.cpp", device="cpu", threads=1).describe()["threads"] == 1
