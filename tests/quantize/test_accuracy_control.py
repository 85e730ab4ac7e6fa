"""Accuracy-aware INT8 (issue #16): a kind that declares a quantization metric (volumes:
window Dice over decisive voxels) gets NNCF's accuracy control, and the manifest says
which layers stayed in float and what the metric was before and after; a kind without
one keeps plain post-training quantization."""
import pickle
from collections import OrderedDict

import numpy as np
import openvino as ov
import pytest
import torch

import omedge
import omedge.models as models
from omedge.errors import ExportError
from omedge.kinds import get_kind
from omedge.kinds.volume_parity import WindowDice
from omedge.exporters.openvino import WEIGHTED_OPS
from omedge.quantize.nncf_int8 import BUDGET_ENV
from omedge.runtime.volume import synthetic_ct
from tests.conftest import manifest_dict as read_manifest

CALIB = 4


@pytest.fixture(scope="module")
def stunet_small(tmp_path_factory):
    """A tiny 4-class STU-Net in the nnU-Net v1 layout, with plans beside it that give a
    32x64x64 patch at 2 mm (16x fewer voxels per window than 128^3: a fast test)."""
    spec = models.get_spec("stu-net")
    torch.manual_seed(3)
    sd = models.build(spec, "tiny", num_classes=4).state_dict()
    folder = tmp_path_factory.mktemp("stunet-ac")
    path = folder / "small_ep1k.model"
    torch.save({"epoch": 1000, "state_dict": sd, "optimizer_state_dict": {"state": {}, "param_groups": []},
                "lr_scheduler_state_dict": None, "amp_grad_scaler": {"scale": 1024.0},
                "plot_stuff": ([np.float64(0.5)], [np.float64(0.4)], [np.float64(0.8)], [np.float64(0.7)])}, path)
    stage = {"current_spacing": np.array([2.0, 2.0, 2.0]), "patch_size": np.array([32, 64, 64]),
             "pool_op_kernel_sizes": [[2, 2, 2]] * 4 + [[1, 1, 2]]}
    plans = {"plans_per_stage": {0: dict(stage), 1: stage}, "normalization_schemes": OrderedDict({0: "CT"}),
             "dataset_properties": {"intensityproperties": {0: {
                 "percentile_00_5": np.float64(-1000.0), "percentile_99_5": np.float64(1500.0),
                 "mean": np.float64(80.0), "sd": np.float64(300.0)}}}}
    with open(folder / "small_ep1k.model.pkl", "wb") as f:
        pickle.dump({"init": (), "name": "STUNetTrainer_small", "plans": plans}, f)
    return path


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, stunet_small):
    """No force: the bundle must pass its INT8 gates (window cosine, phantom Dice). The
    window target is lowered to 0.95 so that this tiny net's plain INT8 (0.96) reaches it
    without ranking its ~50 quantizer groups (80 s here; the restoring loop itself is
    tested on a small graph below)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(WindowDice, "max_drop", 0.05)
        return omedge.export("stu-net", stunet_small, formats=["openvino"], precision="int8", calib="synthetic",
                             calib_size=CALIB, labels=["bg", "liver", "kidney", "bone"],
                             out=tmp_path_factory.mktemp("ac") / "stunet-int8")


def conv_net(seed: int = 0):
    """A 3-convolution volume net built with OpenVINO's opset (fan-in-scaled random
    weights, free spatial axes): few quantizer groups, so NNCF's loop runs in seconds."""
    import openvino.opset13 as op
    rng = np.random.default_rng(seed)
    x = op.parameter([1, 1, -1, -1, -1], np.float32, name="volume")
    h = x
    for i, (cin, cout, k) in enumerate(((1, 8, 3), (8, 8, 3), (8, 4, 1))):
        w = rng.normal(0, np.sqrt(2 / (cin * k ** 3)), (cout, cin, k, k, k)).astype(np.float32)
        h = op.convolution(h, op.constant(w), [1] * 3, [k // 2] * 3, [k // 2] * 3, [1] * 3, name=f"conv{i}")
        h = op.add(h, op.constant(rng.normal(0, 0.1, (1, cout, 1, 1, 1)).astype(np.float32)))
        if i < 2:
            h = op.relu(h)
    h.output(0).get_tensor().set_names({"logits"})
    return ov.Model([op.result(h)], [x], "convnet")


def smooth_volumes(n: int, seed: int) -> list[dict]:
    from scipy.ndimage import gaussian_filter
    rng = np.random.default_rng(seed)
    return [{"volume": gaussian_filter(rng.normal(size=(16, 32, 32)), 1.5)[None, None].astype(np.float32) * 3}
            for _ in range(n)]


def test_record_lists_float_layers_and_the_metric_the_bundle_has(int8_bundle, stunet_small):
    m = read_manifest(int8_bundle)
    art = m["artifacts"][0]
    q, ac = art["quantization"], art["quantization"]["accuracy_control"]
    assert art["parity"]["passed"] and art["parity"]["volume_dice"]["min"] >= 0.95
    assert q["method"].startswith("NNCF accuracy-aware") and ac["metric"] == WindowDice.name
    assert ac["float"] == 1.0 and ac["target"] == pytest.approx(0.95) and ac["reached"] == (ac["after"] >= 0.95)
    assert ac["evaluations"] >= 2 + ac["iterations"] and ac["validation_windows"] == CALIB
    # the float layers are read back from the saved IR: convolutions not fed by a FakeQuantize
    ir = ov.Core().read_model(int8_bundle / art["entry"])
    convs = {n.get_friendly_name(): n.input_value(0).get_node().get_type_name()
             for n in ir.get_ordered_ops() if n.get_type_name() in WEIGHTED_OPS}
    assert set(q["float_layers"]) == {k for k, v in convs.items() if v != "FakeQuantize"}
    assert len(q["float_layers"]) < len(convs)  # most of the net is INT8
    if ac["iterations"]:
        assert q["float_layers"]
    # the recorded metric, recomputed from the bundle on the same calibration windows against
    # the torch fp32 model's labels (the export labelled them with OpenVINO fp32)
    pre = m["preprocess"]
    calib = get_kind("volume").synthetic_samples(CALIB, 1, pre, "volume")  # export seed 0 -> calibration seed 1
    metric = WindowDice()
    feeds = metric.validation_feeds(calib, [None] * 5)
    model = models.load(models.get_spec("stu-net"), stunet_small)[0]
    with torch.no_grad():
        refs = [metric.reference(model(torch.from_numpy(f["volume"]))["logits"].numpy()) for f in feeds]
    p = omedge.load(int8_bundle)
    value, per_window = metric.score(refs, [p.run(f, batch_size=1)["logits"] for f in feeds])
    assert len(per_window) == CALIB
    assert value == pytest.approx(ac["after"], abs=5e-3)
    labels, vol = p.segment(synthetic_ct((60, 56, 40), seed=8))
    assert labels.shape == vol.data.shape and set(np.unique(labels)) <= {0, 1, 2, 3}


def test_kind_without_a_metric_keeps_plain_quantization(tmp_path):
    assert get_kind("image").quantization_metric() is None
    b = omedge.export("brow", random_weights=True, variant="tiny", formats=["openvino"], precision="int8",
                      calib="synthetic", calib_size=4, out=tmp_path / "brow", force=True)
    q = read_manifest(b)["artifacts"][0]["quantization"]
    assert q["method"] == "NNCF post-training quantization (model_type=TRANSFORMER)"
    assert set(q) - {"float_nodes"} == {"method", "calibration_method", "weights", "weight_range", "activations",
                                        "calibration_samples", "nncf"}


def test_accuracy_control_reverts_layers_until_the_metric_is_back():
    """A target of the float model's own metric (max_drop 0): plain INT8 misses it, NNCF
    reverts groups to float; the record's metric is recomputed here from the result."""
    from omedge.quantize.nncf_int8 import quantize_static
    metric = WindowDice()
    metric.max_drop, metric.items = 0.0, 3
    calib = smooth_volumes(6, seed=1)
    q, info = quantize_static(conv_net(), calib, metric)
    ac = info["accuracy_control"]
    assert ac["before"] < 1.0 and ac["iterations"] >= 1 and ac["validation_windows"] == 3
    assert info["float_layers"] and set(info["float_layers"]) <= {"conv0", "conv1", "conv2"}
    assert ac["after_f32"] >= ac["before"] and ac["reached"] == (ac["after"] >= 1.0)
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    ref = ov.Core().compile_model(conv_net(), "CPU", f32)
    got = ov.Core().compile_model(q, "CPU", f32)
    refs = [metric.reference(ref(f)["logits"]) for f in calib[:3]]
    value, _ = metric.score(refs, [got(f)["logits"] for f in calib[:3]])
    assert value == pytest.approx(ac["after_f32"], abs=1e-6)


def test_time_budget_stops_accuracy_control_with_a_hint(monkeypatch):
    from omedge.quantize.nncf_int8 import quantize_static
    monkeypatch.setenv(BUDGET_ENV, "0")
    with pytest.raises(ExportError, match="budget") as e:
        quantize_static(conv_net(), smooth_volumes(2, seed=2), WindowDice())
    assert BUDGET_ENV in e.value.hint and "--int8-dynamic" in e.value.hint


def test_refusal_says_what_accuracy_control_reached():
    """An INT8 volume that misses its gate after accuracy control: the hint gives the
    layers kept in float, the metric reached and what to do next."""
    from omedge.errors import ParityError
    from omedge.exporters import _refuse_failures
    from omedge.manifest import Artifact
    q = {"calibration_samples": 8, "float_layers": ["a", "b", "c"],
         "accuracy_control": {"after": 0.962, "target": 0.98, "before": 0.9}}
    art = Artifact("openvino-int8", "openvino", "int8", "m.xml", ["m.xml"], quantization=q,
                   parity={"passed": False, "failures": ["volume Dice 0.9100 < 0.95 (class 3, decisive voxels)"]})
    with pytest.raises(ParityError, match="volume Dice 0.9100") as e:
        _refuse_failures([art], force=False)
    assert "accuracy control kept 3 layers in float and reached 0.962" in e.value.hint
    assert "--bf16" in e.value.hint and "--force" in e.value.hint
