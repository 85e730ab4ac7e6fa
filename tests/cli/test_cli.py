"""The `omedge` command end to end, as a user types it (real subprocesses)."""
import json
import subprocess
import sys

import pytest

from tests.conftest import write_tiles


def omedge(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "omedge.cli", *map(str, args)], capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def cli_bundle(tmp_path_factory, ckpt_dir):
    d = tmp_path_factory.mktemp("cli")
    tiles = write_tiles(d / "tiles", 24)
    out = d / "brow-int8.omedge"
    omedge("export", "brow", "--weights", ckpt_dir / "brow_tiny.pth", "--format", "onnx,openvino", "--int8",
           "--calib", d / "tiles", "-o", out)
    return out, tiles


def test_export_predict_verify_bench(cli_bundle):
    bundle, tiles = cli_bundle
    r = omedge("predict", bundle, tiles[0], tiles[1], "--json")
    data = json.loads(r.stdout)
    assert [x["input"] for x in data["results"]] == [str(tiles[0]), str(tiles[1])]
    assert len(data["results"][0]["embedding"]) == 64 and data["runtime"]["device"] == "cpu"
    r = omedge("predict", bundle, tiles[0])
    assert "embeddings" in r.stdout and "L2 norm" in r.stdout
    r = omedge("verify", bundle, "--json")
    report = json.loads(r.stdout)
    assert report["passed"] and len(report["runs"]) == 3
    r = omedge("bench", bundle, "--runs", "3", "--seconds", "0.2", "--throughput", "--json")
    rows = json.loads(r.stdout)
    assert {row["artifact"] for row in rows} == {"onnx-int8", "openvino-int8"}
    assert {row["mode"] for row in rows} == {"latency", "throughput"}
    assert all(row["runtime"]["streams"] >= 1 for row in rows if row["backend"] == "openvino")
    for row in rows:
        assert row["p50_ms"] > 0 and row["peak_rss_mb"] > 10 and row["parity"]["passed"]
        assert row["size_mb"] > 0


def test_bench_model_id_includes_torch_baseline():
    r = omedge("bench", "brow", "--variant", "tiny", "--runs", "2", "--seconds", "0.1", "--json")
    rows = json.loads(r.stdout)
    assert rows[0]["backend"] == "torch" and rows[0]["parity"]["passed"]
    variants = {row["variant"] for row in rows}
    assert {"onnx fp32", "openvino fp32", "openvino bf16", "onnx int8", "openvino int8"} <= variants
    assert all("speedup_vs_torch" in row for row in rows if "error" not in row)
    bf16 = next(row for row in rows if row["variant"] == "openvino bf16")
    from omedge.bench import native_bf16
    assert ("error" in bf16 and "native bf16" in bf16["error"]) != native_bf16()
    # each worker reports its own peak memory, not its parent's
    assert len({round(row["peak_rss_mb"]) for row in rows if "peak_rss_mb" in row}) > 2


def test_models_and_devices():
    r = omedge("models", "--json")
    assert {"brow", "pathoduet-he", "pathoduet-ihc", "deblurring-mae"} <= {m["id"] for m in json.loads(r.stdout)}
    r = omedge("devices")
    assert "CPU" in r.stdout and "onnxruntime" in r.stdout and "why not" in r.stdout
    inv = json.loads(omedge("devices", "--json").stdout)
    assert inv["backends"]["openvino"]["devices"]["cpu"] is None


def test_errors_are_clear_with_distinct_exit_codes(tmp_path, cli_bundle, ckpt_dir):
    bundle, tiles = cli_bundle
    r = omedge("export", "brow", "--weights", ckpt_dir / "checkpoint_HE.pth", "-o", tmp_path / "x", check=False)
    assert r.returncode == 3 and "looks like a 'pathoduet" in r.stderr and "Traceback" not in r.stderr
    r = omedge("export", "brow", "--weights", ckpt_dir / "brow_tiny.pth", "-o", bundle, check=False)
    assert r.returncode == 2 and "already exists" in r.stderr
    r = omedge("predict", bundle, tmp_path / "missing.png", check=False)
    assert r.returncode == 6 and "not found" in r.stderr
    r = omedge("predict", bundle, tiles[0], "--device", "cuda", check=False)
    assert r.returncode == 7 and "cuda" in r.stderr
    r = omedge("predict", tmp_path, tiles[0], check=False)
    assert r.returncode == 8 and "not an omedge bundle" in r.stderr
    r = omedge("--debug", "predict", tmp_path, tiles[0], check=False)
    assert r.returncode == 8 and "Traceback" in r.stderr
    r = omedge("export", "brow", "--weights", ckpt_dir / "brow_tiny.pth", "--int8", "-o", tmp_path / "y", check=False)
    assert r.returncode == 2 and "--calib" in r.stderr


def test_models_json_names_the_official_code_each_bundle_reproduces():
    r = subprocess.run([sys.executable, "-m", "omedge.cli", "models", "--json"], capture_output=True, text=True)
    models = json.loads(r.stdout)
    missing = [m["id"] for m in models if not (m["official"].get("entry") and m["official"].get("transform"))]
    assert not missing and all(m["preprocess"] is not None and m["kind"] for m in models)
    duet = next(m for m in models if m["id"] == "pathoduet-he")  # why the README pipeline, not main_lincls.py
    assert "main_lincls.py" in duet["official"]["why_not_main_lincls"] and duet["preprocess"]["std"] == [1, 1, 1]
