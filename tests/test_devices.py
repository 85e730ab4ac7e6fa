"""Device inventory and the choice `auto` makes. No GPU/iGPU/NPU exists on the test
machines: the choosing logic is tested with probe results describing such hardware,
the probes themselves against what this machine really has."""
import omedge.devices as devices

ART = [{"name": "onnx-int8", "format": "onnx"}, {"name": "openvino-int8", "format": "openvino"}]


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
    inv = devices.inventory()
    cpu = inv["cpu"]
    assert cpu["logical_cores"] >= 1 and cpu["model"]
    if "avx2" in open("/proc/cpuinfo").read():
        assert "AVX2" in cpu["isa"]
    assert inv["backends"]["onnxruntime"]["installed"]
    assert inv["backends"]["onnxruntime"]["devices"]["cpu"] is None
    assert inv["backends"]["openvino"]["devices"]["cpu"] is None


def test_auto_prefers_cuda_then_intel_gpu_then_cpu(monkeypatch):
    monkeypatch.setattr(devices, "probe", fake_probe(cuda=True, gpu=True))
    cands, _ = devices.plan(ART)
    assert [(a["name"], b, d) for a, b, d in cands][:2] == [("onnx-int8", "onnxruntime", "cuda"),
                                                            ("openvino-int8", "openvino", "gpu")]
    monkeypatch.setattr(devices, "probe", fake_probe())
    cands, skipped = devices.plan(ART)
    assert cands[0][2] == "cpu"
    assert any("cuda" in s and "no CUDA provider" in s for s in skipped)
    assert any("gpu" in s and "no Intel GPU" in s for s in skipped)


def test_cpu_backend_order_follows_vendor(monkeypatch):
    monkeypatch.setattr(devices, "probe", fake_probe())
    monkeypatch.setattr(devices, "cpu_info", lambda: {"vendor": "GenuineIntel"})
    assert devices.plan(ART, "cpu")[0][0][1] == "openvino"
    monkeypatch.setattr(devices, "cpu_info", lambda: {"vendor": "AuthenticAMD"})
    assert devices.plan(ART, "cpu")[0][0][1] == "onnxruntime"


def test_missing_backend_is_explained(monkeypatch):
    monkeypatch.setattr(devices, "probe", fake_probe(ov_installed=False))
    cands, skipped = devices.plan([ART[1]], "cpu")
    assert cands == [] and any("omedge[openvino]" in s for s in skipped)
    cands, skipped = devices.plan([ART[1]], "cpu", backend="onnxruntime")
    assert cands == [] and any("no format it runs" in s for s in skipped)
