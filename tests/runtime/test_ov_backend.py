"""OpenVINO backend: how throughput mode splits work over its streams, big outputs handed
over instead of copied, and bf16 artifacts on a CPU without native bf16 (simulated)."""
import itertools
import json
import shutil

import numpy as np
import pytest

import omedge
from omedge.errors import BackendUnavailableError
from omedge.runtime.backends import ov as ovb


def _modelled_seconds(on_streams, after, streams, dynamic):
    """Time on an ideal machine: an item costs 1 on all cores, `streams` on one stream's
    share; the streams run side by side, in rounds of one piece each."""
    if dynamic:
        t_streams = max(on_streams, default=0) * streams
    else:  # whole chunks dealt out to the streams, round by round
        rounds = [on_streams[i:i + streams] for i in range(0, len(on_streams), streams)]
        t_streams = sum(max(r) * streams for r in rounds)
    return t_streams + sum(after)


@pytest.mark.parametrize("dynamic", [True, False])
def test_throughput_split_is_never_worse_than_latency(dynamic):
    """For every batch layout, the plan covers every item in order and, on the ideal
    machine, is never slower than latency mode running the same chunks on all cores. The
    old split (one piece of 1 per stream for a batch of 8 on 16 streams) fails this."""
    layouts = [[1], [8], [3], [8, 8, 8, 8], [8, 2], [5, 5, 5], [32], [17], [1] * 7, [1] * 16, [2] * 9]
    for sizes, streams in itertools.product(layouts, (1, 2, 3, 4, 8, 16)):
        if not dynamic and len(set(sizes)) > 1:
            continue  # a fixed batch: every chunk has the graph's size
        on_streams, after = ovb.throughput_plan(sizes, streams, dynamic)
        assert sum(on_streams) + sum(after) == sum(sizes), (sizes, streams)
        latency = sum(sizes)
        assert _modelled_seconds(on_streams, after, streams, dynamic) <= latency, (sizes, streams, on_streams, after)
        if sum(sizes) >= streams and (dynamic or len(sizes) >= streams):
            assert on_streams, f"{sizes} on {streams} streams: the streams are not used at all"
    assert ovb.throughput_plan([8], 16, True) == ([], [8])
    assert ovb.throughput_plan([8, 8, 8, 8], 3, True) == ([10, 10, 10], [2])


def test_split_batches_keeps_the_order():
    pieces = ovb.split_batches([{"a": np.arange(5)}, {"a": np.arange(5, 7)}], [3, 3, 1])
    assert [len(p["a"]) for p in pieces] == [3, 3, 1]
    assert np.concatenate([q["a"] for q in pieces]).tolist() == list(range(7))


def test_throughput_mode_runs_the_leftover_on_all_cores(brow_bundle, tiles):
    """Whole rounds on the streams, the rest on the latency twin, answers unchanged."""
    lat = omedge.load(brow_bundle, backend="openvino")
    p = omedge.load(brow_bundle, backend="openvino", mode="throughput", threads=2)
    streams = p.describe()["streams"]
    if streams < 2:
        pytest.skip("OpenVINO chose one stream on this machine: nothing to split")
    assert p.describe()["latency_twin"] is True
    n = 2 * streams + 1
    x = p.prepare(tiles[:n])
    parts = p.backend.run_many([{p.input_name: x}])
    assert [len(next(iter(q.values()))) for q in parts] == [2] * streams + [1]
    np.testing.assert_allclose(p.predict(tiles[:n], batch_size=8), lat.predict(tiles[:n], batch_size=8), atol=1e-4)
    one = p.backend.run_many([{p.input_name: x[:1]}])  # a batch of 1 cannot fill 2 streams: all cores
    np.testing.assert_allclose(next(iter(one[0].values())), lat.predict(tiles[:1]), atol=1e-4)


def test_concurrent_throughput_calls_stay_correct(brow_bundle, tiles):
    """Threads calling at once: leftovers run on the twin or, while others are in flight,
    on a stream beside them; every answer is the latency-mode one."""
    import threading
    lat = omedge.load(brow_bundle, backend="openvino")
    want = lat.predict(tiles[:3], batch_size=1)
    p = omedge.load(brow_bundle, backend="openvino", mode="throughput", threads=2)
    got, errors = {}, []

    def work(i):
        try:
            got[i] = [p.predict(tiles[i % 3:i % 3 + 1]) for _ in range(3)]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(got) == 6
    for i, outs in got.items():
        for o in outs:
            np.testing.assert_allclose(o, want[i % 3:i % 3 + 1], atol=1e-4)
    assert p.backend._calls == 0


def test_volume_runner_options_keep_one_stream(brow_bundle):
    """Volumes segmented slower on 2 streams than on 1: the kind asks for one, and a
    one-stream backend needs no twin."""
    from omedge.kinds.volume import KIND
    ir = brow_bundle / "openvino" / "model-int8.xml"
    b = ovb.OpenVINOBackend({"model": ir}, "cpu", {"mode": "throughput", "threads": 2, **KIND.runner_options})
    assert b.describe()["streams"] == 1 and b._twin is None


def test_big_outputs_are_handed_over_and_stay_intact(brow_bundle, tiles, monkeypatch):
    """Above BIG_OUTPUT a run's arrays are the request's own buffers (no copy) and the
    request is dropped, so a later run cannot overwrite an earlier result."""
    p = omedge.load(brow_bundle, backend="openvino")
    x = p.prepare(tiles[:4])
    ref = [p.backend.run({p.input_name: x[i:i + 2]}) for i in (0, 2)]
    monkeypatch.setattr(ovb, "BIG_OUTPUT", 0)
    first = p.backend.run({p.input_name: x[0:2]})
    assert p.backend._local.request is None
    arr = next(iter(first.values()))
    assert not arr.flags.owndata and arr.base is not None
    second = p.backend.run({p.input_name: x[2:4]})
    for got, want in zip((first, second), ref):
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


# -- bf16 on a CPU without native bf16 (simulated: this one may well have it) ----------
@pytest.fixture(scope="module")
def bf16_bundle(tmp_path_factory, ckpt_dir):
    return omedge.export("brow", ckpt_dir / "brow_tiny.pth", formats=["openvino"], precision="bf16",
                         out=tmp_path_factory.mktemp("bf16") / "bf16")


def _with_bf16_first(fp32_bundle, bf16_bundle, out):
    """The fp32 bundle with the bf16 bundle's verified IR added as its first artifact,
    every file hashed again: one bundle holding bf16, fp32 IR and fp32 ONNX."""
    from omedge.bundle import sha256
    from omedge.manifest import Manifest, write_manifest
    shutil.copytree(fp32_bundle, out)
    data = json.loads((out / "manifest.json").read_text())
    bf16 = json.loads((bf16_bundle / "manifest.json").read_text())
    art = next(a for a in bf16["artifacts"] if a["precision"] == "bf16")
    for rel in art["files"]:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(bf16_bundle / rel, out / rel)
        data["files"][rel] = {**bf16["files"][rel], "sha256": sha256(out / rel), "bytes": (out / rel).stat().st_size}
    data["artifacts"].insert(0, art)
    write_manifest(out, Manifest.from_dict(data))
    return out


def test_bf16_without_native_support_falls_back_to_a_verified_artifact(brow_fp32_bundle, bf16_bundle, tmp_path,
                                                                        monkeypatch):
    b = _with_bf16_first(brow_fp32_bundle, bf16_bundle, tmp_path / "mixed")
    # as ranked where bf16 is native; on a CPU without it (an AVX2 Zen 3) the fallback is real
    expected = "openvino-bf16" if ovb.native_bf16() else "openvino-fp32"
    assert omedge.load(b, backend="openvino").describe()["artifact"] == expected
    monkeypatch.setattr(ovb, "native_bf16", lambda: False)
    d = omedge.load(b, backend="openvino").describe()
    assert d["artifact"] == "openvino-fp32" and d["inference_precision"] == "f32"
    assert any("openvino-bf16" in s and "no native bf16" in s for s in d["skipped"]), d["skipped"]


def test_bf16_only_bundle_without_native_support_is_a_clear_error(bf16_bundle, tiles, monkeypatch, capsys):
    from omedge.cli import main
    monkeypatch.setattr(ovb, "native_bf16", lambda: False)
    with pytest.raises(BackendUnavailableError, match="no native bf16"):
        omedge.load(bf16_bundle)
    assert main(["predict", str(bf16_bundle), str(tiles[0])]) == 7
    said = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert "no native bf16" in said and "use an fp32 or int8 artifact" in said
