"""Calibration memory of onnxruntime INT8: only the tensors the quantizer reads ranges for
are held, and big activations are calibrated in passes (SAM's 1024^2 encoder went past
18 GB of RSS on 12 calibration images before)."""
import tracemalloc

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationMethod

from omedge.quantize import onnx_int8

TOKENS, WIDTH = 1024, 64
SCORES_BYTES = 4 * TOKENS * TOKENS  # one sample's attention scores: 4 MB


def attention_graph(path):
    """x -> MatMul(W1) -> h; scores = h @ h^T and mixed = scores @ h (activation x activation,
    left in float); y = Relu(MatMul(mixed, W2)). The score matrix is 16x any other tensor."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((WIDTH, WIDTH)) / 8).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((WIDTH, WIDTH)) / 8).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="proj_in"),
             helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1], name="t"),
             helper.make_node("MatMul", ["h", "ht"], ["scores"], name="qk"),
             helper.make_node("Softmax", ["scores"], ["probs"], axis=-1, name="softmax"),
             helper.make_node("MatMul", ["probs", "h"], ["mixed"], name="av"),
             helper.make_node("MatMul", ["mixed", "w2"], ["z"], name="proj_out"),
             helper.make_node("Relu", ["z"], ["y"], name="relu")]  # not an output layer (those stay float)
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, TOKENS, WIDTH]) for n in ("x", "y")]
    graph = helper.make_graph(nodes, "attn", io[:1], io[1:], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(onnx.shape_inference.infer_shapes(model), str(path))
    return path


def samples(n):
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, TOKENS, WIDTH)).astype(np.float32)} for _ in range(n)]


def traced_calibration(path, calib, tmp_path):
    tracemalloc.start()
    try:
        ranges, per_pass = onnx_int8.calibrate(path, calib, ["qk", "av"], CalibrationMethod.Percentile, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return ranges, per_pass, peak


def test_the_excluded_attention_scores_are_never_held(tmp_path):
    path = attention_graph(tmp_path / "attn.onnx")
    ranges, per_pass, peak = traced_calibration(path, samples(8), tmp_path)
    assert per_pass == 8  # 1 MB per sample: one pass
    assert "scores" not in ranges.data and {"x", "h", "mixed", "z"} <= set(ranges.data)
    # 8 samples' scores alone would be 32 MB; the four kept tensors are 1 MB per sample
    assert peak < 2 * SCORES_BYTES, f"calibration held {peak / 2 ** 20:.1f} MB"


def test_big_activations_are_calibrated_in_passes(tmp_path, monkeypatch):
    path = attention_graph(tmp_path / "attn.onnx")
    calib = samples(8)
    one_pass, _, peak_one = traced_calibration(path, calib, tmp_path)
    monkeypatch.setattr(onnx_int8, "CALIB_PASS_BYTES", 3 * 2 ** 20)  # two samples' 5 tensors
    split, per_pass, peak_split = traced_calibration(path, calib, tmp_path)
    assert per_pass == 2 and peak_split < peak_one / 2
    for name, data in one_pass.data.items():  # the same ranges within a histogram bin or so
        np.testing.assert_allclose(np.asarray(split.data[name].range_value, np.float64),
                                   np.asarray(data.range_value, np.float64), rtol=0.02, atol=1e-3)


def test_the_quantized_graph_reads_the_selected_ranges(tmp_path):
    """End to end through onnxruntime's quantizer with the ranges handed over as its cache:
    the projections are quantized, the attention MatMuls stay float, the output agrees."""
    path = attention_graph(tmp_path / "attn.onnx")
    calib = samples(6)
    info = onnx_int8.quantize_static(path, tmp_path / "int8.onnx", calib)
    assert info["calibration_passes"] == 1 and info["calibration_samples"] == 6
    q = onnx.load(str(tmp_path / "int8.onnx"))
    weights = {i.name for i in q.graph.initializer}
    dequantized_weights = {n.output[0] for n in q.graph.node
                           if n.op_type == "DequantizeLinear" and n.input[0] in weights}
    quantized = {n.name for n in q.graph.node if n.op_type == "MatMul" and n.input[1] in dequantized_weights}
    assert {"proj_in", "proj_out"} <= quantized and not {"qk", "av"} & quantized
    x = samples(7)[-1]
    ref = ort.InferenceSession(str(path)).run(None, x)[0].ravel()
    got = ort.InferenceSession(str(tmp_path / "int8.onnx")).run(None, x)[0].ravel()
    assert ref @ got / np.linalg.norm(ref) / np.linalg.norm(got) > 0.99
