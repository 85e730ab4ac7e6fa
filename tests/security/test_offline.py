"""Issue 12, items 5-6: nothing phones home, whatever the caller imported first.

Each check is a real predict or export in a subprocess, with HOME and TMPDIR in temp
folders, traced by strace (and without a network where `unshare -n` works, so a leak
fails fast instead of leaving the machine). The subprocess first imports what the
"caller" imports, waits until that import's own telemetry is sent, then marks the trace
and starts omedge: after the mark there must be no connect() to anything but a unix
socket or loopback, and no file may appear or change under HOME or TMPDIR.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MARK = "/omedge-offline-test-mark"
CONNECT = re.compile(r"^\d+\s+connect\(\d+, \{sa_family=(AF_\w+)(.*)$")
LOCAL = ("127.", "::1", "::ffff:127.")

SCRIPT = textwrap.dedent("""
    import importlib, json, os, sys, time

    def drain():  # wait until openvino_telemetry has sent what it queued (its own counter)
        tm = sys.modules.get("openvino_telemetry")
        inst = tm and getattr(tm.Telemetry, "_SingletonMetaClass__single_instance", None)
        end = time.time() + 15
        while inst is not None and inst.sender.queue_size and time.time() < end:
            time.sleep(0.05)

    def files():
        out = {}
        for root in (os.environ["HOME"], os.environ["TMPDIR"]):
            for d, _, names in os.walk(root):
                for n in names:
                    p = os.path.join(d, n)
                    st = os.lstat(p)
                    out[p] = [st.st_size, st.st_mtime_ns]
        return out

    job = json.loads(sys.argv[1])
    for name in job["caller_imports"]:
        importlib.import_module(name)
    drain()
    before = files()
    try:  # the mark in the trace (a failed openat): omedge starts here
        os.open(MARK_PATH, os.O_RDONLY)
    except OSError:
        pass
    import omedge
    exec(job["code"])
    drain()
    json.dump({"before": before, "after": files()}, open(job["report"], "w"))
""").replace("MARK_PATH", repr(MARK))


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def tracer():
    if not shutil.which("strace") or not _works(["strace", "-f", "-qq", "-e", "trace=connect", "-o", os.devnull,
                                                  "true"]):
        pytest.skip("strace is not usable here (not installed, or ptrace is not permitted)")
    prefix = ["unshare", "-n"] if shutil.which("unshare") and _works(["unshare", "-n", "true"]) else []
    fast = ["--seccomp-bpf"] if _works(["strace", "-f", "--seccomp-bpf", "-qq", "-o", os.devnull, "true"]) else []
    return [*prefix, "strace", "-f", *fast, "-qq", "-e", "trace=connect,openat"]


def traced(tracer, tmp_path: Path, code: str, caller_imports=()) -> dict:
    """Run `code` after `import omedge` in a traced subprocess; return what it did after the mark."""
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    report, trace = tmp_path / "report.json", tmp_path / "trace.txt"
    job = {"caller_imports": list(caller_imports), "code": code, "report": str(report)}
    # CI / TF_BUILD / JENKINS_URL switch OpenVINO's telemetry off by themselves: drop them, so the
    # child behaves as on a user's workstation (where the telemetry is on unless omedge stops it)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORT_", "PYTEST", "NNCF"))
           and k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    env.update(HOME=str(home), TMPDIR=str(tmp), PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([*tracer, "-o", str(trace), sys.executable, "-c", SCRIPT, json.dumps(job)],
                          env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = trace.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if MARK in line)
    remote = []
    for line in lines[start:]:
        m = CONNECT.match(line)
        if m and m.group(1) in ("AF_INET", "AF_INET6") and not _local(m.group(2)):
            remote.append(line)
    files = json.loads(report.read_text())
    changed = sorted(p for p, st in files["after"].items() if files["before"].get(p) != st)
    return {"connects": remote, "changed": changed, "before": sorted(files["before"])}


def _local(rest: str) -> bool:
    addr = re.search(r'inet_(?:addr|pton)\((?:AF_INET6?, )?"([^"]+)"', rest)
    return bool(addr) and addr.group(1).startswith(LOCAL)


def test_probe_export_and_predict_send_nothing(tracer, tmp_path, ckpt_dir, tiles):
    """omedge imports the libraries itself. Device probes first (they import both backends
    before any export set anything up), then an export (ONNX and OpenVINO conversion,
    verification on both backends), then a predict on each backend. Before the fix:
    onnxruntime's files at its import (and a DNS lookup ~10 s later), OpenVINO's client-id
    file and event at `import openvino`."""
    out = tmp_path / "b.omedge"
    code = (f"from omedge.devices import inventory\nfrom omedge.runtime.plan import backend_report\n"
            f"inventory(); backend_report()\n"
            f"omedge.export('brow', {str(ckpt_dir / 'brow_tiny.pth')!r}, formats=['onnx', 'openvino'], "
            f"out={str(out)!r})\n"
            f"for b in ('onnxruntime', 'openvino'):\n"
            f"    p = omedge.load({str(out)!r}, backend=b)\n"
            f"    assert p.describe()['backend'] == b\n"
            f"    p.predict({str(tiles[0])!r})\n")
    done = traced(tracer, tmp_path, code)
    assert done["connects"] == [], f"{len(done['connects'])} connects: {done['connects'][:3]}"
    assert done["changed"] == [], "telemetry files written: " + ", ".join(done["changed"])


def test_caller_imported_openvino_and_nncf_first(tracer, tmp_path, ckpt_dir, tiles):
    """The caller's own `import openvino, nncf` already started their telemetry (that part
    is theirs); from the moment omedge is used, an INT8 export (OpenVINO conversion, NNCF
    and onnxruntime quantization) and a predict on OpenVINO add no event and touch no
    telemetry file. Before the fix: about 30 attempts to reach the analytics host."""
    out = tmp_path / "b.omedge"
    code = (f"omedge.export('brow', {str(ckpt_dir / 'brow_tiny.pth')!r}, formats=['onnx', 'openvino'], "
            f"precision='int8', calib={str(tiles[0].parent)!r}, calib_size=8, verify_size=4, "
            f"out={str(out)!r}, force=True)\n"
            f"p = omedge.load({str(out)!r}, backend='openvino')\n"
            f"p.predict({str(tiles[0])!r})\n")
    done = traced(tracer, tmp_path, code, caller_imports=("openvino", "nncf"))
    assert any(p.endswith("openvino_ga_cid") for p in done["before"]), \
        "the caller's import wrote no client id: this check no longer sees OpenVINO's telemetry"
    assert done["connects"] == [], f"{len(done['connects'])} connects after omedge started: {done['connects'][:3]}"
    assert done["changed"] == [], "telemetry files written: " + ", ".join(done["changed"])


def test_importing_omedge_changes_nothing_global():
    """DESIGN rule 8: the opt-outs run where omedge calls a library, not at import."""
    code = ("import os, sys\nbefore = dict(os.environ)\n"
            "import omedge, omedge.runtime, omedge.exporters, omedge.cli, omedge.devices\n"
            "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())\n"
            "assert not {'openvino_telemetry', 'onnxruntime', 'openvino', 'nncf'} & set(sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORT_", "HF_", "TRANSFORMERS_"))}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
