"""Device inventory and the choice `auto` makes. No GPU/iGPU/NPU exists on the test
machines: the choosing logic is tested with probe results describing such hardware,
the probes themselves against what this machine really has."""
import subprocess
import sys

import omedge.devices as devices
import omedge.runtime.plan as plan_module
from omedge.manifest import Artifact


def _verified(name, fmt, backends):
    return Artifact(name=name, format=fmt, precision="int8", entry="m", files=["m"], verified_backends=list(backends),
                    parity={"passed": True, "backends": {b: {"passed": True} for b in backends}})


ART = [_verified("onnx-int8", "onnx", ["onnxruntime", "openvino"]), _verified("openvino-int8", "openvino", ["openvino"])]


def fake_probe(cuda=False, gpu=False, ov_installed=True):
    def probe(name):
        if name == "onnxruntime":
            return {"installed": True, "devices": {"cpu": None, "cuda": None if cuda else "no CUDA provider",
                                                   "gpu": "no OV EP", "npu": "no OV EP"}}
        if not ov_installed:
            return {"installed": False, "reason": "not installed (openvino)", "hint": "pip install 'omedge[openvino]'",
                    "devices": {}}
        return {"installed": True, "devices": {"cpu": None, "gpu": None if gpu else "no Intel GPU",
                                               "npu": "no NPU", "cuda": "OpenVINO does not run on NVIDIA"}}
    return probe


def test_real_inventory_of_this_machine():
    inv = {**devices.inventory(), "backends": plan_module.backend_report()}
    cpu = inv["cpu"]
    assert cpu["logical_cores"] >= 1 and cpu["model"]
    if "avx2" in open("/proc/cpuinfo").read():
        assert "AVX2" in cpu["isa"]
    assert inv["backends"]["onnxruntime"]["installed"]
    assert inv["backends"]["onnxruntime"]["devices"]["cpu"] is None
    assert inv["backends"]["openvino"]["devices"]["cpu"] is None


def test_auto_prefers_cuda_then_intel_gpu_then_cpu(monkeypatch):
    monkeypatch.setattr(plan_module, "probe", fake_probe(cuda=True, gpu=True))
    cands, _ = plan_module.plan(ART)
    assert [(a.name, b, d) for a, b, d in cands][:2] == [("onnx-int8", "onnxruntime", "cuda"),
                                                            ("openvino-int8", "openvino", "gpu")]
    monkeypatch.setattr(plan_module, "probe", fake_probe())
    cands, skipped = plan_module.plan(ART)
    assert cands[0][2] == "cpu"
    assert any("cuda" in s and "no CUDA provider" in s for s in skipped)
    assert any("gpu" in s and "no Intel GPU" in s for s in skipped)


def test_cpu_backend_order_follows_vendor(monkeypatch):
    monkeypatch.setattr(plan_module, "probe", fake_probe())
    monkeypatch.setattr(plan_module, "cpu_info", lambda: {"vendor": "GenuineIntel"})
    assert plan_module.plan(ART, "cpu")[0][0][1] == "openvino"
    monkeypatch.setattr(plan_module, "cpu_info", lambda: {"vendor": "AuthenticAMD"})
    assert plan_module.plan(ART, "cpu")[0][0][1] == "onnxruntime"


def test_missing_backend_is_explained(monkeypatch):
    monkeypatch.setattr(plan_module, "probe", fake_probe(ov_installed=False))
    cands, skipped = plan_module.plan([ART[1]], "cpu")
    assert cands == [] and any("omedge[openvino]" in s for s in skipped)
    cands, skipped = plan_module.plan([ART[1]], "cpu", backend="onnxruntime")
    assert cands == [] and any("no format it runs" in s for s in skipped)


def test_an_artifact_needs_a_passing_record_for_that_very_backend(monkeypatch):
    """verified_backends alone is not enough: the backend's own parity record must agree."""
    monkeypatch.setattr(plan_module, "probe", fake_probe())
    forged = _verified("onnx-int8", "onnx", ["onnxruntime", "openvino"])
    forged.parity["backends"]["openvino"] = {"passed": False}
    cands, skipped = plan_module.plan([forged], "cpu")
    assert [(a.name, b) for a, b, _ in cands] == [("onnx-int8", "onnxruntime")]
    assert any("openvino" in s and "not verified" in s for s in skipped)
    forged.verified_backends = []
    assert plan_module.plan([forged], "cpu")[0] == []


def test_devices_is_inventory_only():
    """devices/ imports nothing from runtime/ (the dependency goes one way)."""
    code = ("import sys, omedge.devices as d; d.inventory(); "
            "print(sorted(m for m in sys.modules if m.startswith('omedge.runtime.')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
