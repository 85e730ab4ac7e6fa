"""`omedge pack`: a kit for this machine is unpacked and installed into a fresh venv with
the network blocked (its own network namespace, `unshare -rn`), then predicts as the
in-process API does. pip downloads the wheels from the index (and its cache) here.
Bad input: a target with no wheel for a package, a wheel modified after packing, a
bundle that fails its hash check, an output that exists."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from omedge.pack import PLATFORMS, host_platform, target

PY = f"{sys.version_info[0]}.{sys.version_info[1]}"
CP = f"cp{sys.version_info[0]}{sys.version_info[1]}"
pytestmark = pytest.mark.skipif(host_platform() not in PLATFORMS or os.name != "posix",
                                reason="the kit's install.sh is tested on Linux / macOS")


def run(cmd, **kw):
    return subprocess.run(list(map(str, cmd)), check=False, capture_output=True, text=True, **kw)


def omedge(*args, env=None):
    return run([sys.executable, "-m", "omedge.cli", *args], env=env)


def _unshare_works() -> bool:
    try:
        return shutil.which("unshare") is not None and \
            run(["unshare", "-rn", "true"]).returncode == 0
    except OSError:
        return False


UNSHARE = _unshare_works()


def offline(cmd, **kw):
    """Run with no network: a new network namespace (only loopback, down), or else every
    proxy pointed at a closed port, so any attempt would fail loudly."""
    if UNSHARE:
        return run(["unshare", "-rn", *cmd], **kw)
    closed = "http://127.0.0.1:9"
    env = {**kw.pop("env", os.environ), "HTTP_PROXY": closed, "HTTPS_PROXY": closed, "ALL_PROXY": closed,
           "NO_PROXY": ""}
    return run(cmd, env=env, **kw)


@pytest.fixture(scope="module")
def kit(tmp_path_factory, brow_bundle):
    d = tmp_path_factory.mktemp("kit")
    r = omedge("pack", brow_bundle, "--backend", "onnxruntime", "-o", d / "brow-kit.tar", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "brow-kit.tar", json.loads(r.stdout)


def unpack(tar_path: Path, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")   # the strict filter: it raises on links or paths outside
    return into / "brow-kit"


@pytest.mark.slow   # ~50 s: a real venv and pip install of the whole run side (numpy, onnxruntime, ...)
def test_kit_installs_offline_and_predicts(kit, brow_bundle, tiles, tmp_path):
    tar_path, record = kit
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
    assert all(m.isfile() or m.isdir() for m in members)   # no links, devices, fifos
    assert all(m.name == "brow-kit" or m.name.startswith("brow-kit/") and ".." not in m.name.split("/")
               for m in members)
    names = {m.name for m in members}
    assert {"brow-kit/install.sh", "brow-kit/requirements.lock", "brow-kit/kit.json",
            "brow-kit/bundles/brow-int8.omedge/manifest.json"} <= names
    assert next(m for m in members if m.name == "brow-kit/install.sh").mode & 0o111
    wheels = {w["name"] for w in record["wheels"]}
    assert {"omedge", "numpy", "onnxruntime", "pillow", "rich"} <= wheels
    assert not wheels & {"torch", "nncf", "transformers", "openvino"}
    assert record["backends"] == ["onnxruntime"] and record["python"] == PY

    root = unpack(tar_path, tmp_path / "site")
    lock = (root / "requirements.lock").read_text()
    for w in record["wheels"]:   # every wheel pinned with the hash of the file in the kit
        import hashlib
        digest = hashlib.sha256((root / "wheels" / w["file"]).read_bytes()).hexdigest()
        assert f"{w['name']}=={w['version']} --hash=sha256:{digest}" in lock

    venv = tmp_path / "venv"
    r = offline([root / "install.sh", venv], env={**os.environ, "PYTHON": sys.executable}, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "pass" in r.stdout and "hashes: ok" in r.stdout
    assert not any(s in r.stdout + r.stderr for s in ("Retrying", "NewConnectionError", "ProxyError"))
    torch_there = run([venv / "bin" / "python", "-c", "import importlib.util as u; print(u.find_spec('torch'))"])
    assert torch_there.stdout.strip() == "None"

    import omedge
    p = omedge.load(brow_bundle, backend="onnxruntime")
    expected = p.predict([str(tiles[3])])[0]
    r = offline([venv / "bin" / "omedge", "predict", root / "bundles" / "brow-int8.omedge", tiles[3],
                 "--backend", "onnxruntime", "--json"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.asarray(json.loads(r.stdout)["results"][0][p.manifest.primary_output])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_modified_wheel_fails_the_hash_check_and_installs_nothing(kit, tmp_path):
    root = unpack(kit[0], tmp_path / "site")
    wheel = next((root / "wheels").glob("rich-*.whl"))
    with zipfile.ZipFile(wheel, "a") as z:   # still a valid wheel, with one more module in it
        z.writestr("rich/_injected.py", "print('not from the kit')\n")
    venv = tmp_path / "venv"
    r = offline([root / "install.sh", venv], env={**os.environ, "PYTHON": sys.executable}, timeout=300)
    assert r.returncode == 8, r.stdout + r.stderr
    assert "DO NOT MATCH THE HASHES" in r.stderr and "rich" in r.stderr
    assert "nothing was installed" in r.stderr
    assert not venv.exists()


def fake_wheel(folder: Path, name: str, version: str, tag: str, requires=()) -> Path:
    """A minimal wheel with real metadata, as `pip wheel` would name it."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-{tag}.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + \
        "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", meta)
        z.writestr(f"{dist}.dist-info/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: {tag}\n")
        z.writestr(f"{name.replace('-', '_')}/__init__.py", "")
    return path


def test_platform_without_a_wheel_names_the_package_and_wheel_adds_it(brow_bundle, tmp_path):
    out = tmp_path / "llm-kit.tar"
    r = omedge("pack", brow_bundle, "--backend", "onnxruntime", "--extra", "llm", "-o", out)
    assert r.returncode == 4, r.stderr
    assert "llama-cpp-python" in r.stderr and "--wheel" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no half kit

    tag = f"{CP}-{CP}-{target().tags[0]}"
    built = fake_wheel(tmp_path, "llama-cpp-python", "0.3.9", tag)
    r = omedge("pack", brow_bundle, "--backend", "onnxruntime", "--extra", "llm", "--wheel", built, "-o", out,
               "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads(r.stdout)
    import hashlib
    entry = next(w for w in record["wheels"] if w["name"] == "llama-cpp-python")
    assert entry["sha256"] == hashlib.sha256(built.read_bytes()).hexdigest()
    assert "llm" in record["extras"] and "gguf" in {w["name"] for w in record["wheels"]}


def test_bundle_failing_its_hash_check_is_refused_before_packing(brow_bundle, tmp_path):
    bundle = tmp_path / "brow-int8.omedge"
    shutil.copytree(brow_bundle, bundle)
    with open(bundle / "model-int8.onnx", "ab") as f:
        f.write(b"\0")
    out = tmp_path / "kit.tar"
    r = omedge("pack", bundle, "-o", out)
    assert r.returncode == 8, r.stderr
    assert "model-int8.onnx" in r.stderr and "integrity" in r.stderr
    assert not out.exists()


def test_unsigned_bundle_refused_where_the_site_trusts_keys(brow_bundle, tmp_path):
    from omedge.signing import generate_key
    _, pub = generate_key(tmp_path / "site")
    r = omedge("pack", brow_bundle, "-o", tmp_path / "kit.tar", env={**os.environ, "OMEDGE_TRUSTED_KEYS": str(pub)})
    assert r.returncode == 8 and "not signed" in r.stderr, r.stderr
    assert not (tmp_path / "kit.tar").exists()


def test_existing_output_refused_without_overwrite(brow_bundle, tmp_path):
    out = tmp_path / "kit.tar"
    out.write_bytes(b"someone's file")
    r = omedge("pack", brow_bundle, "-o", out)
    assert r.returncode == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr
    r = omedge("pack", brow_bundle, "-o", out, "--overwrite")   # not a tar: never replaced
    assert r.returncode == 2 and "not a kit" in r.stderr
    assert out.read_bytes() == b"someone's file"


@pytest.mark.parametrize("args, text", [
    (["--platform", "solaris-sparc"], "unknown --platform"),
    (["--python", "2.7"], "--python"),
    (["--backend", "tensorrt"], "unknown backend"),
    (["--backend", "llama.cpp"], "no artifact verified on llama.cpp"),
    (["--extra", "export"], "no run-side extra export"),
])
def test_bad_arguments_are_usage_errors(brow_bundle, tmp_path, args, text):
    r = omedge("pack", brow_bundle, "-o", tmp_path / "kit.tar", *args)
    assert r.returncode == 2 and text in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_interrupted_pack_leaves_no_half_kit(brow_bundle, tmp_path):
    """SIGTERM while pip downloads: exit 143, no kit, no partial folder; a dead pack's
    leftover is removed by the next pack of the same kit."""
    import signal
    import time
    stale = tmp_path / ".kit.tar.partial-4999999-abc"   # a PID above pid_max: its writer is gone
    (stale / "wheels").mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-m", "omedge.cli", "pack", str(brow_bundle), "-o",
                             str(tmp_path / "kit.tar")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any((p / "given").exists() for p in tmp_path.glob(".kit.tar.partial-*") if p != stale):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    assert not stale.exists()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert list(tmp_path.iterdir()) == []


def test_dependencies_only_the_target_needs_are_found(tmp_path):
    """pip evaluates markers for this machine; the kit for Windows still needs colorama."""
    from omedge.pack import _missing_for_target
    fake_wheel(tmp_path, "omedge", "0.2.0", "py3-none-any", ["tqdm>=4", 'pyyaml; extra == "llm"'])
    fake_wheel(tmp_path, "tqdm", "4.67.1", "py3-none-any", ['colorama; platform_system == "Windows"'])
    assert _missing_for_target(tmp_path, target("win-amd64", PY), []) == ["colorama"]
    assert _missing_for_target(tmp_path, target("linux-x86_64", PY), []) == []
    assert _missing_for_target(tmp_path, target("linux-x86_64", PY), ["llm"]) == ["pyyaml"]
