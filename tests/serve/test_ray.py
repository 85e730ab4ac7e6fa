"""Ray: `omedge batch --ray` on a 2-CPU local cluster started here (same rows as the local
pool, a worker killed mid-batch) and `omedge serve --ray` with 2 Serve replicas over HTTP.
One module-scoped cluster: starting Ray costs 10-20 s."""
import ipaddress
import os
import signal
import socket
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

import omedge
from omedge.batch import run_batch
from tests.conftest import write_tiles

ray = pytest.importorskip("ray")
LOOPBACK = {"localhost"}


def _loopback(address) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Ray and its HTTP proxy talk over loopback; anything else is still refused."""
    real_connect, real_create = socket.socket.connect, socket.create_connection

    def guarded(self, address):
        if self.family == socket.AF_UNIX or _loopback(address):
            return real_connect(self, address)
        raise AssertionError(f"network access attempted: {address}")

    def create(address, *a, **k):
        if not _loopback(address):
            raise AssertionError(f"network access attempted: {address}")
        return real_create(address, *a, **k)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket, "create_connection", create)


@pytest.fixture(scope="module")
def cluster():
    from omedge.batch_ray import quiet_ray
    quiet_ray()  # what omedge does before it starts Ray itself
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 2 ** 20,
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}, log_to_driver=False)
    yield
    from ray import serve
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def tile_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray_tiles")
    write_tiles(folder, 40, seed=9, size=224)
    (folder / "tile_020b.png").write_bytes(b"GIF89a broken")
    return folder


def table_rows(path) -> list[dict]:
    t = pq.read_table(path).drop_columns(["seconds", "finished_at"])
    return t.to_pylist()


def test_ray_never_phones_home(cluster):
    from ray._common.usage.usage_lib import usage_stats_enabled

    @ray.remote(num_cpus=0)
    def worker_view():
        from ray._common.usage.usage_lib import usage_stats_enabled as enabled
        return os.environ.get("RAY_USAGE_STATS_ENABLED"), enabled()

    assert not usage_stats_enabled()
    assert ray.get(worker_view.remote(), timeout=60) == ("0", False)
    session = ray._private.worker.global_worker.node.get_session_dir_path()
    assert not os.path.exists(os.path.join(session, "usage_stats.json"))


def test_ray_batch_gives_the_local_rows(cluster, brow_fp32_bundle, tile_dir, tmp_path):
    local = run_batch(brow_fp32_bundle, tile_dir, tmp_path / "local.parquet", workers=1, chunk_size=8)
    remote = run_batch(brow_fp32_bundle, tile_dir, tmp_path / "ray.parquet", ray=True, workers=2, chunk_size=8)
    assert remote["complete"] and (remote["ok"], remote["failed"]) == (local["ok"], local["failed"]) == (40, 1)
    a, b = table_rows(tmp_path / "local.parquet"), table_rows(tmp_path / "ray.parquet")
    assert [r["item"] for r in a] == [r["item"] for r in b]
    for x, y in zip(a, b):
        ex, ey = x.pop("embedding"), y.pop("embedding")
        assert x == y  # item, ok, error, bundle hash
        assert (ex is None) == (ey is None)
        if ex is not None:
            np.testing.assert_allclose(ex, ey, rtol=0, atol=1e-6)


def _map_workers() -> list:
    import psutil
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::MapWorker(MapBatches(BatchActor))"):
            found.append(p)
    return found


def test_a_worker_killed_mid_batch(cluster, brow_fp32_bundle, tile_dir, tmp_path):
    out = tmp_path / "k.parquet"
    parts = tmp_path / "k.parquet.parts"
    state = {"killed": None, "job_done": False}

    def killer():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not state["job_done"]:
            workers = _map_workers()
            if workers and parts.is_dir() and any(parts.glob("part-*.parquet")):
                state["killed"] = workers[0].pid
                state["job_done_at_kill"] = state["job_done"]
                os.kill(workers[0].pid, signal.SIGKILL)
                return
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    res = run_batch(brow_fp32_bundle, tile_dir, out, ray=True, workers=2, chunk_size=2)
    state["job_done"] = True
    t.join(10)
    assert state["killed"] and state["job_done_at_kill"] is False  # it died while the job ran
    assert res["complete"] and res["items"] == 41
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 41 and len({r["item"] for r in rows}) == 41
    for r in rows:  # each item done (the killed batch was retried) or failed with a message
        assert r["ok"] or r["error"]
    assert sum(r["ok"] for r in rows) == 40, [r["error"] for r in rows if not r["ok"]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_processes() -> list:
    import psutil
    return [p for p in psutil.process_iter(["cmdline"])
            if " ".join(p.info["cmdline"] or []).startswith("ray::ServeReplica:omedge:OmedgeServer")]


def test_serve_two_replicas_over_http(cluster, brow_fp32_bundle, tile_dir):
    """The real omedge.serve app as 2 Ray Serve replicas; tritonclient through Ray's proxy."""
    import tritonclient.http as triton
    from ray import serve

    from omedge.manifest import stored_hash
    from omedge.serve.config import ServeConfig
    from omedge.serve.ray_deploy import run, shutdown
    port = _free_port()
    url = run([f"brow={brow_fp32_bundle}"], ServeConfig(port=port), replicas=2, block=False)
    assert url == f"http://127.0.0.1:{port}"
    files = sorted(tile_dir.glob("tile_00*.png"))[:6]
    ref = omedge.load(brow_fp32_bundle).predict([str(f) for f in files])
    try:
        status = serve.status().applications["omedge"]
        assert status.status == "RUNNING" and status.deployments["OmedgeServer"].replica_states == {"RUNNING": 2}
        replicas = _replica_processes()
        assert len(replicas) == 2 and all(p.environ().get("OMP_NUM_THREADS") == "1" for p in replicas)  # 2 CPUs / 2
        client = triton.InferenceServerClient(f"127.0.0.1:{port}", connection_timeout=30, network_timeout=30)
        assert client.is_server_ready()
        assert client.get_model_metadata("brow")["parameters"]["manifest_sha256"] == stored_hash(brow_fp32_bundle)
        for k in range(0, len(files), 2):   # raw PNG bytes, decoded and preprocessed on the replica
            inp = triton.InferInput("image", [2], "BYTES")
            inp.set_data_from_numpy(np.array([f.read_bytes() for f in files[k:k + 2]], dtype=object))
            got = client.infer("brow", [inp]).as_numpy("embedding")
            np.testing.assert_allclose(got, ref[k:k + 2], rtol=1e-5, atol=1e-5)
        client.close()
    finally:
        shutdown()
    assert not _replica_processes() or all(not p.is_running() for p in _replica_processes())
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
