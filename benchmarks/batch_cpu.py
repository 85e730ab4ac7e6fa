"""`omedge batch` on this CPU, in one run, with seeded random weights (none can be
downloaded here): a ViT-B/16 INT8 bundle (BROW layout) over 2,000 PNG tiles of 256 px,

1. in-process `p.predict` over the same files (the baseline, all cores in one process);
2. `omedge batch` locally: a process pool of --workers processes, threads pinned so that
   workers x threads = cores;
3. `omedge batch --ray` on a local Ray cluster of --workers CPUs (one actor each);
4. a rerun of (2), which resumes: every item is skipped (the cost of the bookkeeping).

Items/s are measured over the whole call (worker / actor start-up included, since a user
waits for it too); Ray's own start-up (`ray.init`) is reported apart.

    python benchmarks/batch_cpu.py [--variant B|tiny] [--tiles 2000] [--workers 2] [--json OUT]
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from omedge.batch import cores, run_batch
from tests.conftest import official_state_dict, write_tiles


def make_bundle(work: Path, variant: str, tiles: int) -> tuple[Path, Path]:
    import torch

    import omedge
    folder = work / f"tiles-{tiles}"
    if not folder.is_dir() or len(list(folder.glob("*.png"))) != tiles:
        write_tiles(folder, tiles, size=256, seed=1)
    bundle = work / f"brow-{variant}-int8.omedge"
    if not bundle.exists():
        torch.save(official_state_dict("brow", variant=variant), work / "brow.pth")
        calib = write_tiles(work / "calib", 32, size=256, seed=2)[0].parent
        omedge.export("brow", work / "brow.pth", variant=variant, formats=["onnx", "openvino"], precision="int8",
                      calib=calib, out=bundle)
    return bundle, folder


def in_process(bundle: Path, folder: Path, batch: int) -> dict:
    import omedge
    p = omedge.load(bundle, mode="throughput")
    files = sorted(str(f) for f in folder.glob("*.png"))
    p.predict(files[:batch], batch_size=batch)   # warm-up
    t0 = time.perf_counter()
    for k in range(0, len(files), 64):
        p.predict(files[k:k + 64], batch_size=batch)
    seconds = time.perf_counter() - t0
    return {"items": len(files), "seconds": seconds, "items_per_s": len(files) / seconds, "runtime": p.describe()}


def timed_batch(bundle: Path, folder: Path, out: Path, **options) -> dict:
    t0 = time.perf_counter()
    res = run_batch(bundle, folder, out, **options)
    seconds = time.perf_counter() - t0
    return {**res, "seconds": seconds, "items_per_s": res["items"] / seconds}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="B", help="BROW variant (B is ViT-B/16; tiny for a smoke run)")
    ap.add_argument("--tiles", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workdir")
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="omedge-batchbench-"))
    work.mkdir(parents=True, exist_ok=True)
    bundle, folder = make_bundle(work, args.variant, args.tiles)
    threads = max(1, cores() // args.workers)
    common = {"chunk_size": args.chunk_size, "batch_size": args.batch_size, "overwrite": True}
    rows = {"in-process predict": in_process(bundle, folder, args.batch_size)}
    rows[f"batch, {args.workers} processes x {threads} threads"] = timed_batch(
        bundle, folder, work / "local.parquet", workers=args.workers, threads=threads, **common)
    rows["batch rerun (resumes, all skipped)"] = timed_batch(
        bundle, folder, work / "local.parquet", workers=args.workers, threads=threads,
        **{**common, "overwrite": False})

    from omedge.batch_ray import quiet_ray
    quiet_ray()
    import ray
    t0 = time.perf_counter()
    ray.init(num_cpus=args.workers * threads, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    try:
        rows[f"batch --ray, {args.workers} actors x {threads} threads"] = timed_batch(
            bundle, folder, work / "ray.parquet", ray=True, workers=args.workers, threads=threads, **common)
    finally:
        ray.shutdown()
    base = rows["in-process predict"]["items_per_s"]
    print(f"BROW-{args.variant} INT8, {args.tiles} tiles of 256 px, {cores()} cores "
          f"({rows['in-process predict']['runtime'].get('backend')}); ray.init took {ray_start:.1f} s")
    print(f"{'run':44s} {'items':>6s} {'seconds':>8s} {'items/s':>8s} {'vs predict':>10s}")
    for name, r in rows.items():
        print(f"{name:44s} {r['items']:6d} {r['seconds']:8.2f} {r['items_per_s']:8.1f} {r['items_per_s'] / base:10.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "ray_init_s": ray_start, "cores": cores(), "pid": os.getpid()}, f, indent=2,
                      default=str)


if __name__ == "__main__":
    main()
