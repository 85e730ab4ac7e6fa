"""OpenVINO latency vs throughput mode on this CPU: a full-size ViT-B/16 INT8 bundle (BROW
layout, seeded random weights), batches of 1, 8 and 32, images/s of `Predictor.run` on
preprocessed arrays (decoding excluded). Latency mode is the baseline of the same run;
throughput mode should never lose to it (runtime/backends/ov.py, throughput_plan).

    python benchmarks/modes_cpu.py [--bundle B.omedge] [--work DIR] [--seconds 12] [--rounds 3] [--json OUT]

Without --bundle one is exported into --work (calibrated on 32 synthetic tiles) and kept.
Run it with PYTHONPATH=<another checkout> to measure another version on the same bundle.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_bundle(work: Path) -> Path:
    import torch

    import omedge
    sys.path.insert(0, str(REPO))  # here only, so that PYTHONPATH chooses the omedge measured
    from tests.conftest import official_state_dict, write_tiles
    bundle = work / "brow-B-int8.omedge"
    if not bundle.exists():
        torch.save(official_state_dict("brow", variant="B"), work / "brow.pth")
        calib = write_tiles(work / "calib", 32, size=256, seed=2)[0].parent
        omedge.export("brow", work / "brow.pth", variant="B", formats=["openvino"], precision="int8", calib=calib,
                      out=bundle)
    return bundle


def images_per_s(p, x, seconds: float) -> float:
    """Whole calls of len(x) images, as many as fit in `seconds` (at least 2) after a warm-up."""
    batch = len(x)
    p.run(x, batch_size=batch)
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < seconds:
        p.run(x, batch_size=batch)
        n += 1
    return n * batch / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle")
    ap.add_argument("--work", default="/tmp/omedge-modes")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=12, help="per mode and batch, over all rounds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    import omedge
    if args.bundle:
        bundle = Path(args.bundle)
    else:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        bundle = make_bundle(Path(args.work))
    modes = {m: omedge.load(bundle, backend="openvino", mode=m) for m in ("latency", "throughput")}
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        shape = [batch, *modes["latency"].manifest.inputs[0]["shape"][1:]]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        best = dict.fromkeys(modes, 0.0)
        for _ in range(args.rounds):  # the modes alternate, the best round counts: a shared CPU is noisy
            for mode, p in modes.items():
                best[mode] = max(best[mode], images_per_s(p, x, args.seconds / args.rounds))
        for mode, p in modes.items():
            d = p.describe()
            rows.append({"mode": mode, "batch": batch, "streams": d["streams"], "threads": d.get("threads"),
                         "images_per_s": best[mode]})
            print(json.dumps(rows[-1]), flush=True)
    base = {r["batch"]: r["images_per_s"] for r in rows if r["mode"] == "latency"}
    print(f"\n{bundle.name}, {omedge.__file__}")
    print(f"{'batch':>5s} {'latency img/s':>14s} {'throughput img/s':>17s} {'ratio':>6s}")
    for r in rows:
        if r["mode"] == "throughput":
            b = r["batch"]
            print(f"{b:5d} {base[b]:14.2f} {r['images_per_s']:17.2f} {r['images_per_s'] / base[b]:6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
