"""Run side: load, predict, describe, integrity, devices, thread safety, no torch."""
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

import omedge
from omedge.errors import BackendUnavailableError, BundleIntegrityError, InputError


def test_predict_paths_pil_arrays_and_batches(brow_fp32_bundle, tiles):
    p = omedge.load(brow_fp32_bundle)
    emb = p.predict(tiles[:3])
    assert emb.shape == (3, 64) and emb.dtype == np.float32
    np.testing.assert_allclose(p.predict(Image.open(tiles[0])), emb[:1], atol=1e-5)
    np.testing.assert_allclose(p.predict(np.asarray(Image.open(tiles[1]))), emb[1:2], atol=1e-5)
    # batching does not change results
    np.testing.assert_allclose(p.predict(tiles[:3], batch_size=1), emb, atol=1e-5)


def test_predict_matches_torch_reference(brow_fp32_bundle, tiles, ckpt_dir):
    import torch

    from omedge import models
    from omedge.runtime.preprocess import preprocess
    model = models.load(models.get_spec("brow"), ckpt_dir / "brow_tiny.pth")[0]
    spec = models.get_spec("brow").preprocess
    with torch.no_grad():
        ref = model(torch.from_numpy(preprocess(tiles[:2], spec)))["embedding"].numpy()
    for backend in ("onnxruntime", "openvino"):
        out = omedge.load(brow_fp32_bundle, backend=backend).predict(tiles[:2])
        np.testing.assert_allclose(out, ref, atol=1e-4)


def test_describe_reads_back_what_runs(brow_bundle):
    ort = omedge.load(brow_bundle, backend="onnxruntime").describe()
    assert ort["backend"] == "onnxruntime" and ort["providers"] == ["CPUExecutionProvider"]
    assert ort["artifact"] == "onnx-int8" and ort["precision"] == "int8" and ort["device"] == "cpu"
    ov = omedge.load(brow_bundle, backend="openvino", threads=1).describe()
    assert ov["execution_devices"] == ["CPU"] and ov["artifact"] == "openvino-int8" and ov["threads"] == 1
    auto = omedge.load(brow_bundle).describe()
    assert auto["device"] == "cpu"
    # auto explains what it skipped (no GPU here) instead of falling back silently
    assert any("cuda" in s for s in auto["skipped"])


def test_explicit_device_that_cannot_run_raises(brow_fp32_bundle):
    with pytest.raises(BackendUnavailableError, match="cuda"):
        omedge.load(brow_fp32_bundle, device="cuda")
    with pytest.raises(BackendUnavailableError, match="npu"):
        omedge.load(brow_fp32_bundle, device="npu", backend="openvino")
    with pytest.raises(InputError, match="unknown device"):
        omedge.load(brow_fp32_bundle, device="tpu")
    with pytest.raises(InputError, match="no artifact"):
        omedge.load(brow_fp32_bundle, artifact="onnx-int4")


def _copy(bundle, tmp_path):
    import shutil
    dst = tmp_path / bundle.name
    shutil.copytree(bundle, dst)
    return dst


def test_tampered_file_is_refused(brow_fp32_bundle, tmp_path):
    b = _copy(brow_fp32_bundle, tmp_path)
    data = bytearray((b / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="model.onnx: sha256 differs"):
        omedge.load(b)


def test_truncated_or_missing_file_is_refused(brow_fp32_bundle, tmp_path):
    b = _copy(brow_fp32_bundle, tmp_path)
    bin_path = b / "openvino" / "model-fp32.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:1000])
    with pytest.raises(BundleIntegrityError, match="truncated"):
        omedge.load(b)
    bin_path.unlink()
    with pytest.raises(BundleIntegrityError, match="missing"):
        omedge.load(b)
    with pytest.raises(BundleIntegrityError, match="not an omedge bundle"):
        omedge.load(tmp_path)


def test_concurrent_predict_is_thread_safe(brow_bundle, tiles):
    for backend in ("onnxruntime", "openvino"):
        p = omedge.load(brow_bundle, backend=backend)
        expected = {i: p.predict(tiles[i]) for i in range(4)}
        results, errors = {}, []

        def work(i, p=p, results=results, errors=errors):
            try:
                for _ in range(3):
                    results.setdefault(i, []).append(p.predict(tiles[i % 4]))
            except Exception as e:  # noqa: BLE001 - any failure of a thread is reported below
                errors.append(e)
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not errors
        for i, outs in results.items():
            for o in outs:
                np.testing.assert_allclose(o, expected[i % 4], atol=1e-5)


def test_classifier_returns_labels(tmp_path, ckpt_dir, tiles):
    b = omedge.export("deblurring-mae", ckpt_dir / "finetuned_thyroid.pth", labels=["benign", "malignant"],
                      out=tmp_path / "t")
    p = omedge.load(b)
    assert p.predict(tiles[:2]).shape == (2, 2)
    d = p.predict(tiles[:2], return_dict=True)
    assert d["labels"][0] in ("benign", "malignant") and np.allclose(d["probabilities"].sum(-1), 1)


def test_run_side_never_imports_torch(brow_bundle, tiles):
    code = ("import sys, omedge; p = omedge.load(sys.argv[1]); p.predict(sys.argv[2]); "
            "from omedge.verify import verify; assert verify(sys.argv[1])['passed']; "
            "from omedge.devices import inventory; inventory(); "
            "bad = [m for m in ('torch', 'nncf', 'timm', 'transformers') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    r = subprocess.run([sys.executable, "-c", code, str(brow_bundle), str(tiles[0])], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_verify_reruns_parity(brow_bundle):
    from omedge.verify import verify
    report = verify(brow_bundle)
    assert report["passed"] and report["hashes"] == "ok"
    ran = {(r["artifact"], r["backend"]) for r in report["runs"]}
    assert ran == {("onnx-int8", "onnxruntime"), ("onnx-int8", "openvino"), ("openvino-int8", "openvino")}
    assert all(r["cosine_min"] >= 0.99 for r in report["runs"])


def test_backend_not_installed_names_the_extra(brow_fp32_bundle):
    # openvino made unimportable in a fresh process, as on a device without the extra
    code = ("import sys; sys.modules['openvino'] = None; import omedge\n"
            "from omedge.errors import BackendUnavailableError\n"
            "try:\n    omedge.load(sys.argv[1], backend='openvino')\n"
            "except BackendUnavailableError as e:\n    print(e)\n"
            "print(omedge.load(sys.argv[1]).describe()['backend'])")
    r = subprocess.run([sys.executable, "-c", code, str(brow_fp32_bundle)], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "omedge[openvino]" in r.stdout and r.stdout.strip().endswith("onnxruntime")


def test_throughput_mode_gives_the_same_answers(brow_bundle, tiles):
    lat = omedge.load(brow_bundle, backend="openvino").predict(tiles[:6], batch_size=1)
    p = omedge.load(brow_bundle, backend="openvino", mode="throughput")
    assert p.describe()["mode"] == "throughput"
    np.testing.assert_allclose(p.predict(tiles[:6], batch_size=1), lat, atol=1e-4)


def test_throughput_mode_spreads_one_batch_over_every_stream(brow_bundle, tiles):
    """A batch of 8 in throughput mode used to run as one request on one stream's share
    of the cores (slower than latency mode): it is split across the streams, in order,
    and what cannot fill every stream runs on all cores (tests/runtime/test_ov_backend.py)."""
    from omedge.runtime.backends.ov import throughput_plan
    lat = omedge.load(brow_bundle, backend="openvino").predict(tiles[:8], batch_size=8)
    p = omedge.load(brow_bundle, backend="openvino", mode="throughput", threads=2)
    streams = p.describe()["streams"]
    x = p.prepare(tiles[:8])
    parts = p.backend.run_many([{p.input_name: x}])
    on_streams, after = throughput_plan([8], streams, True)
    assert [len(next(iter(q.values()))) for q in parts] == on_streams + after
    assert streams == 1 or len(on_streams) == streams
    np.testing.assert_allclose(p.predict(tiles[:8], batch_size=8), lat, atol=1e-4)


def test_bf16_refused_where_the_cpu_would_emulate_it(tmp_path, ckpt_dir):
    from omedge.bench import native_bf16
    b = omedge.export("brow", ckpt_dir / "brow_tiny.pth", formats=["openvino"], precision="bf16",
                      out=tmp_path / "bf16")
    if native_bf16():
        assert omedge.load(b).describe()["inference_precision"] == "bf16"
    else:
        with pytest.raises(BackendUnavailableError, match="no native bf16"):
            omedge.load(b)
