"""Endoscopy and ultrasound streams on this CPU, in one run (seeded random weights):

1. Endo-FM (TimeSformer-B, 8x224x224 clip): every omedge variant vs torch fp32 eager,
   p50/p99 latency per clip;
2. ultrasound frame classifier (DeblurringMIM ConvMAE-B, 224): frames/s of each variant
   (latency and throughput modes) and top-1 agreement with fp32;
3. streaming: a 30 fps live source feeding each model's best bundle for a while:
   end-to-end latency (frame in -> result out) p50/p99 and frames dropped.

--models / --precisions / --formats narrow the run (e.g. ConvMAE alone, OpenVINO bf16 and
int8); --reuse DIR benches the bundles DIR already holds ({model}-{precision}.omedge, from an
earlier run with --keep DIR or `omedge export`) instead of exporting them again.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import omedge
from omedge.bench import add_ratios, bench_bundle, bench_model, bench_torch
from omedge.cli import bench_table, out


def live_source(seconds: float, fps: float = 30.0, size=(480, 640)):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
    start = time.perf_counter()
    for i in range(int(seconds * fps)):
        delay = start + i / fps - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        frame = np.kron(np.roll(base, i, axis=1), np.ones((8, 8, 1), np.uint8))
        yield i / fps, frame


def stream_30fps(bundle: Path, seconds: float, stride=None) -> dict:
    p = omedge.load(bundle, mode="throughput")
    lat = [r["latency_ms"] for r in p.stream(live_source(seconds), stride=stride, queue_size=4, drop="oldest")]
    s = p.last_stream_stats
    return {"bundle": bundle.name, "artifact": p.describe()["artifact"], "results": len(lat),
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "frames_in": s["frames_in"], "dropped": s["dropped"], "used": s["frames_used"]}


TITLES = {"endo-fm": "Endo-FM 8x224x224 clip", "deblurring-convmae": "ConvMAE-B 224 frame"}
STRIDES = {"endo-fm": 1, "deblurring-convmae": None}


def reused_rows(model: str, folder: Path, precisions, args) -> list[dict]:
    """The bundles an earlier run left in `folder`, benched as bench_model benches its exports."""
    bundles = [folder / f"{model}-{p}.omedge" for p in precisions if (folder / f"{model}-{p}.omedge").is_dir()]
    if not bundles:
        raise SystemExit(f"--reuse: no {model}-{{{','.join(precisions)}}}.omedge in {folder}")
    rows = [r for b in bundles for r in bench_bundle(b, runs=args.runs, seconds=args.seconds,
                                                     modes=("latency", "throughput"))]
    from omedge.manifest import read_manifest
    variant = read_manifest(bundles[0]).model["variant"]
    return [bench_torch(model, variant, None, 0, 1, args.runs, 3, args.seconds, None, bundles[0]), *rows]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--stream-seconds", type=float, default=20)
    ap.add_argument("--models", default=",".join(TITLES), help="comma list (default: both)")
    ap.add_argument("--precisions", default="fp32,bf16,int8")
    ap.add_argument("--formats", default="onnx,openvino")
    ap.add_argument("--keep", type=Path, help="export into this folder and keep the bundles")
    ap.add_argument("--reuse", type=Path, help="bench the bundles of an earlier --keep folder")
    ap.add_argument("--json")
    args = ap.parse_args()
    models, precisions = args.models.split(","), tuple(args.precisions.split(","))
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.reuse or args.keep or Path(tmp)
        for model in models:
            if args.reuse:
                rows = add_ratios(reused_rows(model, tmp / model, precisions, args))
            else:
                rows = add_ratios(bench_model(model, precisions=precisions, formats=tuple(args.formats.split(",")),
                                              runs=args.runs, seconds=args.seconds, modes=("latency", "throughput"),
                                              workdir=tmp / model, calib_size=16, log=print))
            print(TITLES.get(model, model))
            out.print(bench_table(rows, 1))
            report[model] = rows
        print(f"\nstreaming: live source at 30 fps for {args.stream_seconds:.0f} s, queue 4, drop oldest")
        for model in models:
            r = stream_30fps(tmp / model / f"{model}-{precisions[-1]}.omedge", args.stream_seconds, STRIDES.get(model))
            report[f"stream-{model}"] = r
            print(f"{model:20s} {r['artifact']:15s} results {r['results']:4d}  latency p50 {r['p50_ms']:7.1f} ms "
                  f"p99 {r['p99_ms']:7.1f} ms  frames in {r['frames_in']}, used {r['used']}, dropped {r['dropped']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
