"""`omedge serve` on a real uvicorn on a loopback port, driven by the real tritonclient.http
(and httpx where a test needs the status line and headers): OIP metadata and infer with a
preprocessed tensor and with raw PNG bytes (equal to p.predict), each bad input with its
status, /metrics, TLS, the token, limits, the queue and graceful shutdown."""
from __future__ import annotations

import datetime
import gzip
import io
import json
import socket
import ssl
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

pytest.importorskip("fastapi")
import httpx
import tritonclient.http as triton
import uvicorn
from PIL import Image
from tritonclient.utils import InferenceServerException

import omedge
from omedge.errors import UsageError
from omedge.manifest import stored_hash
from omedge.serve.app import create_app
from omedge.serve.config import ServeConfig
from omedge.serve.security import ssl_options

LOOPBACK = ("127.0.0.1", "::1", "localhost")
_CONNECT, _CREATE = socket.socket.connect, socket.create_connection   # before any test patches them
TIMEOUT = 30


@pytest.fixture(autouse=True)
def loopback_only(no_network, monkeypatch):
    """The suite's socket guard, with one exception: connections to this machine's loopback."""
    def connect(self, address):
        if self.family == socket.AF_UNIX or (isinstance(address, tuple) and address[0] in LOOPBACK):
            return _CONNECT(self, address)
        raise AssertionError(f"network access attempted: {address}")

    def create(address, *a, **k):
        if address[0] not in LOOPBACK:
            raise AssertionError(f"network access attempted: {address}")
        return _CREATE(address, *a, **k)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", create)


class Running:
    def __init__(self, server, app, thread, scheme):
        self.server, self.app, self.thread = server, app, thread
        self.port = server.servers[0].sockets[0].getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"{scheme}://{self.host}"

    def model(self, name):
        return self.app.state.models[name]

    def stop(self):
        self.server.should_exit = True
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the server did not stop"


@contextmanager
def serving(bundles, **options):
    """A real uvicorn server in a thread, on a free loopback port (port 0)."""
    config = ServeConfig(**options)
    app = create_app(bundles, config)
    uv = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=20,
                        **ssl_options(config))
    server = uvicorn.Server(uv)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    running = Running(server, app, thread, "https" if config.tls_cert else "http")
    try:
        yield running
    finally:
        if running.thread.is_alive():
            running.stop()


@pytest.fixture(scope="module")
def tile_folder(tmp_path_factory):
    from tests.conftest import write_tiles
    folder = tmp_path_factory.mktemp("served_tiles")
    write_tiles(folder, 3, size=256, seed=7)
    return folder


@pytest.fixture(scope="module")
def server(brow_fp32_bundle, tile_folder):
    with serving([f"brow={brow_fp32_bundle}"], allow_dir=tile_folder, max_pixels=1_000_000) as s:
        yield s


@pytest.fixture(scope="module")
def local(brow_fp32_bundle):
    return omedge.load(brow_fp32_bundle)


def client(s):
    return triton.InferenceServerClient(s.host, connection_timeout=TIMEOUT, network_timeout=TIMEOUT)


def png_bytes(path) -> bytes:
    return path.read_bytes()


def raw_input(items: list[bytes]):
    inp = triton.InferInput("image", [len(items)], "BYTES")
    inp.set_data_from_numpy(np.array(items, dtype=object))
    return inp


def test_health_and_metadata_come_from_the_manifest(server, brow_fp32_bundle):
    c = client(server)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("brow")
    meta = c.get_model_metadata("brow")
    assert meta["inputs"][0] == {"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, 224, 224]}
    assert {"name": "image", "datatype": "BYTES", "shape": [-1]} in meta["inputs"]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, -1]}]
    assert meta["parameters"]["manifest_sha256"] == stored_hash(brow_fp32_bundle)
    assert str(brow_fp32_bundle) not in json.dumps(meta)   # no server-side path leaks
    r = httpx.get(f"{server.url}/v2/models/brow", timeout=TIMEOUT)
    assert r.headers["omedge-manifest-sha256"] == stored_hash(brow_fp32_bundle)


def test_infer_preprocessed_tensor_equals_predict(server, local, tiles, brow_fp32_bundle):
    files = [str(t) for t in tiles[:3]]
    x, expected = local.prepare(files), local.predict(files)
    for binary in (True, False):   # tritonclient's default binary tensor data, and plain JSON
        inp = triton.InferInput("pixel_values", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = triton.InferRequestedOutput("embedding", binary_data=binary)
        res = client(server).infer("brow", [inp], outputs=[out])
        np.testing.assert_allclose(res.as_numpy("embedding"), expected, rtol=1e-5, atol=1e-5)
        assert res.get_response()["parameters"]["manifest_sha256"] == stored_hash(brow_fp32_bundle)


def test_infer_raw_png_bytes_equals_predict_on_the_files(server, local, tiles):
    res = client(server).infer("brow", [raw_input([png_bytes(t) for t in tiles[:2]])])
    np.testing.assert_allclose(res.as_numpy("embedding"), local.predict([str(t) for t in tiles[:2]]),
                               rtol=1e-5, atol=1e-5)


def test_paths_only_inside_allow_dir(server, local, tile_folder):
    def infer(path):
        return httpx.post(f"{server.url}/v2/models/brow/infer", timeout=TIMEOUT, json={
            "inputs": [{"name": "path", "datatype": "BYTES", "shape": [1], "data": [path]}]})
    r = infer("tile_000.png")
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()["outputs"][0]["data"], local.predict(str(tile_folder / "tile_000.png"))[0],
                               rtol=1e-5, atol=1e-5)
    outside = tile_folder.parent / "outside.png"
    outside.write_bytes((tile_folder / "tile_000.png").read_bytes())
    (tile_folder / "link.png").unlink(missing_ok=True)
    (tile_folder / "link.png").symlink_to(outside)
    for escape in ("../outside.png", str(outside), "link.png", "/etc/passwd", "missing.png"):
        r = infer(escape)
        assert r.status_code == 400 and "inside the allowed folder" in r.json()["error"]
        assert str(tile_folder) not in r.text


def test_wrong_shape_dtype_or_name_is_400_with_the_spec(server):
    cases = [("pixel_values", [1, 3, 200, 224], "FP32", "expected 'pixel_values' FP32 [-1, 3, 224, 224]"),
             ("pixel_values", [1, 3, 224, 224], "FP64", "is FP64"),
             ("pixels", [1, 3, 224, 224], "FP32", "unknown input(s) ['pixels']")]
    for name, shape, dtype, expected in cases:
        inp = triton.InferInput(name, shape, dtype)
        inp.set_data_from_numpy(np.zeros(shape, {"FP32": np.float32, "FP64": np.float64}[dtype]))
        with pytest.raises(InferenceServerException) as e:
            client(server).infer("brow", [inp])
        assert e.value.status() == "400" and expected in e.value.message()
        assert "Traceback" not in e.value.message()


def test_corrupt_image_is_400_and_the_server_keeps_serving(server, local, tiles):
    corrupt = b"\x89PNG\r\n\x1a\n" + b"garbage" * 50
    with pytest.raises(InferenceServerException) as e:
        client(server).infer("brow", [raw_input([corrupt])])
    assert e.value.status() == "400" and "image[0]" in e.value.message()
    big = io.BytesIO()   # a small file that decodes to 4 megapixels: over this server's limit
    Image.new("RGB", (2000, 2000)).save(big, "PNG")
    with pytest.raises(InferenceServerException) as e:
        client(server).infer("brow", [raw_input([big.getvalue()])])
    assert e.value.status() == "400" and "decompression bombs" in e.value.message()
    res = client(server).infer("brow", [raw_input([png_bytes(tiles[0])])])
    np.testing.assert_allclose(res.as_numpy("embedding"), local.predict(str(tiles[0])), rtol=1e-5, atol=1e-5)


def test_unknown_model_is_404(server):
    with pytest.raises(InferenceServerException) as e:
        client(server).get_model_metadata("nope")
    assert e.value.status() == "404" and "brow" in e.value.message()
    r = httpx.post(f"{server.url}/v2/models/nope/infer", json={"inputs": []}, timeout=TIMEOUT)
    assert r.status_code == 404


def test_gzip_body_is_accepted_and_a_gzip_bomb_is_413(server, local, tiles):
    x = local.prepare(str(tiles[0]))
    inp = triton.InferInput("pixel_values", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = client(server).infer("brow", [inp], request_compression_algorithm="gzip")
    np.testing.assert_allclose(res.as_numpy("embedding"), local.predict(str(tiles[0])), rtol=1e-5, atol=1e-5)
    bomb = gzip.compress(b"\0" * (70 * 2 ** 20))   # ~70 kB that inflates past the 64 MiB limit
    r = httpx.post(f"{server.url}/v2/models/brow/infer", content=bomb, timeout=TIMEOUT,
                   headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert r.status_code == 413


def test_metrics(server, tiles):
    client(server).infer("brow", [raw_input([png_bytes(tiles[0])])])
    with pytest.raises(InferenceServerException):
        client(server).infer("brow", [raw_input([b"not an image"])])
    text = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).text
    assert 'omedge_requests_total{code="200",endpoint="infer",model="brow"}' in text
    assert 'omedge_requests_total{code="400",endpoint="infer",model="brow"}' in text
    assert 'omedge_request_seconds_bucket{endpoint="infer",le="0.005",model="brow"}' in text
    assert 'omedge_queue_depth{model="brow"} 0.0' in text
    info = [line for line in text.splitlines() if line.startswith("omedge_model_info{")]
    assert len(info) == 1 and 'backend="' in info[0] and 'device="cpu"' in info[0] and info[0].endswith(" 1.0")


# ---------------------------------------------------------------- token, TLS, limits, queue

@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made here."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    d = tmp_path_factory.mktemp("tls")
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return d / "cert.pem", d / "key.pem"


TOKEN = "s3cret-token-0123456789"


@pytest.fixture(scope="module")
def strict(brow_fp32_bundle, certificate):
    with serving([f"brow={brow_fp32_bundle}"], token=TOKEN, tls_cert=certificate[0], tls_key=certificate[1],
                 max_body_mb=1.0, max_queue=1, max_concurrency=1) as s:
        yield s


def https(certificate, token=TOKEN):
    ctx = ssl.create_default_context(cafile=str(certificate[0]))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(verify=ctx, headers=headers, timeout=TIMEOUT)


def tensor_request(x) -> dict:
    """httpx keyword arguments for an infer with `x` as binary tensor data (as tritonclient sends it)."""
    head = json.dumps({"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": list(x.shape),
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    return {"content": head + x.astype("<f4").tobytes(), "headers": {"Inference-Header-Content-Length": str(len(head))}}


def test_tls_and_token(strict, certificate, local, tiles):
    x = local.prepare(str(tiles[0]))
    with https(certificate) as c:
        r = c.post(f"{strict.url}/v2/models/brow/infer", **tensor_request(x))
    assert r.status_code == 200 and r.headers["omedge-manifest-sha256"]
    np.testing.assert_allclose(r.json()["outputs"][0]["data"], local.predict(str(tiles[0]))[0], rtol=1e-5, atol=1e-5)
    for token in (None, "wrong", TOKEN + "x", TOKEN[:-1]):
        with https(certificate, token) as c:
            r = c.get(f"{strict.url}/v2/models/brow")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert "token" in r.json()["error"]
    with pytest.raises(httpx.HTTPError):   # plain HTTP is not served on the TLS port
        httpx.get(f"http://{strict.host}/v2/health/live", timeout=5).raise_for_status()


def test_body_over_the_limit_is_413(strict, certificate):
    big = b"{" + b" " * (1100 * 1024) + b"}"
    with https(certificate) as c:
        assert c.post(f"{strict.url}/v2/models/brow/infer", content=big).status_code == 413

        def chunks():   # no Content-Length: counted while it streams in
            for _ in range(120):
                yield b" " * 10_000
        assert c.post(f"{strict.url}/v2/models/brow/infer", content=chunks()).status_code == 413


@contextmanager
def held(model):
    """Make the model's graph wait until released: a slow request, deterministically."""
    gate, real = threading.Event(), model.predictor.run

    def slow(*a, **k):
        assert gate.wait(TIMEOUT)
        return real(*a, **k)
    model.predictor.run = slow
    try:
        yield gate
    finally:
        gate.set()
        del model.predictor.run


def wait_for(cond, what):
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_queue_full_is_503_with_retry_after(strict, certificate, local, tiles):
    m, x = strict.model("brow"), local.prepare(str(tiles[0]))
    results = {}

    def send(key):
        with https(certificate) as c:
            results[key] = c.post(f"{strict.url}/v2/models/brow/infer", **tensor_request(x))
    with held(m) as gate:
        first = threading.Thread(target=send, args=("running",))
        first.start()
        wait_for(lambda: m.admission.running == 1, "the first request to run")
        second = threading.Thread(target=send, args=("queued",))
        second.start()
        wait_for(lambda: m.admission.waiting == 1, "the second request to queue")
        with https(certificate) as c:
            r = c.post(f"{strict.url}/v2/models/brow/infer", **tensor_request(x))
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert r.headers["omedge-manifest-sha256"] == m.sha256
        gate.set()
        first.join(TIMEOUT)
        second.join(TIMEOUT)
    assert results["running"].status_code == 200 and results["queued"].status_code == 200


def test_graceful_shutdown_finishes_the_running_request(brow_fp32_bundle, local, tiles):
    x = local.prepare(str(tiles[0]))
    with serving([f"brow={brow_fp32_bundle}"]) as s:
        m, result = s.model("brow"), {}

        def send():
            result["r"] = httpx.post(f"{s.url}/v2/models/brow/infer", **tensor_request(x), timeout=TIMEOUT)
        with held(m) as gate:
            t = threading.Thread(target=send)
            t.start()
            wait_for(lambda: m.admission.running == 1, "the request to run")
            s.server.should_exit = True            # what SIGTERM does
            wait_for(lambda: not s.server.servers or not s.server.servers[0].is_serving(), "listening to stop")
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{s.url}/v2/health/live", timeout=5)
            gate.set()
            t.join(TIMEOUT)
        s.thread.join(TIMEOUT)
        assert not s.thread.is_alive()
        assert result["r"].status_code == 200
        np.testing.assert_allclose(result["r"].json()["outputs"][0]["data"], local.predict(str(tiles[0]))[0],
                                   rtol=1e-5, atol=1e-5)


def test_binding_beyond_loopback_needs_a_token(brow_fp32_bundle, tmp_path):
    with pytest.raises(UsageError, match="token"):
        create_app([str(brow_fp32_bundle)], ServeConfig(host="0.0.0.0"))
    import argparse

    from omedge.serve.cli import add_parser, config_from
    ap = argparse.ArgumentParser()
    add_parser(ap.add_subparsers())
    with pytest.raises(UsageError, match="token"):
        config_from(ap.parse_args(["serve", str(brow_fp32_bundle), "--host", "0.0.0.0"]))
    (tmp_path / "token").write_text(TOKEN + "\n")
    cfg = config_from(ap.parse_args(["serve", str(brow_fp32_bundle), "--host", "0.0.0.0",
                                     "--token-file", str(tmp_path / "token")]))
    assert cfg.token == TOKEN and cfg.host == "0.0.0.0"
