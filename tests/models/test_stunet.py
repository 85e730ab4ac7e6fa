"""STU-Net: the nnU-Net v1 / v2 checkpoint layouts load strictly and safely; the network
matches a functional re-implementation written from the official block semantics;
full sizes have the published parameter counts; ONNX export keeps D, H, W dynamic."""
import zipfile

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from omedge import models
from omedge.errors import CheckpointError, InputError
from omedge.exporters.onnx import export_onnx
from omedge.models import stunet
from tests.conftest import spec_io  # noqa: E402

SPEC = stunet.SPECS[0]
CLASSES = 3
VOLUME = (1, 1, 32, 32, 64)  # divisible by (16, 16, 32); bottleneck 2x2x2 (InstanceNorm needs > 1 voxel)


def tiny_state_dict(seed=0, num_classes=CLASSES) -> dict:
    """Random tiny weights, norms included (the init's ones/zeros would hide affine bugs)."""
    sd = stunet.build("tiny", num_classes=num_classes).state_dict()
    gen = torch.Generator().manual_seed(seed)

    def scale(k, v):  # conv weights ~ 1/sqrt(fan_in) keep activations O(1)
        return (v[0].numel() ** -0.5) if v.dim() == 5 else 0.1

    return {k: torch.randn(v.shape, generator=gen) * scale(k, v)
            + (1.0 if "norm" in k and k.endswith(".weight") else 0.0) for k, v in sd.items()}


def sgd_state(sd: dict) -> dict:
    """A real SGD (momentum 0.99, nesterov) state_dict, as STUNetTrainer's optimizer saves it."""
    params = [torch.nn.Parameter(v.clone()) for v in sd.values()]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    for p in params:
        p.grad = torch.ones_like(p) * 1e-3
    opt.step()
    return opt.state_dict()


def nnunet_v1_dict(sd: dict) -> dict:
    """`{small,base,large,huge}_ep4k.model` as nnU-Net v1's save_checkpoint writes it:
    numpy float64 scalars in plot_stuff / best_stuff, no lr scheduler, a GradScaler state."""
    losses = [np.float64(-0.5 - 0.01 * i) for i in range(4)]
    return {"epoch": 4000, "state_dict": sd, "optimizer_state_dict": sgd_state(sd),
            "lr_scheduler_state_dict": None,
            "plot_stuff": (losses, losses[::-1], [], [np.float64(0.8), np.float64(0.81)]),
            "best_stuff": (3999, np.float64(-0.55), np.float64(0.81)),
            "amp_grad_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                "growth_interval": 2000, "_growth_tracker": 12}}


def nnunet_v2_dict(sd: dict) -> dict:
    """An nnU-Net v2 fine-tuning checkpoint (`checkpoint_final.pth`)."""
    return {"network_weights": sd, "optimizer_state": sgd_state(sd), "grad_scaler_state": None,
            "logging": {"mean_fg_dice": [np.float64(0.7)], "ema_fg_dice": [np.float64(0.7)],
                        "train_losses": [-0.4], "epoch_start_timestamps": [1.7e9]},
            "_best_ema": np.float64(0.7), "current_epoch": 1000,
            "init_args": {"plans": {"plans_name": "nnUNetPlans"}, "configuration": "3d_fullres", "fold": 0,
                          "dataset_json": {"labels": {"background": 0}}, "unpack_dataset": True,
                          "device": torch.device("cpu")},
            "trainer_name": "STUNetTrainer_base_ft", "inference_allowed_mirroring_axes": (0, 1, 2)}


def _assert_loaded(model, sd):
    for key in ("conv_blocks_context.0.0.conv3.weight", "conv_blocks_localization.4.1.norm2.bias",
                "upsample_layers.0.conv.weight", "seg_outputs.4.weight"):
        assert torch.equal(model.state_dict()[key], sd[key])


def test_nnunet_v1_model_file_loads_without_trust(tmp_path):
    sd = tiny_state_dict()
    torch.save(nnunet_v1_dict(sd), tmp_path / "base_ep4k.model")
    model, variant, options = models.load(SPEC, tmp_path / "base_ep4k.model")
    assert (variant, options) == ("tiny", {"num_classes": CLASSES, "in_channels": 1})
    _assert_loaded(model, sd)


def _rename_numpy_module(src, dst):
    """The released files were pickled under numpy 1.x, where np.float64 is stored as
    `numpy.core.multiarray.scalar` (numpy 2 writes `numpy._core...`). torch.save uses
    pickle protocol 2, whose GLOBAL opcode is plain text, so renaming is a byte swap."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
            zout.writestr(info.filename, data)


def test_nnunet_v1_file_pickled_under_numpy1_loads_without_trust(tmp_path):
    sd = tiny_state_dict()
    torch.save(nnunet_v1_dict(sd), tmp_path / "numpy2.model")
    _rename_numpy_module(tmp_path / "numpy2.model", tmp_path / "small_ep4k.model")
    with zipfile.ZipFile(tmp_path / "small_ep4k.model") as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"numpy.core.multiarray\nscalar" in pkl and b"numpy._core" not in pkl
    model, variant, _ = models.load(SPEC, tmp_path / "small_ep4k.model")
    assert variant == "tiny"
    _assert_loaded(model, sd)


def test_dataparallel_prefix_and_v2_network_weights(tmp_path):
    sd = tiny_state_dict(seed=1, num_classes=5)
    torch.save(nnunet_v1_dict({f"module.{k}": v for k, v in sd.items()}), tmp_path / "ddp.model")
    model, _, options = models.load(SPEC, tmp_path / "ddp.model")
    assert options["num_classes"] == 5
    _assert_loaded(model, sd)

    torch.save(nnunet_v2_dict(sd), tmp_path / "checkpoint_final.pth")
    model, variant, options = models.load(SPEC, tmp_path / "checkpoint_final.pth")
    assert (variant, options) == ("tiny", {"num_classes": 5, "in_channels": 1})
    _assert_loaded(model, sd)


def test_wrong_variant_wrong_model_and_missing_keys(tmp_path):
    sd = tiny_state_dict()
    torch.save(nnunet_v1_dict(sd), tmp_path / "tiny.model")
    with pytest.raises(CheckpointError, match="is stu-net variant 'tiny', not 'S'"):
        models.load(SPEC, tmp_path / "tiny.model", variant="S")

    from omedge.models import misfm
    torch.save({"iteration": 1, "model_state_dict": misfm.build("tiny").state_dict()}, tmp_path / "fmunet.pt")
    with pytest.raises(CheckpointError, match="not an STU-Net checkpoint"):
        models.load(SPEC, tmp_path / "fmunet.pt")

    del sd["conv_blocks_localization.2.0.conv3.weight"]
    torch.save(nnunet_v1_dict(sd), tmp_path / "partial.model")
    with pytest.raises(CheckpointError, match="missing keys.*conv_blocks_localization.2.0.conv3.weight"):
        models.load(SPEC, tmp_path / "partial.model")


def test_full_size_parameter_counts_and_structure():
    published = {"S": 14.6e6, "B": 58.3e6, "L": 440e6, "H": 1.46e9}
    for variant, count in published.items():
        with torch.device("meta"):
            model = SPEC.build(variant)
        total = sum(p.numel() for p in model.parameters())
        assert abs(total - count) / count < 0.01, (variant, total)
    # H: base 96, 3 blocks; only the first block of a stage projects the shortcut
    assert model.seg_outputs[4].weight.shape == (105, 96, 1, 1, 1)
    assert model.conv_blocks_context[5][0].conv1.weight.shape == (1536, 1536, 3, 3, 3)
    assert model.conv_blocks_context[0][0].conv3 is not None and model.conv_blocks_context[0][2].conv3 is None
    assert model.conv_blocks_context[0][0].conv1.stride == (1, 1, 1)
    assert model.conv_blocks_context[5][0].conv1.stride == (1, 1, 2)
    assert model.divisible_by == (16, 16, 32) and SPEC.preprocess["divisible_by"] == [16, 16, 32]


def test_labels_follow_label_orders_json():
    labels = SPEC.labels
    assert len(labels) == 105 and labels[0] == "background" and labels[1:] == sorted(labels[1:])
    assert (labels[49], labels[50], labels[53]) == ("rib_left_1", "rib_left_10", "rib_left_2")
    assert (labels[73], labels[81], labels[88], labels[93], labels[104]) == \
        ("sacrum", "vertebrae_C1", "vertebrae_L1", "vertebrae_T1", "vertebrae_T9")


# ---- independent functional forward, written from the official semantics -----------------

def assert_close_to_scale(got, expected, rel=5e-5):
    """Float32 sums in another order drift by ~1e-5 of the logits' range over ~40 convs;
    a wiring error moves them by O(range)."""
    worst = float((got - expected).abs().max())
    assert got.shape == expected.shape and worst <= rel * float(expected.abs().max()), worst


def _instance_norm(x, weight, bias, eps=1e-5):
    dims = tuple(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.view(1, -1, 1, 1, 1) + bias.view(1, -1, 1, 1, 1)


def _leaky(x):
    return torch.where(x > 0, x, 0.01 * x)


def _conv(sd, name, x, stride=1):
    w = sd[f"{name}.weight"]
    return F.conv3d(x, w, sd[f"{name}.bias"], stride=stride, padding=w.shape[-1] // 2)


def _block(sd, p, x, stride=1):
    """conv1 -> IN -> LReLU -> conv2 -> IN, + (1x1 strided conv3 | identity), -> LReLU."""
    y = _leaky(_instance_norm(_conv(sd, f"{p}.conv1", x, stride), sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"]))
    y = _instance_norm(_conv(sd, f"{p}.conv2", y), sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"])
    shortcut = _conv(sd, f"{p}.conv3", x, stride) if f"{p}.conv3.weight" in sd else x
    return _leaky(y + shortcut)


def _stage(sd, prefix, x, stride=1):
    i = 0
    while f"{prefix}.{i}.conv1.weight" in sd:
        x = _block(sd, f"{prefix}.{i}", x, stride if i == 0 else 1)
        i += 1
    return x


def _reference_forward(sd, x, strides=stunet.TOTALSEG_STRIDES):
    skips = []
    for d in range(6):
        x = _stage(sd, f"conv_blocks_context.{d}", x, strides[d - 1] if d else 1)
        skips.append(x)
    x = skips.pop()
    for u in range(5):
        for axis, factor in zip((2, 3, 4), strides[-1 - u]):  # nearest = repeat each voxel
            x = x.repeat_interleave(factor, dim=axis)
        x = _conv(sd, f"upsample_layers.{u}.conv", x)
        x = _stage(sd, f"conv_blocks_localization.{u}", torch.cat([x, skips.pop()], dim=1))
    return _conv(sd, "seg_outputs.4", x)


def test_block_semantics_match_functional_reference():
    torch.manual_seed(0)
    for stride, project in (((1, 1, 1), True), ((2, 2, 2), True), ((1, 1, 2), True), ((1, 1, 1), False)):
        block = stunet.BasicResBlock(3 if project else 5, 5, stride, project).eval()
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0.5, 0.3)
        sd = {f"block.{k}": v for k, v in block.state_dict().items()}
        x = torch.randn(2, block.conv1.in_channels, 8, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(block(x), _block(sd, "block", x, stride), atol=1e-5, rtol=1e-5)


def test_forward_matches_functional_reference_and_keeps_size():
    sd = tiny_state_dict(seed=2)
    model = stunet.build("tiny", num_classes=CLASSES).eval()
    model.load_state_dict(sd, strict=True)
    x = torch.randn(VOLUME)
    with torch.no_grad():
        out = model(x)["logits"]
        expected = _reference_forward(sd, x)
    assert out.shape == (1, CLASSES, *VOLUME[2:])
    assert_close_to_scale(out, expected)


def test_input_must_be_divisible():
    model = stunet.build("tiny", num_classes=CLASSES).eval()
    with pytest.raises(InputError, match=r"divisible by \(16, 16, 32\), got \(32, 32, 48\)"):
        model(torch.zeros(1, 1, 32, 32, 48))


def test_strides_option_loads_same_file(tmp_path):
    """A v2 fine-tuning plan may use other strides: same parameters, other geometry."""
    sd = tiny_state_dict(seed=3)
    torch.save({"network_weights": sd}, tmp_path / "ft.pth")
    model, _, _ = models.load(SPEC, tmp_path / "ft.pth", strides=[[2, 2, 2]] * 5)
    assert model.divisible_by == (32, 32, 32)
    x = torch.randn(1, 1, 32, 32, 64)  # bottleneck 1x1x2
    with torch.no_grad():
        assert_close_to_scale(model(x)["logits"], _reference_forward(sd, x, [[2, 2, 2]] * 5))


def test_onnx_export_with_dynamic_spatial_axes(tmp_path):
    import onnxruntime as ort
    sd = tiny_state_dict(seed=4)
    model = stunet.build("tiny", num_classes=CLASSES).eval()
    model.load_state_dict(sd, strict=True)

    path = tmp_path / "stunet.onnx"
    export_onnx(model, torch.randn(VOLUME), path, *spec_io(SPEC, ["logits"]))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in (VOLUME, (2, 1, 48, 32, 64)):
        x = torch.randn(shape)
        got = session.run(None, {SPEC.inputs[0].name: x.numpy()})[0]
        with torch.no_grad():
            expected = model(x)["logits"].numpy()
        assert got.shape == (shape[0], CLASSES, *shape[2:])
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_per_tensor_weight_files_are_gathered_into_one(tmp_path):
    """Past 2 GB torch writes one weights file per tensor; the bundle gets one `.data`
    file with the same numbers (what STU-Net-H's export goes through)."""
    import onnx
    import onnxruntime as ort

    from omedge.exporters.onnx import gather_external_data
    model = stunet.build("tiny", num_classes=CLASSES).eval()
    model.load_state_dict(tiny_state_dict(seed=5), strict=True)
    export_onnx(model, torch.randn(VOLUME), tmp_path / "inline.onnx", *spec_io(SPEC, ["logits"]))
    torch_layout = tmp_path / "per_tensor"
    torch_layout.mkdir()
    onnx.save_model(onnx.load(str(tmp_path / "inline.onnx")), str(torch_layout / "model.onnx"),
                    save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=1024)
    assert len(list(torch_layout.iterdir())) > 20
    out = tmp_path / "gathered"
    out.mkdir()
    files = gather_external_data(torch_layout / "model.onnx", out / "model.onnx")
    assert files == [out / "model.onnx", out / "model.onnx.data"]
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data"]
    x = np.random.default_rng(1).standard_normal(VOLUME).astype(np.float32)
    expected = ort.InferenceSession(str(tmp_path / "inline.onnx")).run(None, {SPEC.inputs[0].name: x})[0]
    got = ort.InferenceSession(str(out / "model.onnx")).run(None, {SPEC.inputs[0].name: x})[0]
    np.testing.assert_array_equal(got, expected)
