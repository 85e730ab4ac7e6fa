"""Whole-volume CT segmentation on this CPU, in one run (seeded random STU-Net-B weights):
a 1.5 mm CT-like phantom of 256x256x160 voxels, nnU-Net sliding window (step 0.5,
Gaussian sigma = patch/8, no mirroring) with torch fp32 eager and with omedge bundles.
Each variant runs in its own process (own peak RSS). Prints seconds, voxels/s,
speed-up, peak RSS and per-class Dice against torch fp32."""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORKER = r"""
import json, sys, time
import numpy as np
from omedge.io.volume import Volume
from omedge.runtime.volume import segment
data = np.load(sys.argv[2])
vol = Volume(data["ct"].astype(np.float32), data["affine"], "phantom")
pre = json.loads(sys.argv[3])
if sys.argv[1] == "torch":
    import torch
    import omedge.models as models
    model = models.build(models.get_spec("stu-net"), "B", seed=0)
    def run(b):
        with torch.inference_mode():
            return model(torch.from_numpy(b))["logits"].numpy()
    info = {"backend": "torch " + torch.__version__, "precision": "fp32"}
else:
    import omedge
    p = omedge.load(sys.argv[1], artifact=sys.argv[4])
    run = lambda b: p.run(b, batch_size=1)["logits"]
    d = p.describe()
    info = {"backend": d["backend"], "precision": d["precision"], "exec": d.get("inference_precision")}
t = time.perf_counter()
labels = segment(vol, run, pre, batch_size=1)
secs = time.perf_counter() - t
np.save(sys.argv[5], labels)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({**info, "seconds": secs, "peak_rss_mb": int(hwm) / 1024}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="256,256,160")
    ap.add_argument("--formats", default="openvino")
    ap.add_argument("--calib-size", type=int, default=4)
    ap.add_argument("--precision", default="int8", help="fp32, fp16, bf16, int8")
    ap.add_argument("--json")
    args = ap.parse_args()
    import omedge
    from omedge.bundle import read_manifest
    from omedge.runtime.volume import dice_per_class, synthetic_ct
    shape = tuple(int(s) for s in args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ct = synthetic_ct(shape, seed=11)
        np.savez(tmp / "ct.npz", ct=ct.data, affine=ct.affine)
        t = time.perf_counter()
        bundle = omedge.export("stu-net", random_weights=True, variant="B", formats=args.formats.split(","),
                               precision=args.precision, calib="synthetic" if args.precision == "int8" else None,
                               calib_size=args.calib_size, out=tmp / f"stunet-b-{args.precision}", force=True,
                               log=print)
        print(f"export took {time.perf_counter() - t:.0f} s")
        pre = read_manifest(bundle)["preprocess"]
        runs = [("torch fp32 eager", "torch", "-")]
        runs += [(f"{a['format']} {a['precision']}", str(bundle), a["name"]) for a in read_manifest(bundle)["artifacts"]]
        rows, ref = [], None
        for name, target, artifact in runs:
            out = tmp / f"{len(rows)}.npy"
            r = subprocess.run([sys.executable, "-c", WORKER, target, str(tmp / "ct.npz"), json.dumps(pre), artifact,
                                str(out)], capture_output=True, text=True)
            if r.returncode != 0:
                rows.append({"variant": name, "error": r.stderr.strip().splitlines()[-1][:200]})
                continue
            row = {"variant": name, **json.loads(r.stdout.strip().splitlines()[-1])}
            labels = np.load(out)
            if ref is None:
                ref = labels
            dice = dice_per_class(ref, labels)
            row["dice_min"] = min(dice.values()) if dice else 1.0
            row["voxels_per_s"] = float(np.prod(shape)) / row["seconds"]
            rows.append(row)
    base = rows[0]["seconds"]
    print(f"\nSTU-Net-B, phantom {shape} voxels at 1.5 mm, patch 128^3, step 0.5, batch 1")
    print(f"{'variant':22s} {'runs on':28s} {'seconds':>8s} {'Mvox/s':>7s} {'speed-up':>8s} {'peak RSS MB':>11s} "
          f"{'Dice min':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:22s} ERROR {r['error']}")
            continue
        print(f"{r['variant']:22s} {r['backend'] + ' ' + str(r.get('exec') or ''):28s} {r['seconds']:8.1f} "
              f"{r['voxels_per_s'] / 1e6:7.3f} {base / r['seconds']:7.2f}x {r['peak_rss_mb']:11.0f} {r['dice_min']:8.4f}")
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
