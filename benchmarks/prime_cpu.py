"""PRIME-650M (official layout, seeded fan-in-scaled random weights) on this CPU: one
sequence of 256 and of 1,024 residues, torch fp32 eager vs every omedge variant, in one
run, each variant in its own process (its own peak RSS, no two runtimes spinning).

Prints p50 latency, sequences/s, speed-up vs torch, peak RSS, the Spearman of all
single-substitution scores against torch fp32, the achieved GFLOP/s and its share of
this machine's measured matmul ceiling, and the CPU's ISA.

    python benchmarks/prime_cpu.py [--lengths 256,1024] [--workdir /tmp/primebench]
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = [  # (bundle name, format, precision, calibration)
    ("fp32", "onnx,openvino", "fp32", None),
    ("int8-dynamic", "onnx,openvino", "int8-dynamic", None),
    ("int8", "onnx,openvino", "int8", "fasta"),
    ("bf16", "openvino", "bf16", None),
]


def gflop(length: int, layers=33, dim=1280, ffn=5120, vocab=33) -> float:
    """Multiply-adds x 2 of one forward: projections, attention scores/mix, FFN, LM head."""
    per_layer = 4 * dim * dim + 2 * dim * ffn + 2 * length * dim
    return 2 * length * (layers * per_layer + dim * dim + dim * vocab) / 1e9


def sequence(length: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return "".join(rng.choice(list("LAGVSERTIDPKQNFYMHWC"), length))


def singles(log_probs: np.ndarray, ids: np.ndarray) -> np.ndarray:
    lp = log_probs[1:-1].astype(np.float64)
    return (lp[:, 4:24] - lp[np.arange(len(lp)), ids[1:-1]][:, None]).ravel()


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _time(fn, runs: int) -> list[float]:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def worker(kind: str, target: str, artifact: str, backend: str, length: int, runs: int, out: str):
    from omedge.io.protein import encode
    ids = encode(sequence(length))[None]
    if kind == "torch":
        import torch

        from omedge.models import get_spec, load
        model = load(get_spec("prime"), target)[0]
        x = torch.from_numpy(ids)
        with torch.inference_mode():
            times = _time(lambda: model(x), runs)
            lp = model(x)["log_probs"][0].numpy()
        info = {"backend": "torch", "threads": torch.get_num_threads(), "precision": "fp32"}
    else:
        import omedge
        p = omedge.load(target, backend=backend, artifact=artifact, device="cpu")
        times = _time(lambda: p.run({"input_ids": ids}, batch_size=1), runs)
        lp = p.run({"input_ids": ids}, batch_size=1)["log_probs"][0]
        d = p.describe()
        info = {"backend": d["backend"], "precision": d.get("inference_precision") or p.artifact.precision,
                "artifact": artifact}
    np.save(out, lp)
    t = np.asarray(times)
    print(json.dumps({**info, "p50_ms": float(np.median(t) * 1000), "p90_ms": float(np.percentile(t, 90) * 1000),
                      "items_s": float(1 / t.mean()), "peak_rss_mb": _rss_mb()}))


def run_worker(*args) -> dict:
    r = subprocess.run([sys.executable, __file__, "--worker", *map(str, args)], capture_output=True, text=True)
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    return json.loads(lines[-1]) if r.returncode == 0 and lines else {"error": (r.stderr or r.stdout)[-300:]}


def export_all(work: Path, weights: Path, variants) -> dict:
    import omedge
    (work / "calib.fasta").write_text("".join(f">s{i}\n{sequence(200, seed=100 + i)}\n" for i in range(12)))
    bundles = {}
    for name, formats, precision, calib in variants:
        out = work / f"prime-{name}.omedge"
        t = time.perf_counter()
        try:
            omedge.export("prime", weights, formats=formats.split(","), precision=precision, verify_size=4,
                          calib=work / "calib.fasta" if calib else None, out=out, overwrite=True, force=True)
            bundles[name] = (out, time.perf_counter() - t)
        except Exception as e:  # noqa: BLE001 - report and go on with the other variants
            print(f"export {name} failed: {e}")
    return bundles


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="256,1024")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--workdir")
    ap.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    ap.add_argument("--reuse", action="store_true", help="time the bundles already in --workdir")
    ap.add_argument("--worker", nargs=7)
    args = ap.parse_args()
    if args.worker:
        kind, target, artifact, backend, length, runs, out = args.worker
        return worker(kind, target, artifact, backend, int(length), int(runs), out)
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.vit_cpu import matmul_ceiling
    from omedge.devices import cpu_info
    from omedge.io.protein import encode
    from omedge.manifest import read_manifest
    from omedge.models import prime
    from omedge.parity import spearman
    from tests.models.test_prime import synth_official
    work = Path(args.workdir or tempfile.mkdtemp(prefix="primebench-"))
    work.mkdir(parents=True, exist_ok=True)
    weights = work / "prime.pt"
    if not weights.exists():
        torch.save(synth_official("lm", seed=0, **prime.SIZES["650M"]), weights)
    wanted = [v for v in VARIANTS if v[0] in args.variants.split(",")]
    if not any(isa in cpu_info()["isa"] for isa in ("AVX512-BF16", "AMX")):  # emulated bf16 is ~100x slower
        wanted = [v for v in wanted if v[0] != "bf16"]
    bundles = {name: (work / f"prime-{name}.omedge", 0.0) for name, *_ in wanted
               if (work / f"prime-{name}.omedge").is_dir()} if args.reuse else export_all(work, weights, wanted)
    cpu = cpu_info()
    ceiling = matmul_ceiling(torch.get_num_threads())
    print(f"\nCPU: {cpu['model']}, {cpu['usable_cores']} cores, ISA {', '.join(cpu['isa'])}")
    print("matmul ceiling (torch): " + ", ".join(f"{k} {v:.0f} G(FL)OP/s" for k, v in ceiling.items()))
    for name, (b, secs) in bundles.items():
        m = read_manifest(b)
        print(f"export {name}: {secs:.0f} s, " + "; ".join(
            f"{a.name} spearman {a.parity['outputs']['log_probs']['spearman_min']:.4f} "
            f"({'pass' if a.parity['passed'] else 'FAIL'})" for a in m.artifacts))
    for length in map(int, args.lengths.split(",")):
        ids = encode(sequence(length))
        base = run_worker("torch", weights, "-", "-", length, args.runs, work / "torch.npy")
        ref = np.load(work / "torch.npy")
        rows = [("torch fp32 eager", base, 1.0)]
        for name, (b, _) in bundles.items():
            for a in read_manifest(b).artifacts:
                for backend in a.verified_backends:
                    r = run_worker("bundle", b, a.name, backend, length, args.runs, work / "got.npy")
                    if "error" not in r:
                        r["spearman"] = spearman(singles(ref, ids), singles(np.load(work / "got.npy"), ids))
                    rows.append((f"{a.name} on {backend}", r, None))
        print(f"\nPRIME-650M, one sequence of {length} residues ({gflop(length):.0f} GFLOP per pass)")
        print(f"{'variant':34s} {'exec':6s} {'p50 ms':>8s} {'seq/s':>7s} {'vs torch':>8s} {'RSS MB':>7s} "
              f"{'Spearman':>8s} {'GFLOP/s':>8s} {'of ceiling':>10s}")
        for label, r, _ in rows:
            if "error" in r:
                print(f"{label:34s} ERROR {r['error'][:120]}")
                continue
            prec = r.get("precision", "fp32")
            cls = "int8" if "int8" in label else ("bf16" if prec == "bf16" else "fp32")
            g = gflop(length) * r["items_s"]
            print(f"{label:34s} {prec:6s} {r['p50_ms']:8.1f} {r['items_s']:7.2f} "
                  f"{r['items_s'] / base['items_s']:7.2f}x {r['peak_rss_mb']:7.0f} "
                  f"{r.get('spearman', 1.0):8.4f} {g:8.0f} {g / ceiling[cls]:9.0%}")


if __name__ == "__main__":
    main()
