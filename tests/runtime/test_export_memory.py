"""Export memory of volumes: windows are verified one at a time (a 105-class STU-Net
window is 0.9 GB of float32 logits), onnxruntime opens without its arena, and the
export records its peak RSS."""
import tracemalloc
import weakref

import numpy as np
import pytest
import torch

import omedge
from omedge import exporters, models
from omedge.kinds.volume_parity import window_parity
from omedge.parity import (
    compare,
    concat,
    decisive_threshold,
    gates_for,
    logit_scale,
    top2_margin,
)
from omedge.runtime.backends.ort import OnnxRuntimeBackend
from tests.conftest import manifest_dict

GATES = gates_for("fp32", {})


def _windows(n, shape=(6, 10, 12, 9), noise=1e-3, seed=0):
    rng = np.random.default_rng(seed)
    ref = [{"logits": rng.normal(size=(1, *shape)).astype(np.float32)} for _ in range(n)]
    got = [{"logits": (r["logits"] + rng.normal(scale=noise, size=r["logits"].shape)).astype(np.float32)}
           for r in ref]
    return ref, got


def test_window_parity_matches_the_concatenated_comparison():
    ref, got = _windows(3, noise=0.3)
    res = window_parity(ref, iter(got), "fp32", GATES)
    want = compare(concat(ref), concat(got), GATES)["outputs"]["logits"]
    m = res["outputs"]["logits"]
    for key in ("cosine_min", "cosine_mean", "max_abs", "ref_max_abs"):
        assert m[key] == pytest.approx(want[key], rel=1e-9), key
    r, g = concat(ref)["logits"], concat(got)["logits"]
    agree = r.argmax(1) == g.argmax(1)
    decisive = np.stack([top2_margin(w) > decisive_threshold(logit_scale(w), "fp32") for w in r])
    assert 0.3 < m["voxel_agreement"] < 1 and m["voxel_agreement"] == pytest.approx(agree.mean())
    assert m["decisive_voxel_agreement"] == pytest.approx(agree[decisive].mean())
    assert m["decisive_voxels"] == pytest.approx(decisive.mean())
    rel = max(np.linalg.norm(a - b) / np.linalg.norm(a) for a, b in zip(r, g))
    assert m["relative_error_max"] == pytest.approx(rel, rel=1e-5)
    assert res["failures"] and "cosine" in res["failures"][0] and not res["passed"]  # noise 0.3 misses fp32


def test_window_parity_names_bad_windows():
    ref, got = _windows(2)
    assert window_parity(ref, got, "fp32", GATES)["passed"]
    got[1]["logits"][0, 2, 3] = np.nan
    res = window_parity(ref, got, "fp32", GATES)
    assert not res["passed"] and "NaN/Inf" in res["failures"][0] and "logits" not in res["outputs"]
    res = window_parity(ref, [{"logits": got[0]["logits"][:, :, 1:]}, got[1]], "fp32", GATES)
    assert "has shape" in res["failures"][0]
    assert "fewer candidate" in window_parity(ref, got[:1], "fp32", GATES)["failures"][0]


def test_one_candidate_window_alive_at_a_time_and_memory_bounded():
    """A generator's windows: each is released before the next is made, and numpy's peak
    during the comparison stays near one window (all windows at once would be 4 of them,
    and twice that in float64)."""
    n, shape = 4, (20, 64, 32, 32)
    ref, _ = _windows(n, shape)
    window = ref[0]["logits"].nbytes
    alive, most = [], []

    def made(r):
        most.append(sum(w() is not None for w in alive))
        out = r["logits"] + np.float32(1e-4)
        alive.append(weakref.ref(out))
        return out

    def windows():  # the generator keeps no reference to what it yielded
        for r in ref:
            yield {"logits": made(r)}

    tracemalloc.start()
    res = window_parity(ref, windows(), "fp32", GATES)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert res["passed"] and len(most) == n and max(most) == 0, most
    assert peak < 2.2 * window, (peak, window)


@pytest.fixture(scope="module")
def tiny_stunet(tmp_path_factory):
    """A tiny STU-Net as the nnU-Net v1 `.model` dict the official files use."""
    sd = models.build(models.get_spec("stu-net"), "tiny", num_classes=4).state_dict()
    path = tmp_path_factory.mktemp("mem") / "tiny_ep4k.model"
    torch.save({"epoch": 4000, "state_dict": sd, "optimizer_state_dict": {"state": {}, "param_groups": []},
                "lr_scheduler_state_dict": None, "amp_grad_scaler": {"scale": 1024.0},
                "plot_stuff": ([np.float64(0.5)], [np.float64(0.4)], [np.float64(0.8)], [np.float64(0.7)])}, path)
    return path


def _mapped_reference_files() -> int:
    with open("/proc/self/maps") as f:
        return len({line.split()[-1] for line in f if "/.work/reference/" in line})


def test_export_verifies_window_by_window_and_records_peak_rss(tiny_stunet, tmp_path, monkeypatch):
    """The real export on onnxruntime: no backend output is alive when the next run starts
    (the windows, then the phantom's batches); the torch reference windows are on disk by
    then (their arrays freed, at most the window being compared memory-mapped), the session
    opens without its arena, and the manifest records the process's peak RSS."""
    runs, alive, torch_windows, torch_alive, mapped = [], [], [], [], []
    real, real_reference = OnnxRuntimeBackend.run, exporters._Job.reference

    def observed(self, inputs):  # the real session runs; this only counts what is still referenced
        runs.append(sum(w() is not None for w in alive))
        torch_alive.append(sum(w() is not None for w in torch_windows))
        mapped.append(_mapped_reference_files())
        out = real(self, inputs)
        alive.extend(weakref.ref(v) for v in out.values())
        return out

    def reference(job, labels, seed):
        real_reference(job, labels, seed)
        torch_windows.extend(weakref.ref(a) for r in job.ref for a in r.values())
        expected.extend({k: a.copy() for k, a in r.items()} for r in job.ref)
    expected = []
    monkeypatch.setattr(OnnxRuntimeBackend, "run", observed)
    monkeypatch.setattr(exporters._Job, "reference", reference)
    b = omedge.export("stu-net", tiny_stunet, formats=["onnx"], out=tmp_path / "b")
    par = manifest_dict(b)["artifacts"][0]["parity"]
    assert par["passed"] and par["measured_with"]["memory_arena"] is False
    assert len(runs) >= 3 and max(runs) == 0, runs  # 2 windows + the phantom
    assert len(torch_windows) == 2 and max(torch_alive) == 0 and max(mapped) <= 1, (torch_alive, mapped)
    with np.load(b / "parity.npz") as stored:  # the bundle keeps the reference as it was computed
        assert all(np.array_equal(stored[f"ref.{i}.logits"], r["logits"]) for i, r in enumerate(expected))
    assert not list(b.rglob("*.npy")) and not list(tmp_path.glob(".*"))  # nothing of the work left
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    assert 100 < par["peak_rss_mb"] <= hwm + 0.1  # recorded to 0.1 MB
    p = omedge.load(b, backend="onnxruntime")
    assert p.backend.describe()["memory_arena"] is False  # the predictor opens it the same way
