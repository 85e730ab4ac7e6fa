"""MIU-VL (GLIP-T): strict loading of the official checkpoint layout, the size refusal, the
DCNv2 -> ONNX DeformConv -> OpenVINO path, and the exported graph against torch."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from omedge.errors import CheckpointError, UsageError
from omedge.models import load, miuvl
from omedge.models.layers.glip_head import ModulatedDeformConv, deform_conv2d
from tests.glip_swin_data import official_backbone_keys
from tests.miuvl_data import (
    TINY_VOCAB,
    official_keys,
    write_bert_folder,
    write_glip_checkpoint,
)

SPEC = miuvl.SPECS[0]
CANVAS = (256, 320)
N_ANCHORS = sum(-(-CANVAS[0] // s) * -(-CANVAS[1] // s) for s in (8, 16, 32, 64, 128))
DROPPED = ("language_backbone.body.model.pooler.", "language_backbone.body.model.embeddings.position_ids",
           "rpn.head.cls_logits.", "rpn.anchor_generator.")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("miuvl")
    ckpt = write_glip_checkpoint(root / "glip_tiny_model.pth", "tiny", seed=3, n_classes=80)
    bert = write_bert_folder(root / "bert-tiny")
    model, variant, _ = load(SPEC, ckpt, text_encoder=bert, image_size=CANVAS)
    return {"root": root, "ckpt": ckpt, "bert": bert, "model": model, "variant": variant}


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, 3, *CANVAS, generator=gen)
    ids = torch.zeros(1, 256, dtype=torch.long)
    ids[0, :7] = torch.tensor([2, 5, 6, 7, 11, 9, 3])  # [CLS] polyp pink round colon rectum [SEP]
    return pixels, ids, (ids != 0).long()


def test_tiny_checkpoint_loads_strictly_with_its_values(tiny):
    raw = torch.load(tiny["ckpt"], weights_only=True)
    sd = tiny["model"].state_dict()
    assert tiny["variant"] == "tiny"
    for name in ("rpn.head.dyhead_tower.2.offset.weight", "rpn.head.dyhead_tower.3.b_attn.gamma_l",
                 "language_backbone.body.model.embeddings.word_embeddings.weight", "rpn.head.bias_lang",
                 "backbone.fpn.top_blocks.p7.weight"):
        assert torch.equal(sd[name], raw["model"]["module." + name]), name
    assert not any(k.startswith(DROPPED) for k in sd)
    # MIU-VL's own files (NUM_CLASSES 2) load the same: cls_logits is dropped at any class count
    miu = write_glip_checkpoint(tiny["root"] / "miuvl_kvasir.pth", "tiny", seed=4, n_classes=1)
    assert load(SPEC, miu, text_encoder=tiny["bert"], image_size=CANVAS)[1] == "tiny"


def test_constants_are_the_anchors_and_the_vocab(tiny):
    from omedge.grounding import make_anchors
    c = tiny["model"].constants()
    assert tuple(c["anchors"].shape) == (N_ANCHORS, 4)
    np.testing.assert_array_equal(c["anchors"].numpy(), make_anchors(CANVAS))
    assert c["vocab"].dtype.kind == "U" and list(c["vocab"]) == TINY_VOCAB


def test_T_structure_and_parameter_count_on_meta():
    with torch.device("meta"):
        model = miuvl.build("T")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 231.8e6 - 1) < 0.005, n
    want = {k: shape for k, (shape, _) in official_keys("T", 80).items() if not k.startswith(DROPPED)}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == want


@pytest.mark.parametrize("embed, heads, name", [(192, (6, 12, 24, 48), "GLIP-L (Swin-L)"),
                                                (128, (4, 8, 16, 32), "GLIP-B (Swin-B)")])
def test_larger_glip_checkpoint_is_refused_by_name(tiny, embed, heads, name):
    """The real Swin-L / Swin-B layouts (depths 2,2,18,2, window 12), stored as zero-stride
    tensors so the file stays small."""
    state = torch.load(tiny["ckpt"], weights_only=True)["model"]
    state = {k: v for k, v in state.items() if not k.startswith("module.backbone.")}
    swin = official_backbone_keys(embed_dim=embed, depths=(2, 2, 18, 2), heads=heads, window=12, fpn_channels=256)
    for key, (shape, dtype) in swin.items():
        state["module.backbone." + key] = torch.zeros((), dtype=dtype).expand(shape)
    path = write_glip_checkpoint(tiny["root"] / f"glip_{embed}_model.pth", model=state)
    with pytest.raises(CheckpointError, match=re.escape(f"this is {name}, omedge deploys GLIP-T")):
        load(SPEC, path, text_encoder=tiny["bert"], image_size=CANVAS)


def test_text_encoder_folder_that_is_not_bert_is_refused(tmp_path):
    folder = write_bert_folder(tmp_path / "roberta")
    (folder / "config.json").write_text('{"model_type": "roberta"}')
    with pytest.raises(UsageError, match="not a BERT-like folder"):
        miuvl.build("tiny", text_encoder=folder)


def _official_dcn(x, weight, offset_mem, bias, mask_mem, stride, pad, ho, wo):
    """maskrcnn_benchmark's modulated_deformable_im2col + GEMM, tap by tap in plain Python.
    Like the CUDA kernel it reads the image's offset / mask memory flat, at
    ((2t + {0,1}) * ho + y) * wo + x for an output of ho x wo, whatever their shape;
    dmcn_im2col_bilinear: a corner is read only inside, a tap only if -1 < h < H, -1 < w < W."""
    x = x[0].double().numpy()
    off, m = offset_mem[0].double().numpy().ravel(), mask_mem[0].double().numpy().ravel()
    c, h, w = x.shape
    cols = np.zeros((c, 9, ho, wo))
    for oy in range(ho):
        for ox in range(wo):
            for t in range(9):
                py = oy * stride - pad + t // 3 + off[((2 * t) * ho + oy) * wo + ox]
                px = ox * stride - pad + t % 3 + off[((2 * t + 1) * ho + oy) * wo + ox]
                if not (-1 < py < h and -1 < px < w):
                    continue
                y0, x0 = int(np.floor(py)), int(np.floor(px))
                val = np.zeros(c)
                for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                    if 0 <= yy < h and 0 <= xx < w:
                        val += (1 - abs(py - yy)) * (1 - abs(px - xx)) * x[:, yy, xx]
                cols[:, t, oy, ox] = val * m[(t * ho + oy) * wo + ox]
    out = np.einsum("ckhw,ock->ohw", cols, weight.double().numpy().reshape(weight.shape[0], c, 9))
    return out + bias.double().numpy()[:, None, None]


class _Dcn(torch.nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.conv = ModulatedDeformConv(6, 5, stride)
        torch.nn.init.normal_(self.conv.bias)

    def forward(self, x, offset, mask):
        return self.conv(x, offset, mask)


@pytest.mark.parametrize("stride", [1, 2])
def test_deform_conv_torch_official_onnxruntime_openvino_agree(tmp_path, stride):
    import onnx
    import onnxruntime as ort
    import openvino as ov

    from omedge.exporters.openvino import convert
    gen = torch.Generator().manual_seed(stride)
    h, w = 9, 12
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    x = torch.randn(1, 6, h, w, generator=gen)
    offset = torch.randn(1, 18, ho, wo, generator=gen) * 3
    offset[0, :6] *= 8  # taps far outside the map, and some within one pixel of the border
    mask = torch.rand(1, 9, ho, wo, generator=gen)
    module = _Dcn(stride).eval()
    with torch.no_grad():
        ref = module(x, offset, mask).numpy()
    official = _official_dcn(x, module.conv.weight.detach(), offset, module.conv.bias.detach(), mask, stride, 1,
                             ho, wo)
    np.testing.assert_allclose(ref[0], official, atol=2e-5)
    path = tmp_path / "dcn.onnx"
    torch.onnx.export(module, (x, offset, mask), str(path), input_names=["x", "offset", "mask"],
                      output_names=["y"], opset_version=19, dynamo=False)
    assert [n.op_type for n in onnx.load(str(path)).graph.node] == ["DeformConv"]
    feed = {"x": x.numpy(), "offset": offset.numpy(), "mask": mask.numpy()}
    got_ort = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    compiled = ov.Core().compile_model(convert(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got_ov = compiled(feed)[0]
    np.testing.assert_allclose(got_ort, ref, atol=2e-5)
    np.testing.assert_allclose(got_ov, ref, atol=2e-5)
    # the (dy, dx) order matters: swapped pairs give another result
    feed["offset"] = offset.reshape(1, 9, 2, ho, wo).flip(2).reshape(1, 18, ho, wo).numpy()
    assert np.abs(compiled(feed)[0] - ref).max() > 0.05
    assert np.allclose(deform_conv2d(x, module.conv.weight, offset, module.conv.bias, mask, stride, 1).detach(), ref)


def test_coarser_level_reads_the_finer_offsets_as_the_cuda_kernel_does():
    """DyConv applies DyConv[0] to level l+1 with level l's offsets: the kernel reads that
    bigger map's memory flat with the smaller output's strides, and so does our module."""
    from omedge.models.layers.glip_head import DyConv, _fit
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    dyconv = DyConv(16).eval()
    fine, coarse = torch.randn(1, 16, 6, 7, generator=gen), torch.randn(1, 16, 3, 4, generator=gen)
    with torch.no_grad():
        om = dyconv.offset(fine)
        offset, mask = om[:, :18], om[:, 18:].sigmoid()
        conv = dyconv.DyConv[0].conv
        official = _official_dcn(coarse, conv.weight, offset, conv.bias, mask, 1, 1, 3, 4)
        ours = conv(coarse, _fit(offset, (3, 4)), _fit(mask, (3, 4)))[0].numpy()
    np.testing.assert_allclose(ours, official, atol=2e-5)


def _cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_tiny_export_onnx_and_openvino_match_torch(tiny, tmp_path):
    import onnx
    import onnxruntime as ort
    import openvino as ov

    from omedge.exporters.onnx import export_onnx
    from omedge.exporters.openvino import convert
    model = tiny["model"]
    pixels, ids, mask = _inputs()
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in model(pixels, ids, mask).items()}
    assert ref["token_logits"].shape == (1, N_ANCHORS, 256) and ref["box_regression"].shape == (1, N_ANCHORS, 4)
    path = tmp_path / "miuvl.onnx"
    export_onnx(model, (pixels, ids, mask), path, [t.to_dict() for t in SPEC.inputs],
                [t.to_dict() for t in SPEC.outputs], opset=19)
    nodes = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert nodes.count("DeformConv") == 2 * 13  # per layer: 2 + 3 + 3 + 3 + 2 over the 5 levels
    feed = {"pixel_values": pixels.numpy(), "input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got_ort = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    compiled = ov.Core().compile_model(convert(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(feed)
    got_ov = {o.get_any_name(): result[o] for o in compiled.outputs}
    for name, want in ref.items():
        assert _cosine(got_ort[name], want) > 0.9999, name
        assert _cosine(got_ov[name], want) > 0.9999, name
        np.testing.assert_allclose(got_ort[name], want, atol=1e-3)


@pytest.mark.slow
def test_T_traces_to_onnx_at_a_fixed_canvas(tmp_path):
    import onnxruntime as ort

    from omedge.exporters.onnx import export_onnx
    torch.manual_seed(0)
    model = miuvl.build("T", image_size=(256, 352)).eval()
    pixels = torch.randn(1, 3, 256, 352)
    ids = torch.zeros(1, 256, dtype=torch.long)
    ids[0, :4] = torch.tensor([101, 2000, 3000, 102])
    mask = (ids != 0).long()
    with torch.no_grad():
        ref = model(pixels, ids, mask)
    path = tmp_path / "miuvl-T.onnx"
    export_onnx(model, (pixels, ids, mask), path, [t.to_dict() for t in SPEC.inputs],
                [t.to_dict() for t in SPEC.outputs], opset=19)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = session.run(names, {"pixel_values": pixels.numpy(), "input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    for name, value in zip(names, got):
        assert _cosine(value, ref[name].numpy()) > 0.9999, name
