"""PULSE-shaped decode on this CPU, one run: which llama.cpp build and which generation
loop reach the machine's memory-bandwidth bound.

For each llama-cpp-python build given (`--build NAME=DIR`, DIR holding a `llama_cpp`
package; default: the one installed), each in its own process:
- prompt processing tok/s (96 tokens) and decode tok/s of the library's own loop
  (`Llama.generate`, greedy), i.e. what a user of the library gets;
- decode tok/s of omedge's generation loop (`omedge.load(bundle).generate(stream=True)`,
  greedy), on the same GGUF: the ratio is omedge's own per-token overhead;
- the CPU variant the build really loaded (read from /proc/self/maps).
Then the bound: model bytes read per token / measured read bandwidth.

    python benchmarks/llm_dispatch_cpu.py --workdir /tmp/llmbench \\
        --build avx2=/path/site-packages --build dispatch=/tmp/llwheel/site
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORKER = r"""
import json, sys, time
from pathlib import Path
bundle, n_new, reps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
import omedge
from omedge.runtime.backends import llama as L
p = omedge.load(bundle)
llm = p.backend.llm
prompt = (p.tokenize("患者男，65岁，反复胸闷气短两周，活动后加重。请问需要做哪些检查？ chest pain on exertion.") * 8)[:96]

def prefill():
    llm.reset(); t = time.perf_counter(); llm.eval(prompt); return len(prompt) / (time.perf_counter() - t)

def library():
    times = []
    t = time.perf_counter()
    for tok in llm.generate(prompt, temp=0, reset=True):
        times.append(time.perf_counter() - t)
        if len(times) >= n_new:
            break
    return (len(times) - 1) / (times[-1] - times[0])

def ours():
    # omedge's loop as users run it (detokenise, answer marker, pieces): the time between
    # tokens leaving the backend includes the loop's work on the one before
    times, orig = [], p.backend.generate
    def counting(ids, sampling):
        for tok in orig(ids, sampling):
            times.append(time.perf_counter())
            yield tok
    p.backend.generate = counting
    try:
        for _ in p._stream(prompt, n_new, {"temperature": 0}):
            pass
    finally:
        p.backend.generate = orig
    return (len(times) - 1) / (times[-1] - times[0])

prefill(); library()  # warm-up
rows = {"prompt_tok_s": [], "library_decode_tok_s": [], "omedge_decode_tok_s": []}
for _ in range(reps):  # interleaved: a shared machine's noise hits both loops alike
    rows["prompt_tok_s"].append(prefill())
    rows["library_decode_tok_s"].append(library())
    rows["omedge_decode_tok_s"].append(ours())
out = {k: sorted(v)[len(v) // 2] for k, v in rows.items()}
out["cpu_variant"] = L.cpu_variant_in_use()
out["system_info"] = L.system_info()
print("RESULT " + json.dumps(out))
"""


def read_bandwidth_gbs(mb: int = 1024, trials: int = 5) -> float:
    """Best single-pass read bandwidth through numpy (sum of a 1 GB array, 1 thread): a
    lower bound of what the decode loop's matmul threads can stream together."""
    a = np.ones(mb * (1 << 20) // 8)
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text()
    flags = set(text.split("flags")[1].split("\n")[0].split())
    keep = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "avx_vnni"]
    return " ".join(f for f in keep if f in flags)


def make_bundle(work: Path, size: str) -> Path:
    from benchmarks.pulse_cpu import make
    from omedge.exporters.llm import export_llm
    bundle = work / f"bloom-{size}-q4.omedge"
    if not bundle.exists():
        export_llm("pulse", make(work / f"bloom-{size}", size), quant="Q4_K_M", out=bundle, log=print)
    return bundle


def run_build(name: str, site: str | None, bundle: Path, n_new: int, reps: int, env_extra: dict) -> dict:
    env = {**os.environ, **env_extra}
    if site:
        env["PYTHONPATH"] = os.pathsep.join([site, str(ROOT)])
    res = subprocess.run([sys.executable, "-c", WORKER, str(bundle), str(n_new), str(reps)],
                         capture_output=True, text=True, env=env, timeout=1800, check=False)
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        return {"error": (res.stderr or res.stdout)[-400:]}
    return json.loads(line[0][7:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir")
    ap.add_argument("--size", default="300M", choices=["300M", "1.2B"])
    ap.add_argument("--build", action="append", default=[], help="NAME=DIR with a llama_cpp package (repeat)")
    ap.add_argument("--force-variant", action="append", default=[],
                    help="also run build NAME with OMEDGE_GGML_CPU_VARIANT=V: NAME:V (repeat)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="omedge-llm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    bundle = make_bundle(work, args.size)
    gguf_bytes = sum(f.stat().st_size for f in bundle.glob("*.gguf"))
    builds = dict(b.split("=", 1) for b in args.build) or {"installed": None}
    runs = [(n, d, {}) for n, d in builds.items()]
    runs += [(f"{n} forced {v}", builds[n], {"OMEDGE_GGML_CPU_VARIANT": v})
             for n, v in (f.split(":", 1) for f in args.force_variant)]
    rows = {label: run_build(label, site, bundle, args.new_tokens, args.repeats, env) for label, site, env in runs}
    bw = read_bandwidth_gbs()
    bound = bw * 1e9 / gguf_bytes
    print(f"\nCPU: {cpu_flags()}; {os.cpu_count()} cores; read bandwidth {bw:.1f} GB/s (numpy, 1 thread); "
          f"model {gguf_bytes / 1e6:.0f} MB Q4_K_M -> decode bound {bound:.0f} tok/s")
    print(f"{'build':26s} {'CPU variant':18s} {'prompt tok/s':>12s} {'library tok/s':>13s} {'omedge tok/s':>12s} "
          f"{'omedge/lib':>10s} {'of bound':>8s}")
    for label, r in rows.items():
        if "error" in r:
            print(f"{label:26s} ERROR {r['error']}")
            continue
        print(f"{label:26s} {r['cpu_variant'][:18]:18s} {r['prompt_tok_s']:12.1f} {r['library_decode_tok_s']:13.1f} "
              f"{r['omedge_decode_tok_s']:12.1f} {r['omedge_decode_tok_s'] / r['library_decode_tok_s']:10.2f} "
              f"{r['omedge_decode_tok_s'] / bound:8.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "bandwidth_gbs": bw, "bound_tok_s": bound,
                                               "gguf_bytes": gguf_bytes}, indent=2))


if __name__ == "__main__":
    main()
