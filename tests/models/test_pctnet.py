"""MIS-FM PCT-Net: PyMIC checkpoint dicts load strictly; the full size has the published
parameter count; the input size is fixed at construction, so ONNX keeps D, H, W static
and only the batch dynamic; an FMUNet file is refused with a pointer to 'mis-fm'."""
import itertools

import numpy as np
import pytest
import torch

from omedge import models
from omedge.errors import CheckpointError, InputError
from omedge.models import misfm, pctnet
from omedge.models.layers import swin3d
from tests.conftest import spec_io  # noqa: E402

SPEC = pctnet.SPECS[0]
VOLUME = (1, 1, *pctnet.PCT_INPUT_SIZE)  # the only accepted spatial size


def tiny_state_dict(seed=0, num_classes=misfm.PRETEXT_CLASSES, resolution_mode=pctnet.PCT_MODE) -> dict:
    """Random tiny weights at a sane scale: conv/linear ~ 1/sqrt(fan_in), norms around
    (1, 0), positive running variances; the integer position index is kept as built."""
    sd = pctnet.build_pctnet("tiny", num_classes=num_classes, resolution_mode=resolution_mode).state_dict()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        r = torch.randn(v.shape, generator=gen)
        if v.dim() >= 2 and "relative_position_bias_table" not in k:
            out[k] = r * v[0].numel() ** -0.5
        elif k.endswith("running_var"):
            out[k] = 1.0 + 0.1 * r.abs()
        elif k.endswith(".weight") and v.dim() == 1 and v.numel() > 1 or k.endswith("norm_layer.weight"):
            out[k] = 1.0 + 0.1 * r  # BatchNorm / LayerNorm scales
        else:  # biases, running means, PReLU slopes, bias tables
            out[k] = 0.05 * r + (0.25 if v.numel() == 1 else 0.0)
    return out


def pymic_dict(sd: dict) -> dict:
    """PyMIC SegmentationAgent's save_dict with a real Adam optimizer state."""
    params = [torch.nn.Parameter(v.clone()) for v in sd.values() if v.is_floating_point()]
    opt = torch.optim.Adam(params, lr=1e-3)
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    return {"iteration": 6000, "model_state_dict": sd, "optimizer_state_dict": opt.state_dict()}


def loaded_tiny(seed=0, num_classes=misfm.PRETEXT_CLASSES):
    model = pctnet.build_pctnet("tiny", num_classes=num_classes).eval()
    model.load_state_dict(tiny_state_dict(seed, num_classes), strict=True)
    return model


def test_full_size_parameter_count_and_structure():
    with torch.device("meta"):
        model = SPEC.build("base")
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - 45.3e6) / 45.3e6 < 0.005, total
    sd = model.state_dict()
    assert sd["embeddings.1.proj.weight"].shape == (24, 1, 1, 3, 3)  # mode 1: in-plane full-res convs
    assert sd["embeddings.0.proj.weight"].shape == (24, 1, 3, 3, 3)
    assert sd["pyramid_ct.up4.up.2.weight"].shape == (512, 256, 2, 2, 2)  # ConvTranspose3d (in, out, k)
    assert sd["pred_heads.1.up1.up.2.weight"].shape == (48, 24, 1, 2, 2)
    blk = "pyramid_ct.convtrans_e4.trans.blocks.1.attn"
    assert sd[f"{blk}.relative_position_bias_table"].shape == (11 ** 3, 16)  # window 6, 16 heads
    assert sd[f"{blk}.relative_position_index"].shape == (216, 216)
    assert sd[f"{blk}.qkv.weight"].shape == (3 * 512, 512)
    assert sd["pyramid_ct.convtrans_e2.norm_layer.weight"].shape == (128,)
    assert sd["pyramid_ct.convtrans_d3.conv.conv_conv.6.weight"].shape == (256, 256, 3, 3, 3)
    assert sd["pred_heads.2.out_conv1.conv.2.weight"].shape == (5, 48, 1, 1, 1)
    assert len(model.pyramid_ct.convtrans_e3.trans.blocks) == 2
    assert [b.shift for b in model.pyramid_ct.convtrans_e2.trans.blocks] == [0, 3]
    assert model.pyramid_ct.convtrans_e2.trans.blocks[1].mask_s.shape == (6, 216, 216)  # 6 windows along 36


def test_relative_position_index_follows_the_official_flattening():
    """Offsets (ds, dh, dw), each + (w - 1), flattened with strides (3w - 1, 2w - 1, 1)."""
    w = 3
    attn = swin3d.WindowAttention3D(8, w, 2)
    cells = list(itertools.product(range(w), repeat=3))
    expected = [[(a[0] - b[0] + w - 1) * (3 * w - 1) + (a[1] - b[1] + w - 1) * (2 * w - 1) + (a[2] - b[2] + w - 1)
                 for b in cells] for a in cells]
    assert attn.relative_position_index.tolist() == expected


def test_per_axis_shift_masks_match_the_dense_official_mask():
    """Official SW-MSA mask: label 27 regions of the padded grid (bands [0, P-w), [P-w, P-s),
    [P-s, P) per axis), split into windows; -100 where labels differ. Ours must mask the
    same pairs (it adds -100 per differing axis instead of once)."""
    block = swin3d.SwinBlock3D(8, (10, 8, 14), num_heads=2, window=6, shift=3)
    assert (block.window, block.shift, block.padded) == (6, 3, (12, 12, 18))
    labels = torch.zeros(block.padded)
    bands = (slice(0, -6), slice(-6, -3), slice(-3, None))
    for i, (a, b, c) in enumerate(itertools.product(bands, bands, bands)):
        labels[a, b, c] = i
    windows = labels.reshape(2, 6, 2, 6, 3, 6).permute(0, 2, 4, 1, 3, 5).reshape(12, 216)
    dense = windows[:, :, None] != windows[:, None, :]
    ours = (block.mask_s[:, None, None] + block.mask_h[None, :, None] + block.mask_w[None, None, :]).reshape(12, 216, 216)
    assert torch.equal(ours != 0, dense)
    assert set(ours.unique().tolist()) <= {0.0, -100.0, -200.0, -300.0}


def test_pymic_file_loads_strictly_and_segments(tmp_path):
    sd = tiny_state_dict(seed=1, num_classes=2)
    torch.save(pymic_dict({f"module.{k}": v for k, v in sd.items()}), tmp_path / "pctnet_best.pt")
    model, variant, options = models.load(SPEC, tmp_path / "pctnet_best.pt")
    assert (variant, options) == ("tiny", {"num_classes": 2, "in_channels": 1})
    for key in ("embeddings.1.proj.weight", "pyramid_ct.convtrans_e3.trans.blocks.1.attn.relative_position_bias_table",
                "pyramid_ct.up3.up.0.running_var", "pred_heads.1.out_conv0.conv.2.weight"):
        assert torch.equal(model.state_dict()[key], sd[key])
    assert models.identify(torch.load(tmp_path / "pctnet_best.pt")) == [("mis-fm-pctnet", "tiny")]
    with torch.no_grad():
        out = model(torch.randn(VOLUME))["logits"]
    assert out.shape == (1, 2, *pctnet.PCT_INPUT_SIZE)
    assert torch.isfinite(out).all()


def test_resolution_mode_0_is_read_from_the_window_table(tmp_path):
    torch.save(pymic_dict(tiny_state_dict(resolution_mode=0)), tmp_path / "mode0.pt")
    model, variant, options = models.load(SPEC, tmp_path / "mode0.pt")
    assert variant == "tiny" and options["resolution_mode"] == 0 and model.resolution_mode == 0
    assert model.pyramid_ct.convtrans_e4.trans.blocks[1].window == 4  # coarsest level 4x8x8


def test_only_the_fixed_input_size_is_accepted():
    model = loaded_tiny()
    with pytest.raises(InputError, match=r"built for D, H, W = \(64, 128, 128\), got \(32, 128, 128\)"):
        model(torch.zeros(1, 1, 32, 128, 128))
    assert SPEC.inputs[0].shape == (None, 1, 64, 128, 128) and SPEC.inputs[0].dynamic == {0: "batch"}
    assert SPEC.preprocess["patch_size"] == [64, 128, 128]


def test_onnx_export_static_spatial_dynamic_batch(tmp_path):
    import onnx
    import onnxruntime as ort

    from omedge.exporters.onnx import export_onnx

    model = loaded_tiny(seed=3).eval()
    path = tmp_path / "pctnet.onnx"
    export_onnx(model, torch.randn(VOLUME), path, *spec_io(SPEC, ["logits"]))
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 1, 64, 128, 128]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, *VOLUME[1:])  # exported with batch 1
    got = session.run(None, {SPEC.inputs[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = model(x)["logits"].numpy()
    assert got.shape == (2, 5, *pctnet.PCT_INPUT_SIZE)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_fmunet_file_is_refused_and_named(tmp_path):
    fmunet = misfm.build("tiny").state_dict()
    torch.save({"iteration": 1, "model_state_dict": fmunet, "optimizer_state_dict": {}}, tmp_path / "fm.pt")
    with pytest.raises(CheckpointError, match="not a PCT-Net.*looks like a 'mis-fm' checkpoint"):
        models.load(SPEC, tmp_path / "fm.pt")
    torch.save(pymic_dict(tiny_state_dict()), tmp_path / "pct.pt")
    with pytest.raises(CheckpointError, match="not an FMUNet.*looks like a 'mis-fm-pctnet'"):
        models.load(misfm.SPECS[0], tmp_path / "pct.pt")
    sd = tiny_state_dict()
    del sd["pyramid_ct.convtrans_d2.norm_layer.bias"]
    torch.save(pymic_dict(sd), tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="missing keys.*convtrans_d2.norm_layer.bias"):
        models.load(SPEC, tmp_path / "partial.pt")
