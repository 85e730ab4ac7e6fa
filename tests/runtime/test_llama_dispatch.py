"""llama.cpp with runtime CPU dispatch: the variant in use is verified on the model,
named by describe() and `omedge devices`, and a forced baseline variant still runs
(as on a CPU without AVX-512)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from omedge.exporters.llm import export_llm
from omedge.runtime.backends import llama_cpu
from tests.pulse_folders import tiny_bloom

DISPATCH = bool(llama_cpu.cpu_variants())
needs_dispatch = pytest.mark.skipif(not DISPATCH, reason="llama-cpp-python here is a static build (see README)")

RUN = r"""
import json, sys
from omedge.kinds.text_generation import LLMPredictor
p = LLMPredictor(sys.argv[1], logits_all=True)
ids = p.tokenize("hello world, a patient with chest pain")
logits = p.backend.logits(ids)
print("RESULT " + json.dumps({"describe": p.describe(), "logits": logits[-1].tolist(),
                              "text": p.generate("hello", max_tokens=6, temperature=0)}))
"""


@pytest.fixture(scope="module")
def gguf_bundle(tmp_path_factory):
    folder = tiny_bloom(tmp_path_factory.mktemp("dispatch") / "PULSE-7bv5-tiny")
    return export_llm("pulse", folder, quant="Q4_K_M", out=tmp_path_factory.mktemp("b") / "pulse-q4")


def _run(bundle, variant=None, cache=None):
    env = dict(os.environ)
    env.pop(llama_cpu.FORCE_VARIANT, None)
    if variant:
        env[llama_cpu.FORCE_VARIANT] = variant
    if cache:
        env["OMEDGE_CACHE_DIR"] = str(cache)
    r = subprocess.run([sys.executable, "-c", RUN, str(bundle)], capture_output=True, text=True, env=env,
                       timeout=300, check=False)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-2000:]
    return json.loads(lines[0][7:])


@needs_dispatch
def test_auto_choice_is_verified_and_named(gguf_bundle, tmp_path):
    auto = _run(gguf_bundle, cache=tmp_path)
    variant = auto["describe"]["cpu_variant"]
    assert variant in llama_cpu.cpu_variants(), auto["describe"]
    cache = json.loads((tmp_path / "omedge" / "llama-cpu-variants.json").read_text())
    (chosen,) = cache["runs"].values()
    assert chosen == variant
    # the variants skipped on the way really die on this machine (e.g. AMX on a VM that faults)
    for bad in next(iter(cache["failed"].values())):
        env = {**os.environ, llama_cpu.FORCE_VARIANT: bad, "OMEDGE_CACHE_DIR": str(tmp_path)}
        r = subprocess.run([sys.executable, "-c", RUN, str(gguf_bundle)], capture_output=True, text=True, env=env,
                           timeout=300, check=False)
        assert r.returncode != 0, f"{bad} was skipped but runs"
    # it is the best-scored variant that survives: nothing scored higher was skipped without failing
    order = [v for v, score in next(iter(cache["order"].values())) if score > 0]
    assert order.index(variant) == len(next(iter(cache["failed"].values())))


@needs_dispatch
@pytest.mark.parametrize("baseline", ["x64", "haswell"])
def test_forced_baseline_variant_runs_and_agrees(gguf_bundle, tmp_path, baseline):
    """A CPU without AVX-512, simulated by forcing the baseline kernels: same tokens'
    logits as the best variant within quantised-kernel rounding."""
    best = _run(gguf_bundle, cache=tmp_path)
    base = _run(gguf_bundle, variant=baseline, cache=tmp_path)
    assert base["describe"]["cpu_variant"] == baseline
    a, b = np.array(best["logits"]), np.array(base["logits"])
    cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert cos > 0.999, cos
    assert int(a.argmax()) == int(b.argmax())


def test_forcing_an_unknown_variant_is_refused(gguf_bundle, tmp_path):
    env = {**os.environ, llama_cpu.FORCE_VARIANT: "pentium3", "OMEDGE_CACHE_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "omedge.cli", "predict", str(gguf_bundle), "hello"],
                       capture_output=True, text=True, env=env, timeout=300, check=False)
    if DISPATCH:
        assert r.returncode == 7 and "no such CPU variant" in r.stderr + r.stdout, r.stderr[-1500:]
        assert "Traceback" not in r.stderr
    else:  # a static build has one CPU backend: the setting is irrelevant
        assert r.returncode == 0, r.stderr[-1500:]


def test_devices_names_the_kernels_in_use():
    r = subprocess.run([sys.executable, "-m", "omedge.cli", "devices", "--json"], capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-1500:]
    llama = json.loads(r.stdout)["backends"]["llama.cpp"]
    if DISPATCH:
        assert llama["cpu_dispatch"] == llama_cpu.cpu_variants()
        assert "best scored here" in llama["cpu_variant"]
    else:
        assert llama["cpu_variant"].startswith("static build (") and llama["kernel_isa"]
