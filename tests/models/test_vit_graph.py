"""Issue #16 / #14: the SAM image-encoder attention exports as a static, rank <= 4
graph (only the batch left to the runtime) and still computes the official forward.

The references below are the official formulations, written out here: timm's fused
`qkv` split (b, n, 3, heads, dh) and segment_anything's window_partition /
add_decomposed_rel_pos (5-D bias add). They read the same parameters as the modules."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from omedge.exporters.onnx import export_onnx
from omedge.models.layers.sam import ImageEncoderViT, _rel_index


def sam_attention(attn, x):
    """segment_anything image_encoder.Attention (use_rel_pos) on (b, h, w, c)."""
    b, h, w, _ = x.shape
    heads = attn.heads
    qkv = attn.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4).reshape(3, b * heads, h * w, -1)
    q, k, v = qkv.unbind(0)
    a = (q * attn.scale) @ k.transpose(-2, -1)
    rh, rw = attn.rel_pos_h[_rel_index(h, h)], attn.rel_pos_w[_rel_index(w, w)]
    r_q = q.reshape(b * heads, h, w, -1)
    rel_h, rel_w = torch.einsum("bhwc,hkc->bhwk", r_q, rh), torch.einsum("bhwc,wkc->bhwk", r_q, rw)
    a = (a.view(b * heads, h, w, h, w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).view(b * heads, h * w, -1)
    out = (a.softmax(-1) @ v).view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return attn.proj(out)


def sam_encoder(enc: ImageEncoderViT, x):
    """ImageEncoderViT.forward with window_partition / window_unpartition as published."""
    x = enc.patch_embed.proj(x).permute(0, 2, 3, 1) + enc.pos_embed
    for blk in enc.blocks:
        shortcut, y = x, blk.norm1(x)
        if blk.window:
            b, h, w, c = y.shape
            ws = blk.window
            ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
            y = F.pad(y, (0, 0, 0, pw, 0, ph))
            hp, wp = h + ph, w + pw
            y = y.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)
            y = sam_attention(blk.attn, y)
            y = y.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)[:, :h, :w]
        else:
            y = sam_attention(blk.attn, y)
        x = shortcut + y
        x = x + blk.mlp(blk.norm2(x))
    return enc.neck(x.permute(0, 3, 1, 2))


def randomise(module, seed=0):
    """Every parameter random (LayerNorm gains around 1), so no term can hide behind a zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 16
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5 + (1.0 if "norm" in name and
                                                                            name.endswith("weight") else 0.0))
    return module.eval()


def graph_facts(path) -> dict:
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                       for o in n.output}
    reshapes = [n for n in graph.node if n.op_type == "Reshape"]
    return {"reshapes": len(reshapes), "dynamic_reshapes": [n.name for n in reshapes if n.input[1] not in constants],
            "shapes": sum(n.op_type == "Shape" for n in graph.node),
            "max_rank": max(len(v.type.tensor_type.shape.dim) for v in graph.value_info),
            "einsums": sum(n.op_type == "Einsum" for n in graph.node)}


@pytest.mark.parametrize("img_size, window, heads", [(128, 3, 2), (224, 7, 4)])  # grid 8 padded to 9; 14 = 2x7
def test_sam_encoder_equals_official_window_and_rel_pos(img_size, window, heads):
    enc = randomise(ImageEncoderViT(img_size, 16, 32, 4, heads, 4.0, 16, window, (1, 3)), seed=2)
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), sam_encoder(enc, x), rtol=1e-4, atol=1e-4)


def test_sam_encoder_graph_is_static_rank4(tmp_path):
    """The SAM encoder graph (tiny, windows padded): constant reshapes, no Shape node, no
    Einsum, nothing above rank 4 (the official partition is 6-D, its bias add 5-D)."""
    enc = randomise(ImageEncoderViT(128, 16, 32, 4, 2, 4.0, 16, 3, (1, 3)), seed=3)
    io = ([{"name": "pixel_values", "dynamic": {"0": "batch"}}], [{"name": "image_embeddings",
                                                                    "dynamic": {"0": "batch"}}])

    class Named(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = enc

        def forward(self, x):
            return {"image_embeddings": self.enc(x)}
    path = tmp_path / "enc.onnx"
    export_onnx(Named(), torch.randn(1, 3, 128, 128), path, *io)
    facts = graph_facts(path)
    assert facts["reshapes"] >= 16 and facts["dynamic_reshapes"] == []
    assert facts["shapes"] == 0 and facts["einsums"] == 0 and facts["max_rank"] <= 4
    x = torch.randn(2, 3, 128, 128)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got[0], sam_encoder(enc, x).numpy(), rtol=1e-4, atol=1e-4)
