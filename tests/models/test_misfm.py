"""MIS-FM FMUNet: PyMIC checkpoint dicts load strictly and safely; the network matches
a functional re-implementation (own trilinear interpolation) of PyMIC's FMUNetV3;
the full size has the published parameter count; ONNX export keeps D, H, W dynamic."""
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from omedge import models
from omedge.errors import CheckpointError, InputError
from omedge.exporters.onnx import export_onnx
from omedge.models import misfm
from tests.conftest import spec_io  # noqa: E402

SPEC = misfm.SPECS[0]
VOLUME = (1, 1, 32, 32, 48)  # divisible by 16; bottleneck 2x2x3 (InstanceNorm needs > 1 voxel)


def tiny_state_dict(seed=0, num_classes=misfm.PRETEXT_CLASSES) -> dict:
    """Random tiny weights; conv weights ~ 1/sqrt(fan_in), norms around (1, 0)."""
    sd = misfm.build("tiny", num_classes=num_classes).state_dict()
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * (v[0].numel() ** -0.5 if v.dim() == 5 else 0.1)
            + (1.0 if v.dim() == 1 and k.endswith(".weight") else 0.0) for k, v in sd.items()}


def pymic_dict(sd: dict, best: bool = False) -> dict:
    """PyMIC SegmentationAgent's save_dict: iteration, model_state_dict, a real Adam
    optimizer state, and (for *_best.pt) valid_pred, a numpy float64 dice."""
    params = [torch.nn.Parameter(v.clone()) for v in sd.values()]
    opt = torch.optim.Adam(params, lr=1e-3, weight_decay=1e-5)
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    out = {"iteration": 6000, "model_state_dict": sd, "optimizer_state_dict": opt.state_dict()}
    if best:
        out["valid_pred"] = np.float64(0.91)
    return out


def test_pretraining_file_loads_with_volume_fusion_head(tmp_path):
    sd = tiny_state_dict()
    torch.save(pymic_dict(sd), tmp_path / "fmunet_abk1k_volf.pt")
    model, variant, options = models.load(SPEC, tmp_path / "fmunet_abk1k_volf.pt")
    assert (variant, options) == ("tiny", {"num_classes": 5, "in_channels": 1})
    for key in ("project.weight", "encoder.en_conv2.conv_list.1.3.weight", "decoder.upcat0.up.2.weight",
                "decoder.de_conv4.conv_list.0.0.bias", "out_layers.0.2.weight", "out_layers.3.2.bias"):
        assert torch.equal(model.state_dict()[key], sd[key])
    with torch.no_grad():
        assert model(torch.randn(VOLUME))["logits"].shape == (1, 5, *VOLUME[2:])


def test_finetuned_best_file_defines_classes_and_prefix_is_stripped(tmp_path):
    sd = tiny_state_dict(seed=1, num_classes=2)
    torch.save(pymic_dict({f"module.{k}": v for k, v in sd.items()}, best=True), tmp_path / "fmunet_best.pt")
    model, variant, options = models.load(SPEC, tmp_path / "fmunet_best.pt")
    assert (variant, options) == ("tiny", {"num_classes": 2, "in_channels": 1})
    assert torch.equal(model.out_layers[0][2].weight, sd["out_layers.0.2.weight"])


def test_wrong_variant_wrong_model_and_missing_keys(tmp_path):
    sd = tiny_state_dict()
    torch.save(pymic_dict(sd), tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError, match="is mis-fm variant 'tiny', not 'base'"):
        models.load(SPEC, tmp_path / "tiny.pt", variant="base")

    from omedge.models import stunet
    torch.save({"state_dict": stunet.build("tiny", num_classes=3).state_dict(), "epoch": 1}, tmp_path / "stu.model")
    with pytest.raises(CheckpointError, match="not an FMUNet"):
        models.load(SPEC, tmp_path / "stu.model")

    del sd["decoder.upcat1.conv.2.weight"]
    torch.save(pymic_dict(sd), tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="missing keys.*decoder.upcat1.conv.2.weight"):
        models.load(SPEC, tmp_path / "partial.pt")


def test_full_size_parameter_count_and_structure():
    with torch.device("meta"):
        model = SPEC.build("base")
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - 47.3e6) / 47.3e6 < 0.01, total
    assert model.project.weight.shape == (32, 1, 3, 3, 3)
    assert model.encoder.down3.down[2].weight.shape == (512, 256, 3, 3, 3)
    assert model.encoder.down3.down[2].stride == (2, 2, 2)
    assert model.decoder.upcat3.up[2].weight.shape == (256, 512, 1, 1, 1)
    assert model.decoder.upcat3.conv[2].weight.shape == (256, 512, 3, 3, 3)
    assert model.out_layers[3][2].weight.shape == (5, 256, 3, 3, 3)
    assert len(model.encoder.en_conv4.conv_list) == 2


def test_input_must_be_divisible():
    model = misfm.build("tiny").eval()
    with pytest.raises(InputError, match=r"divisible by 16, got \(32, 32, 40\)"):
        model(torch.zeros(1, 1, 32, 32, 40))


# ---- independent functional forward, written from PyMIC's FMUNetV3 semantics --------------

def _instance_norm(x, weight, bias, eps=1e-5):
    dims = tuple(range(2, x.dim()))
    mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.view(1, -1, 1, 1, 1) + bias.view(1, -1, 1, 1, 1)


def _norm_act(sd, prefix, x):  # Sequential index 0: InstanceNorm3d, 1: LeakyReLU(0.01)
    y = _instance_norm(x, sd[f"{prefix}.0.weight"], sd[f"{prefix}.0.bias"])
    return torch.where(y > 0, y, 0.01 * y)


def _conv(sd, name, x, stride=1):
    w = sd[f"{name}.weight"]
    return F.conv3d(x, w, sd[f"{name}.bias"], stride=stride, padding=w.shape[-1] // 2)


def _upsample2_align_corners(x):
    """Trilinear x2 with align_corners=True, as one linear map per axis."""
    for axis in (2, 3, 4):
        n = x.shape[axis]
        src = torch.arange(2 * n, dtype=torch.float64) * ((n - 1) / (2 * n - 1))
        lo = src.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        frac = (src - lo).float()
        m = torch.zeros(2 * n, n)
        m[torch.arange(2 * n), lo] += 1 - frac
        m[torch.arange(2 * n), hi] += frac
        x = torch.movedim(torch.movedim(x, axis, -1) @ m.T, -1, axis)
    return x


def _res(sd, prefix, x):
    i = 0
    while f"{prefix}.conv_list.{i}.0.weight" in sd:  # pre-activation: x + conv(drop(act(norm(x))))
        x = x + _conv(sd, f"{prefix}.conv_list.{i}.3", _norm_act(sd, f"{prefix}.conv_list.{i}", x))
        i += 1
    return x


def _reference_forward(sd, x):
    feats = [_res(sd, "encoder.en_conv0", _conv(sd, "project", x))]
    for i in range(4):
        down = _conv(sd, f"encoder.down{i}.down.2", _norm_act(sd, f"encoder.down{i}.down", feats[-1]), stride=2)
        feats.append(_res(sd, f"encoder.en_conv{i + 1}", down))
    y = _res(sd, "decoder.de_conv4", feats[4])
    for i in (3, 2, 1, 0):
        p = f"decoder.upcat{i}"
        up = _upsample2_align_corners(_conv(sd, f"{p}.up.2", _norm_act(sd, f"{p}.up", y)))
        y = _conv(sd, f"{p}.conv.2", _norm_act(sd, f"{p}.conv", torch.cat([feats[i], up], dim=1)))  # skip first
        y = _res(sd, f"decoder.de_conv{i}", y)
    return _conv(sd, "out_layers.0.2", _norm_act(sd, "out_layers.0", y))


def test_upsample_reference_is_torch_trilinear_align_corners():
    x = torch.randn(1, 2, 2, 3, 4)
    torch.testing.assert_close(_upsample2_align_corners(x),
                               F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True))


def test_forward_matches_functional_reference_and_keeps_size():
    sd = tiny_state_dict(seed=2)
    model = misfm.build("tiny").eval()
    model.load_state_dict(sd, strict=True)
    x = torch.randn(VOLUME)
    with torch.no_grad():
        out = model(x)["logits"]
        expected = _reference_forward(sd, x)
    assert out.shape == (1, 5, *VOLUME[2:])
    worst = float((out - expected).abs().max())
    assert worst <= 5e-5 * float(expected.abs().max()), worst


def test_onnx_export_with_dynamic_spatial_axes(tmp_path):
    import onnxruntime as ort
    model = misfm.build("tiny").eval()
    model.load_state_dict(tiny_state_dict(seed=3), strict=True)

    path = tmp_path / "fmunet.onnx"
    export_onnx(model, torch.randn(VOLUME), path, *spec_io(SPEC, ["logits"]))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in (VOLUME, (2, 1, 48, 32, 32)):
        x = torch.randn(shape)
        got = session.run(None, {SPEC.inputs[0].name: x.numpy()})[0]
        with torch.no_grad():
            expected = model(x)["logits"].numpy()
        assert got.shape == (shape[0], 5, *shape[2:])
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
