"""InstanceNorm is exported axis by axis: the same function as torch's, plain ONNX ops,
and (slow test) STU-Net-B logits within 1e-5 of torch on onnxruntime and OpenVINO,
where onnxruntime's own InstanceNormalization is off by ~1e-4 on 128^3 windows."""
import copy
import time

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from omedge import models
from omedge.exporters.onnx import export_onnx
from omedge.models.layers.stable_norm import StableInstanceNorm, stable_instance_norms
from tests.conftest import spec_io

# Shape / Gather / Cast: the size of a dynamic axis, divisor of a ReduceSum
PLAIN_OPS = {"ReduceMean", "ReduceSum", "Sub", "Mul", "Add", "Sqrt", "Div", "Constant", "Shape", "Gather", "Cast"}
IO = ([{"name": "x", "dynamic": {0: "batch"}}], [{"name": "y"}])


class Wrap(nn.Module):
    """A layer with the model interface export_onnx expects (a dict of outputs)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return {"y": self.layer(x)}


def _norm(cls, channels, affine, seed=0):
    norm = cls(channels, affine=affine).eval()
    if affine:  # not the init's ones / zeros, which would hide an affine bug
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.3 * torch.randn(channels, generator=gen))
            norm.bias.copy_(0.3 * torch.randn(channels, generator=gen))
    return norm


def rel_errors(got, ref) -> tuple[float, float]:
    """(max |error| / max |ref|, ||error||_2 / ||ref||_2)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return (float(np.abs(got - ref).max() / np.abs(ref).max()),
            float(np.linalg.norm(got - ref) / np.linalg.norm(ref)))


def run_ort(path, x):
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def ov_compiled(path):
    """OpenVINO CPU in f32: on AMX CPUs its default inference precision is bf16."""
    import openvino as ov
    core = ov.Core()
    return core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def run_ov(path, x):
    return ov_compiled(path)({0: x})[0]


@pytest.mark.parametrize("cls,shape", [(nn.InstanceNorm1d, (2, 3, 40)), (nn.InstanceNorm2d, (2, 3, 12, 20)),
                                       (nn.InstanceNorm3d, (2, 3, 8, 12, 20))])
@pytest.mark.parametrize("affine", [True, False])
def test_same_function_as_torch_instance_norm(cls, shape, affine):
    norm = _norm(cls, shape[1], affine)
    # an offset mean, as conv outputs have; seeded: the float32 comparison is to 2e-6
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(len(shape))) * 3 + 5
    with torch.no_grad():
        exact = copy.deepcopy(norm).double()(x)
        stable32 = StableInstanceNorm(norm)(x.float())
        torch32 = norm(x.float())
        torch.testing.assert_close(stable32, torch32, rtol=0, atol=2e-6)
        torch.testing.assert_close(stable32.double(), exact, rtol=0, atol=1e-6)
        if cls is nn.InstanceNorm1d:  # unbatched (C, L) input, as torch accepts it
            torch.testing.assert_close(StableInstanceNorm(norm)(x[0].float()), norm(x[0].float()), rtol=0, atol=2e-6)


def test_export_has_only_plain_ops_and_leaves_the_model_as_it_was(tmp_path):
    model = Wrap(nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), _norm(nn.InstanceNorm3d, 4, True),
                               nn.LeakyReLU(), nn.Conv3d(4, 4, 1), _norm(nn.InstanceNorm3d, 4, False))).eval()
    before = list(model.modules())
    keys = list(model.state_dict())
    x = torch.randn(2, 2, 16, 24, 32) * 2 + 1
    record = export_onnx(model, x, tmp_path / "stable.onnx", *IO)
    assert record["stable_instance_norm"] == 2
    assert list(model.modules()) == before and list(model.state_dict()) == keys
    assert all(type(m) is not StableInstanceNorm for m in model.modules())
    graph = onnx.load(str(tmp_path / "stable.onnx")).graph
    norm_ops = {n.op_type for n in graph.node} - {"Conv", "LeakyRelu"}
    assert "InstanceNormalization" not in norm_ops and norm_ops <= PLAIN_OPS and "ReduceMean" in norm_ops, norm_ops
    # OpenVINO must keep one reduction per axis: merged into one, a 128^3 sum drifts by 1e-4
    runtime = [op.get_rt_info()["layerType"].astype(str) for op in ov_compiled(tmp_path / "stable.onnx")
               .get_runtime_model().get_ops()]
    assert runtime.count("Reduce") == 2 * 2 * 3, runtime  # 2 norms x (mean, variance) x D, H, W
    x2 = torch.randn(3, 2, 16, 24, 32)  # the batch axis stays dynamic
    with torch.no_grad():
        refs = [(x.numpy(), model(x)["y"].numpy()), (x2.numpy(), model(x2)["y"].numpy())]
    for run in (run_ort, run_ov):
        for inp, ref in refs:
            got = run(tmp_path / "stable.onnx", inp)
            assert got.shape == ref.shape and max(rel_errors(got, ref)) < 1e-5, (run.__name__, rel_errors(got, ref))

    plain = export_onnx(model, x, tmp_path / "plain.onnx", *IO, stable_norm=False)
    assert plain["stable_instance_norm"] == 0
    assert "InstanceNormalization" in {n.op_type for n in onnx.load(str(tmp_path / "plain.onnx")).graph.node}


def test_swap_is_undone_on_error_and_skips_running_stats():
    tracked = nn.InstanceNorm2d(3, track_running_stats=True)
    model = nn.Sequential(nn.InstanceNorm2d(3), nn.ModuleList([nn.InstanceNorm1d(3)]), tracked)
    before = list(model.modules())
    with pytest.raises(RuntimeError, match="boom"), stable_instance_norms(model) as n:
        assert n == 2 and model[2] is tracked
        assert type(model[0]) is StableInstanceNorm and type(model[1][0]) is StableInstanceNorm
        raise RuntimeError("boom")
    assert list(model.modules()) == before


def _stunet_errors(tmp_path, model, x, ref, stable):
    spec_in, spec_out = spec_io(models.get_spec("stu-net"), ["logits"])
    path = tmp_path / f"stunet_{'stable' if stable else 'plain'}.onnx"
    t = time.perf_counter()
    # exported at a small window: D, H, W are dynamic axes, and tracing 128^3 costs a forward
    export_onnx(model, torch.randn(1, 1, 32, 32, 64), path, spec_in, spec_out, stable_norm=stable)
    timings = {"export": time.perf_counter() - t}
    out = {}
    for name, run in (("ort", run_ort), ("ov", run_ov)):
        t = time.perf_counter()
        got = run(path, x)
        timings[name] = time.perf_counter() - t
        out[name] = (*rel_errors(got, ref), float((got.argmax(1) == ref.argmax(1)).mean()))
    print(f"stable={stable} seconds", {k: round(v, 1) for k, v in timings.items()})
    return out


@pytest.mark.slow
def test_stunet_b_128_cube_within_1e5_of_torch_on_ort_and_openvino(tmp_path):
    """Real STU-Net-B width (random weights) on the 128^3 sliding-window patch."""
    model = models.build(models.get_spec("stu-net"), "B")
    x = np.random.default_rng(0).standard_normal((1, 1, 128, 128, 128)).astype(np.float32)
    t = time.perf_counter()
    with torch.no_grad():
        ref = model(torch.from_numpy(x))["logits"].numpy()
    print(f"torch forward {time.perf_counter() - t:.1f}s")
    results = {stable: _stunet_errors(tmp_path, model, x, ref, stable) for stable in (False, True)}
    for stable, per_backend in results.items():
        for backend, (max_rel, l2_rel, agree) in per_backend.items():
            print(f"{'stable' if stable else 'plain InstanceNormalization'} {backend}: "
                  f"max|err|/max|ref| {max_rel:.2e}  relL2 {l2_rel:.2e}  argmax agreement {agree:.6f}")
    for backend in ("ort", "ov"):
        assert results[True][backend][0] < 1e-5 and results[True][backend][1] < 1e-5, results
    assert results[True]["ort"][0] * 5 < results[False]["ort"][0], results  # the defect this fixes
