"""`omedge bench --profile`: per-node times from each backend's own profiler."""
import json
import subprocess
import sys

import pytest

from omedge.profile import profile_bundle


@pytest.mark.parametrize("backend, matmul_ops", [("onnxruntime", {"MatMul", "FusedMatMul", "Gemm"}),
                                                 ("openvino", {"FullyConnected", "MatMul"})])
def test_profile_names_the_slow_nodes_and_their_kernels(brow_fp32_bundle, backend, matmul_ops):
    (rep,) = profile_bundle(brow_fp32_bundle, backend=backend, runs=3, top=5)
    assert rep["backend"] == backend and rep["role"] == "model" and rep["runs"] == 3
    assert 0 < len(rep["nodes"]) <= 5
    times = [n["ms"] for n in rep["nodes"]]
    assert times == sorted(times, reverse=True) and times[0] > 0
    # every op type is listed, and the shares of all op types add up to the whole
    assert abs(sum(o["share"] for o in rep["ops"]) - 1.0) < 1e-6
    assert abs(sum(o["ms"] for o in rep["ops"]) - rep["total_ms_per_run"]) < 1e-6 * max(1, rep["total_ms_per_run"])
    assert matmul_ops & {o["op"] for o in rep["ops"]}, rep["ops"]
    # a transformer's time is mostly in its matmuls: they must be among the top op types
    assert {o["op"] for o in rep["ops"][:4]} & matmul_ops
    if backend == "openvino":  # the kernel names the precision that really ran
        kernels = {k for o in rep["ops"] for k in o["exec"]}
        assert any(k.endswith(("_f32", "_FP32", "_bf16", "_BF16")) for k in kernels), kernels


def test_warm_up_is_left_out(brow_fp32_bundle):
    """Per-run time with the first (compiling) run dropped: 1 and 3 runs give comparable
    per-run totals (not one inflated by the first run's allocations)."""
    one = profile_bundle(brow_fp32_bundle, backend="onnxruntime", runs=1)[0]
    assert one["nodes"] and one["total_ms_per_run"] > 0
    assert sum(n["ms"] for n in one["nodes"]) <= one["total_ms_per_run"] + 1e-9


def test_bench_profile_cli(brow_fp32_bundle):
    out = subprocess.run([sys.executable, "-m", "omedge.cli", "bench", str(brow_fp32_bundle), "--profile",
                          "--runs", "2", "--json"], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    reports = json.loads(out.stdout)
    assert {r["backend"] for r in reports} == {"onnxruntime", "openvino"}
    assert all(r["nodes"] for r in reports)
