"""Issue 12, items 16-17: a backend library's own failures are typed errors, `auto` moves
on to the next verified backend, an interrupt is never "not installed", and an export
never skips a backend's verification silently.

Hostile graphs are written into a copy of a real bundle whose file hashes and manifest
hash are then rewritten, as an attacker with write access would; the libraries are real.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import omedge
import omedge.runtime.plan as plan_module
from omedge.bundle import sha256
from omedge.cli import main
from omedge.errors import BackendUnavailableError, ExportError, InputError
from omedge.manifest import Manifest, write_manifest

REPO = Path(__file__).resolve().parents[2]


def rewritten(bundle: Path, out: Path, edit) -> Path:
    """A copy of `bundle` whose model.onnx went through `edit`, re-hashed so that every
    integrity check passes: only the graph itself is hostile."""
    shutil.copytree(bundle, out)
    model = onnx.load(out / "model.onnx")
    edit(model)
    onnx.save(model, out / "model.onnx")
    data = json.loads((out / "manifest.json").read_text())
    for rel, meta in data["files"].items():
        meta["sha256"], meta["bytes"] = sha256(out / rel), (out / rel).stat().st_size
    write_manifest(out, Manifest.from_dict(data))
    return out


def _ir_99(model):
    model.ir_version = 99


def _fails_when_run(model):
    """The declared output becomes a Reshape to (7, -1), which no batch of 64-wide
    embeddings fits: the graph loads, then fails inside onnxruntime at run time."""
    graph = model.graph
    out = graph.output[0]
    raw = out.name + "_raw"
    for node in graph.node:
        node.output[:] = [raw if o == out.name else o for o in node.output]
    graph.initializer.append(helper.make_tensor("bad_shape", TensorProto.INT64, [2], [7, -1]))
    graph.node.append(helper.make_node("Reshape", [raw, "bad_shape"], [out.name]))
    del out.type.tensor_type.shape.dim[:]


@pytest.fixture(scope="module")
def ir99_bundle(brow_fp32_bundle, tmp_path_factory):
    return rewritten(brow_fp32_bundle, tmp_path_factory.mktemp("ir99") / "b.omedge", _ir_99)


def test_ir_version_99_is_a_typed_error(ir99_bundle, tiles, capsys):
    rc = main(["predict", str(ir99_bundle), str(tiles[0]), "--backend", "onnxruntime", "--device", "cpu"])
    text = capsys.readouterr()
    assert rc == BackendUnavailableError.exit_code, text
    assert "onnxruntime" in text.err and "Traceback" not in text.out + text.err


def test_auto_moves_on_to_the_next_verified_backend(ir99_bundle, tiles, monkeypatch):
    """onnxruntime is tried first (as on an AMD CPU), cannot open the graph, and auto
    goes on to OpenVINO's verified IR, saying why it skipped onnxruntime."""
    monkeypatch.setattr(plan_module, "cpu_info", lambda: {"vendor": "AuthenticAMD"})
    p = omedge.load(ir99_bundle)
    assert p.describe()["backend"] == "openvino"
    assert any(s.startswith("onnxruntime on cpu") and "failed to start" in s for s in p.skipped), p.skipped
    assert p.predict(tiles[:1]).shape == (1, 64)


def test_a_graph_that_fails_at_run_time_is_a_typed_error(brow_fp32_bundle, tiles, tmp_path, capsys):
    bad = rewritten(brow_fp32_bundle, tmp_path / "b.omedge", _fails_when_run)
    rc = main(["predict", str(bad), str(tiles[0]), "--backend", "onnxruntime", "--device", "cpu"])
    text = capsys.readouterr()
    assert rc == BackendUnavailableError.exit_code, text
    assert "failed running" in text.err and "Traceback" not in text.out + text.err


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_an_input_the_graph_refuses_is_an_input_error(brow_fp32_bundle, backend):
    p = omedge.load(brow_fp32_bundle, backend=backend, device="cpu")
    with pytest.raises(InputError, match=f"{backend} refused the input"):
        p.run(np.zeros((1, 3, 8, 8), np.float32))


SWALLOWED = ("import os, signal, time\ntry:\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(30)\n"
             "except KeyboardInterrupt:\n    raise ImportError('initialization failed') from None\n")


def _interrupting(tmp_path: Path, library: str, swallowed: bool = False) -> dict:
    """An environment in which `import <library>` is hit by a real Ctrl-C (SIGINT); with
    `swallowed`, the library turns it into an ImportError, as numpy's and pybind11's module
    initialisation do (seen in CI: "installed but fails to load: initialization failed")."""
    fake = tmp_path / "fake" / library
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(SWALLOWED if swallowed else
                                      "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(30)\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), str(REPO)])}


def _cli(args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omedge.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_ctrl_c_while_importing_the_backend_ends_predict_with_130(brow_fp32_bundle, tiles, tmp_path):
    done = _cli(["predict", str(brow_fp32_bundle), str(tiles[0])], _interrupting(tmp_path, "onnxruntime"))
    text = done.stdout + done.stderr
    assert done.returncode == 130, text
    assert "not installed" not in text and "Traceback" not in text


@pytest.mark.parametrize("swallowed", [False, True])
def test_ctrl_c_while_importing_the_backend_ends_export_with_130(ckpt_dir, tmp_path, swallowed):
    out = tmp_path / "b.omedge"
    done = _cli(["export", "brow", "--weights", str(ckpt_dir / "brow_tiny.pth"), "--format", "onnx", "-o", str(out)],
                _interrupting(tmp_path, "onnxruntime", swallowed))
    text = done.stdout + done.stderr
    assert done.returncode == 130, text
    assert "not installed" not in text and "Traceback" not in text
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".b.omedge")]


def test_sigterm_turned_into_an_import_error_still_ends_export_with_143(ckpt_dir, tmp_path):
    """As seen in CI: SIGTERM during `import onnxruntime` came out as "initialization failed"."""
    fake = tmp_path / "fake" / "onnxruntime"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(SWALLOWED.replace("SIGINT", "SIGTERM").replace("except KeyboardInterrupt",
                                                                                     "except BaseException"))
    out = tmp_path / "b.omedge"
    done = _cli(["export", "brow", "--weights", str(ckpt_dir / "brow_tiny.pth"), "--format", "onnx", "-o", str(out)],
                {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), str(REPO)])})
    assert done.returncode == 143, done.stdout + done.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".b.omedge")]


def test_a_broken_backend_stops_the_export(ckpt_dir, tmp_path, monkeypatch):
    """Installed but failing to load (a missing shared library) is not "not installed":
    exporting on would ship an ONNX artifact that OpenVINO never ran."""
    fake = tmp_path / "fake" / "openvino"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('libopenvino.so.2026: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(fake.parent))
    monkeypatch.delitem(sys.modules, "openvino")
    out = tmp_path / "b.omedge"
    with pytest.raises(ExportError, match="openvino: installed but fails to load: libopenvino"):
        omedge.export("brow", ckpt_dir / "brow_tiny.pth", formats=["onnx"], out=out)
    assert not out.exists()


def test_a_backend_that_is_not_installed_is_named_in_the_manifest(ckpt_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as where the openvino extra is not installed
    out = omedge.export("brow", ckpt_dir / "brow_tiny.pth", formats=["onnx"], out=tmp_path / "b.omedge")
    art = json.loads((out / "manifest.json").read_text())["artifacts"][0]
    assert art["verified_backends"] == ["onnxruntime"]
    record = art["parity"]["backends"]["openvino"]
    assert record["passed"] is False and record["not_verified"].startswith("not installed (openvino)")
    assert "openvino" in art["parity"]["not_verified"]
