"""INT8 that computes the same on every x86 CPU. Without VNNI, onnxruntime's u8 x s8
kernels sum pairs of products in 16 bits, which saturate on full 8-bit weights: INT8
weights use 7 bits, and a bundle with full-range weights is not used on such a CPU
(the planner says why). The kernel test runs the real onnxruntime on this machine."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import omedge
from omedge import devices
from omedge.devices import cpu_info
from omedge.manifest import read_manifest
from omedge.runtime import plan as planner
from tests.conftest import manifest_dict

K = N = 256


def _qdq_matmul(weights_q: np.ndarray, w_scale: np.ndarray, x_scale: float) -> ort.InferenceSession:
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    consts = [numpy_helper.from_array(np.array(x_scale, np.float32), "xs"),
              numpy_helper.from_array(np.array(0, np.uint8), "xz"), numpy_helper.from_array(weights_q, "wq"),
              numpy_helper.from_array(w_scale.astype(np.float32), "ws"),
              numpy_helper.from_array(np.zeros(N, np.int8), "wz")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, N])], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _kernel_error(levels: int) -> float:
    """Largest relative error of onnxruntime's INT8 MatMul against the exact integer
    product, with activations at the top of the u8 range (an outlier channel block)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, N)).astype(np.float32)
    scale = np.abs(w).max(0) / levels
    wq = np.clip(np.round(w / scale), -levels - 1, levels).astype(np.int8)
    x = np.full((8, K), 255.0, np.float32)
    exact = x.astype(np.float64) @ (wq.astype(np.float64) * scale)
    got = _qdq_matmul(wq, scale, 1.0).run(None, {"x": x})[0]
    return float(np.abs(got - exact).max() / np.abs(exact).max())


def test_7_bit_weights_are_exact_on_this_cpu_and_8_bit_saturate_only_without_vnni():
    assert _kernel_error(63) < 1e-5
    saturated = _kernel_error(127) > 1e-3
    assert saturated == (not devices.int8_dot_products()["exact"]), (cpu_info()["isa"], "the ISA rule is wrong")


@pytest.fixture(scope="module")
def int8_artifacts(brow_bundle):
    m = manifest_dict(brow_bundle)
    assert all(a["quantization"]["weight_range"] == "7-bit" for a in m["artifacts"])
    assert m["verification"]["machine"]["isa"] == cpu_info()["isa"]
    return read_manifest(brow_bundle).artifacts


def _full_range(artifacts):
    return [dataclasses.replace(a, quantization={k: v for k, v in a.quantization.items() if k != "weight_range"})
            for a in artifacts]


@pytest.mark.parametrize("isa, used", [(["AVX2"], False), (["AVX2", "AVX-512"], False),
                                       (["AVX2", "AVX-512", "AVX512-VNNI"], True), (["AVX2", "AVX-VNNI"], True)])
def test_full_range_int8_is_skipped_where_it_would_saturate(int8_artifacts, monkeypatch, isa, used):
    monkeypatch.setattr(devices, "cpu_info", lambda: {"arch": "x86_64", "isa": isa, "vendor": "AuthenticAMD"})
    candidates, skipped = planner.plan(_full_range(int8_artifacts), device="cpu")
    seven_bit, _ = planner.plan(int8_artifacts, device="cpu")  # this omedge's bundles run everywhere
    assert len(seven_bit) == 3  # onnx on onnxruntime and openvino, the IR on openvino
    assert len(candidates) == (3 if used else 0)
    if not used:
        assert len(skipped) == 3 and all("full 8-bit range" in s and "re-export" in s for s in skipped)


def test_this_machine_loads_its_own_int8_bundle_and_devices_says_how_int8_runs(brow_bundle, capsys):
    p = omedge.load(brow_bundle)
    assert p.describe()["artifact"].endswith("int8")
    from omedge.cli import main
    assert main(["devices"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("INT8:"))
    assert ("exact" if devices.int8_dot_products()["exact"] else "saturating") in line
