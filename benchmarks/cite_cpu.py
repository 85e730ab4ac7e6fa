"""CITE (prompted CLIP ViT-B/16, full size, seeded random weights), 224 px, batch 1, on
this CPU: torch fp32 eager vs every omedge variant in the same run, INT8 calibrated on a
user-sized folder (12 tiles). Prints latency, speed-up, parity (top-1 agreement of the
cosine-head logits, largest probability difference) and the share of the matmul ceiling.
Target (issue #15): the best bundle >= 4x torch fp32 with top-1 agreement >= 98%."""
import json
import sys
import tempfile
from pathlib import Path

import torch

from omedge.bench import add_ratios, bench_model
from omedge.cli import bench_table, out

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from vit_cpu import VIT_B16_GFLOP, matmul_ceiling  # noqa: E402

from tests.conftest import write_tiles  # noqa: E402
from common import bench_arguments  # noqa: E402


def main():
    ap = bench_arguments()
    args = ap.parse_args()
    threads = args.threads or torch.get_num_threads()
    ceiling = matmul_ceiling(threads)
    with tempfile.TemporaryDirectory(prefix="cite-bench-") as tmp:
        calib = write_tiles(Path(tmp) / "calib", 12, seed=7) and Path(tmp) / "calib"
        rows = bench_model("cite", calib=calib, calib_size=12, precisions=args.precisions.split(","),
                           formats=("onnx", "openvino"), runs=args.runs, seconds=args.seconds,
                           threads=args.threads or None, log=print)
    rows = add_ratios(rows)
    out.print(bench_table(rows, 1))
    print(f"\nmatmul ceiling on {threads} threads (torch): " +
          ", ".join(f"{k} {v:.0f} G(FL)OP/s" for k, v in ceiling.items()))
    for r in rows:
        if "p50_ms" not in r or "runtime" not in r:
            continue
        rt, gflops = r["runtime"], VIT_B16_GFLOP * 1000 / r["p50_ms"]
        prec = "int8" if "int8" in r["variant"] else ("bf16" if rt.get("inference_precision") == "bf16" else "fp32")
        logits = ((r.get("parity") or {}).get("outputs") or {}).get("logits", {})
        print(f"{r['variant']:28s} {rt['backend'] + '/' + str(rt.get('inference_precision', '')):24s} "
              f"{gflops:7.1f} GFLOP/s = {gflops / ceiling[prec]:6.1%} of {prec} ceiling; "
              f"top-1 {logits.get('top1_agreement', '-')}, prob max diff {logits.get('probability_max_abs', '-')}")
    if args.json:
        json.dump({"rows": rows, "ceiling": ceiling}, open(args.json, "w"), indent=2, default=str)


if __name__ == "__main__":
    main()
