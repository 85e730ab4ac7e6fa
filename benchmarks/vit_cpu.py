"""ViT-B/16 (BROW, full size, seeded random weights), batch 1, on this CPU: every omedge
variant vs torch fp32 eager, measured in one run (each variant in its own process).

Prints latency, throughput, speed-up, size, peak RSS, parity, and the achieved GFLOP/s
as a fraction of this machine's measured matmul ceiling for the variant's precision.
"""
import json

import torch
from common import bench_arguments, matmul_ceiling, precision_of

from omedge.bench import add_ratios, bench_model
from omedge.cli import bench_table, out

VIT_B16_GFLOP = 33.7  # multiply-adds x 2 per 224 px forward


def main():
    ap = bench_arguments()
    args = ap.parse_args()
    threads = args.threads or torch.get_num_threads()
    ceiling = matmul_ceiling(threads)
    rows = bench_model("brow", precisions=args.precisions.split(","), formats=("onnx", "openvino"), runs=args.runs,
                       seconds=args.seconds, threads=args.threads or None, modes=("latency", "throughput"), log=print)
    rows = add_ratios(rows)
    out.print(bench_table(rows, 1))
    print(f"\nmatmul ceiling on {threads} threads (torch, 2048^3): " +
          ", ".join(f"{k} {v:.0f} G(FL)OP/s" for k, v in ceiling.items()))
    print(f"{'variant':28s} {'runs on':30s} {'GFLOP/s':>8s} {'ceiling':>8s} {'fraction':>8s}")
    for r in rows:
        if "throughput" not in r:
            continue
        gflops = VIT_B16_GFLOP * r["throughput"]
        rt = r["runtime"]
        prec = precision_of(r["variant"], rt)
        print(f"{r['variant']:28s} {rt['backend'] + '/' + str(rt.get('inference_precision', '')):30s} "
              f"{gflops:8.1f} {ceiling[prec]:8.0f} {gflops / ceiling[prec]:8.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "ceiling": ceiling}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
