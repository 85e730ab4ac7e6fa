"""MedLSAM end to end on this CPU, one run: a synthetic 512 x 512 x 100 CT with 3 organs and
a 2-case support set, through the omedge bundle (MedLAM localiser + SAM ViT-B, seeded random
weights) and through the torch pipeline of the same model (the same numpy steps, every graph
in torch fp32 eager): seconds, peak RSS, slices sent to SAM, per-class Dice of the two label
maps. Each side runs in its own process, so its peak RSS is its own.

    python benchmarks/medlsam_cpu.py [--precision int8 --format openvino] [--shape 512,512,100]
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(side: str, bundle: str, query: str, support: str, out: str, threads: int):
    """One pipeline run: label map to `out`, timings and peak RSS as JSON on stdout."""
    import omedge
    from omedge.manifest import read_manifest
    t0 = time.perf_counter()
    if side == "omedge":
        p = omedge.load(bundle, threads=threads or None)
        load_s = time.perf_counter() - t0
        res = p.segment_volume(query, support)
    else:
        import torch

        from omedge.kinds.medlsam import run_pipeline
        from omedge.models import build, get_spec
        from omedge.models.medlsam import torch_runner
        if threads:
            torch.set_num_threads(threads)
        m = read_manifest(bundle)
        spec = get_spec(m.model["id"])
        model = build(spec, m.model["variant"], seed=0, **m.model.get("options", {})).eval()
        load_s = time.perf_counter() - t0
        res = run_pipeline(torch_runner(model, spec), m.preprocess, query, support)
    secs = time.perf_counter() - t0
    np.save(out, res.labels)
    hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0].split()[1]
    print(json.dumps({"seconds": secs, "load_s": load_s, "peak_rss_mb": int(hwm) / 1024,
                      "slices": int(res.slices),
                      "boxes": {str(c): np.asarray(b, int).tolist() for c, b in res.boxes.items()}}))


def run_side(side, bundle, query, support, out, threads) -> dict:
    cmd = [sys.executable, __file__, "--child", side, str(bundle), str(query), str(support), str(out),
           "--threads", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        return {"error": (r.stderr or r.stdout).strip().splitlines()[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def dice(a: np.ndarray, b: np.ndarray, c: int) -> float:
    x, y = a == c, b == c
    return 1.0 if not (x.any() or y.any()) else float(2 * (x & y).sum() / (x.sum() + y.sum()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=5, metavar=("SIDE", "BUNDLE", "QUERY", "SUPPORT", "OUT"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--format", default="openvino")
    ap.add_argument("--variant", default="official", help="official (MedLAM + SAM ViT-B) or tiny")
    ap.add_argument("--shape", default="512,512,100")
    ap.add_argument("--spacing", default="0.8,0.8,2.5", help="mm; the organs span about 8 slices each")
    ap.add_argument("--workdir", help="keep the inputs and the bundle here, and reuse them on the next run")
    ap.add_argument("--export-only", action="store_true", help="make the inputs and the bundle, time nothing")
    args = ap.parse_args()
    if args.child:
        return child(*args.child, args.threads)
    import omedge
    from omedge.devices import cpu_info
    from omedge.medlsam_phantom import phantom, save, support_folder
    with tempfile.TemporaryDirectory(prefix="medlsam-bench-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        shape = tuple(int(v) for v in args.shape.split(","))
        spacing = tuple(float(v) for v in args.spacing.split(","))
        query, support, bundle = work / "query.nii.gz", work / "support", work / "medlsam.omedge"
        if not (query.exists() and support.exists()):
            ct, labels = phantom(shape=shape, spacing=spacing, seed=1)
            query = save(query, ct.data, ct.affine)
            support = support_folder(support, n=2)
        if not (bundle / "manifest.json").exists():
            t = time.perf_counter()
            bundle = omedge.export("medlsam", random_weights=True, variant=args.variant, formats=(args.format,),
                                   precision=args.precision, calib="synthetic" if args.precision == "int8" else None,
                                   verify_size=3, out=bundle, log=print)
            print(f"export: {time.perf_counter() - t:.0f} s")
        if args.export_only:
            return
        rows = {side: run_side(side, bundle, query, support, work / f"{side}.npy", args.threads)
                for side in ("omedge", "torch")}
        cpu = cpu_info()
        print(f"\nMedLSAM {args.variant}, CT {shape} at {spacing} mm, 3 classes, bundle {args.format} "
              f"{args.precision}; CPU {cpu.get('model')}, {cpu.get('usable_cores')} cores, "
              f"ISA {', '.join(cpu.get('isa', []))}")
        print(f"{'pipeline':10s} {'seconds':>9s} {'load s':>7s} {'peak RSS MB':>12s}")
        for side, r in rows.items():
            if "error" in r:
                print(f"{side:10s} ERROR {r['error'][:300]}")
                continue
            print(f"{side:10s} {r['seconds']:9.1f} {r['load_s']:7.1f} {r['peak_rss_mb']:12.0f}")
        if all("error" not in r for r in rows.values()):
            a, b = np.load(work / "omedge.npy"), np.load(work / "torch.npy")
            slices = {c: box[1][2] - box[0][2] + 1 for c, box in rows["omedge"]["boxes"].items()}
            print("per-class Dice omedge vs torch: " + ", ".join(f"{c}: {dice(a, b, c):.4f}" for c in (1, 2, 3)))
            print(f"boxes identical: {rows['omedge']['boxes'] == rows['torch']['boxes']}; slices per class {slices}, "
                  f"encoder runs {rows['omedge']['slices']} (omedge) / {rows['torch']['slices']} (torch)")
            print(f"speed-up vs torch: {rows['torch']['seconds'] / rows['omedge']['seconds']:.2f}x; "
                  f"peak RSS ratio {rows['omedge']['peak_rss_mb'] / rows['torch']['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
