"""Endo-FM (TimeSformer-B/16, one 8x224x224 clip) on this CPU, one run, seeded random weights.

Rows, each with its ratio to torch fp32 eager on the same module: torch bf16 autocast,
torch.compile (--compile), plain OpenVINO on the bundle's own IR with the THROUGHPUT hint
(what OpenVINO alone gives, without omedge), and every omedge variant of the fp32 and INT8
bundles. The ISA is printed first: fp32 ratios mean little without it (AMX runs the INT8
and bf16 rows; fp32 is sgemm-bound on every backend).

    flock /tmp/h/bench.lock python benchmarks/endofm_cpu.py --threads 2 --bundles /tmp/efm-bundles
"""
import json
import time
from pathlib import Path

import numpy as np

import omedge
from benchmarks.common import bench_arguments
from omedge.bench import add_ratios, bench_bundle, bench_torch
from omedge.cli import bench_table, out
from omedge.devices import cpu_info
from omedge.manifest import read_manifest
from omedge.parity import load_samples

MODEL = "endo-fm"
FORMATS = {"fp32": ("onnx", "openvino"), "int8": ("openvino",), "bf16": ("openvino",)}


def bundle_for(folder: Path, precision: str) -> Path:
    """The bundle of that precision in `folder`, exported (random weights, seed 0) if absent."""
    path = folder / f"{MODEL}-{precision}.omedge"
    if not (path / "manifest.json").exists():
        print(f"exporting {path.name} ({', '.join(FORMATS[precision])})")
        omedge.export(MODEL, random_weights=True, formats=FORMATS[precision], precision=precision, out=path,
                      overwrite=True, force=True, **({"calib": "synthetic", "calib_size": 16}
                                                     if precision == "int8" else {}))
    return path


def _row(variant: str, backend: str, times: list[float], items: int = 1, **runtime) -> dict:
    t = np.asarray(times) * 1000 / items
    return {"variant": variant, "backend": backend, "artifact": "-", "size_mb": 0.0, "peak_rss_mb": 0.0,
            "parity": None, "runtime": {"backend": backend, "device": "cpu", **runtime},
            "p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99)),
            "throughput": float(1000 / t.mean())}


def _clip(bundle: Path) -> np.ndarray:
    """The bundle's first stored verification clip."""
    inputs, _ = load_samples(np.load(bundle / "parity.npz", allow_pickle=False))
    return next(iter(inputs[0].values()))


def torch_rows(clip: np.ndarray, threads: int, runs: int, compile_too: bool) -> list[dict]:
    """bf16 autocast and torch.compile on the module torch fp32 eager ran (same seed)."""
    import torch

    from omedge.models import build, get_spec
    if threads:
        torch.set_num_threads(threads)
    model, x = build(get_spec(MODEL), "B", seed=0).eval(), torch.from_numpy(clip)
    rows = []

    def timed(fn):
        fn()
        return [_t(fn) for _ in range(runs)]
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rows.append(_row("torch bf16 autocast", "torch", timed(lambda: model(x)), threads=threads or "auto"))
        if compile_too:
            try:
                compiled = torch.compile(model)
                start = time.perf_counter()
                compiled(x)
                print(f"torch.compile: first call {time.perf_counter() - start:.0f} s")
                rows.append(_row("torch fp32 compile", "torch", timed(lambda: compiled(x)), threads=threads or "auto"))
            except (RuntimeError, OSError, ImportError) as e:  # inductor needs a C++ compiler: say so
                rows.append({"variant": "torch fp32 compile", "backend": "torch", "error": str(e)[:110]})
    return rows


def _t(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def plain_openvino(bundle: Path, clip: np.ndarray, threads: int, clips: int) -> dict:
    """OpenVINO alone on the bundle's IR: THROUGHPUT hint, its own number of requests in flight."""
    import openvino as ov

    from omedge.runtime.backends.ov import precision_name
    art = next(a for a in read_manifest(bundle).artifacts if a.format == "openvino")
    config = {"PERFORMANCE_HINT": "THROUGHPUT", **({"INFERENCE_NUM_THREADS": threads} if threads else {}),
              **({"INFERENCE_PRECISION_HINT": "f32"} if art.precision == "fp32" else {})}
    compiled = ov.Core().compile_model(str(bundle / art.entry), "CPU", config)
    queue = ov.AsyncInferQueue(compiled)
    for _ in range(len(queue)):  # warm every request
        queue.start_async({0: clip})
    queue.wait_all()
    start = time.perf_counter()
    for _ in range(clips):
        queue.start_async({0: clip})
    queue.wait_all()
    took = time.perf_counter() - start
    return _row(f"plain openvino {art.precision} (throughput)", "openvino", [took], items=clips,
                inference_precision=precision_name(compiled.get_property("INFERENCE_PRECISION_HINT")),
                streams=int(compiled.get_property("NUM_STREAMS")))


def main():
    ap = bench_arguments(runs=4, seconds=6, precisions="fp32,int8", description=__doc__)
    ap.add_argument("--bundles", default="endofm-bundles", help="folder of the bundles (exported if missing)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (minutes to compile)")
    ap.add_argument("--clips", type=int, default=8, help="clips per plain-OpenVINO throughput run")
    args = ap.parse_args()
    info = cpu_info()
    print(f"CPU: {info['model']}, {info.get('physical_cores')} cores, ISA {' '.join(info['isa'])}, "
          f"threads {args.threads or 'auto'}")
    folder = Path(args.bundles)
    bundles = {p: bundle_for(folder, p) for p in args.precisions.split(",")}
    first = next(iter(bundles.values()))
    rows = [bench_torch(MODEL, "B", None, 0, 1, args.runs, 1, args.seconds, args.threads, first)]
    clip = _clip(first)
    rows += torch_rows(clip, args.threads, args.runs, args.compile)
    for b in bundles.values():
        rows += bench_bundle(b, runs=args.runs, warmup=1, seconds=args.seconds, threads=args.threads)
        rows.append(plain_openvino(b, clip, args.threads, args.clips))
    rows = add_ratios(rows)
    out.print(bench_table(rows, 1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": info, "rows": rows}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
