"""SAM ViT-B at full size, once: the official 314-tensor layout (93.7 M parameters, random
fan-in-scaled values) loads strictly, exports to ONNX fp32 with the encoder static at
1024^2 and the decoder dynamic in prompts, and passes parity end to end."""
import json

import numpy as np
import pytest
import torch

import omedge
from tests.conftest import official_state_dict

pytestmark = pytest.mark.slow


def test_sam_vit_b_onnx_fp32_at_1024(tmp_path):
    sd = official_state_dict("sam", "vit_b", seed=7)
    assert len(sd) == 314
    ckpt = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(sd, ckpt)
    del sd
    b = omedge.export("sam", ckpt, formats=["onnx"], verify_size=3, out=tmp_path / "sam-b.omedge")
    m = json.loads((b / "manifest.json").read_text())
    assert m["model"]["variant"] == "vit_b" and m["model"]["parameters"] == 93_735_472
    assert m["inputs"][0]["shape"] == [1, 3, 1024, 1024] and m["preprocess"]["image_size"] == 1024
    arts = {a["role"]: a for a in m["artifacts"]}
    assert arts["encoder"]["parity"]["outputs"]["image_embeddings"]["cosine_min"] >= 0.9999
    assert arts["decoder"]["parity"]["outputs"]["low_res_masks"]["mask_iou_min"] >= 0.99
    p = omedge.load(b, backend="onnxruntime")
    emb = p.embed(np.full((480, 640, 3), 128, np.uint8))
    assert emb.image_embeddings.shape == (1, 256, 64, 64) and emb.resized_size == (768, 1024)
    masks, scores = p.segment(emb, boxes=[[100, 80, 400, 300]])
    assert masks.shape == (1, 480, 640) and np.isfinite(scores).all()
