"""SAM ViT-B (full size, seeded random weights) on this CPU, one run: the image encoder at
1024^2 in torch fp32 eager vs every omedge variant (ONNX fp32/INT8 on onnxruntime and
OpenVINO, OpenVINO IR fp32/INT8), with the embedding cosine and the end-to-end mask IoU
against torch, and the per-prompt decoder latency on a cached embedding (target <= 20 ms
p50); the encoder speed-up of the best bundle vs torch (target >= 4x). Each variant runs
in its own process. INT8 is calibrated on synthetic images (--calib DIR for real ones).
"""
import json
import tempfile
from pathlib import Path

from common import bench_arguments

import omedge
from omedge.bench import add_ratios, bench_bundle, bench_torch
from omedge.cli import bench_table, out
from omedge.devices import cpu_info
from omedge.errors import OmedgeError


def variants(work: Path, args) -> list:
    """The bundles: fp32 (ONNX + IR) and INT8 (ONNX + IR), each verified end to end at export;
    with --work, a bundle already there is reused (export once, benchmark under a lock later)."""
    bundles = []
    work.mkdir(parents=True, exist_ok=True)
    for precision in args.precisions.split(","):
        if args.work and (work / f"sam-{precision}.omedge" / "manifest.json").exists():
            print(f"reusing {work / f'sam-{precision}.omedge'}")
            bundles.append(work / f"sam-{precision}.omedge")
            continue
        print(f"exporting sam vit_b {precision}")
        try:
            bundles.append(omedge.export(
                "sam", random_weights=True, precision=precision,
                formats=tuple(args.int8_formats.split(",")) if precision == "int8" else
                ("openvino",) if precision == "bf16" else ("onnx", "openvino"),
                calib=(args.calib or "synthetic") if precision == "int8" else None, calib_size=args.calib_size,
                verify_size=args.verify_size, out=work / f"sam-{precision}.omedge", force=True, log=print))
        except OmedgeError as e:
            print(f"  {precision}: {e}")
    return bundles


def main():
    ap = bench_arguments(runs=5, precisions="fp32,int8")
    ap.add_argument("--calib", help="a folder of images for INT8 (default: synthetic)")
    ap.add_argument("--calib-size", type=int, default=16)
    ap.add_argument("--verify-size", type=int, default=3)
    # ONNX INT8 of the 1024^2 encoder calibrates one image per pass (quantize/onnx_int8.py):
    # 13.9 GB peak and 8 min for 12 images on 2 cores, and on random weights it misses its gate
    ap.add_argument("--int8-formats", default="openvino", help="formats for INT8 (onnx: ~14 GB RAM, ~8 min)")
    ap.add_argument("--work", help="keep the bundles in this folder and reuse those already there")
    ap.add_argument("--export-only", action="store_true", help="export into --work and stop (no timing)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sam-bench-") as tmp:
        bundles = variants(Path(args.work or tmp), args)
        if args.export_only:
            return
        rows = []
        for b in bundles:
            print(f"benchmarking {b.name}")
            rows += bench_bundle(b, runs=args.runs, warmup=1, seconds=args.seconds, threads=args.threads or None,
                                 timeout=3600)
        print("benchmarking torch fp32 eager")
        rows.insert(0, bench_torch("sam", "vit_b", runs=args.runs, warmup=1, seconds=args.seconds,
                                   threads=args.threads or None, bundle=bundles[0] if bundles else None,
                                   timeout=3600))
        rows = add_ratios(rows)
        out.print(bench_table(rows, 1))
        print(f"\n{'variant':24s} {'backend':12s} {'encoder p50 ms':>15s} {'x torch':>8s} {'emb cosine':>11s} "
              f"{'mask IoU':>9s} {'decoder p50 ms':>15s} {'segment p50 ms':>15s}")
        best = 0.0
        for r in rows:
            if "error" in r:
                print(f"{r.get('variant', '?'):24s} {r.get('backend', ''):12s} ERROR {r['error'][:200]}")
                continue
            outs = (r.get("parity") or {}).get("outputs", {})
            cos = outs.get("image_embeddings", {}).get("cosine_min")
            iou = outs.get("low_res_masks", {}).get("mask_iou_min")
            g = r.get("graphs", {})
            ratio = r.get("speedup_vs_torch", 1.0)
            best = max(best, ratio) if r["backend"] != "torch" else best
            print(f"{r['variant']:24s} {r['backend']:12s} {r['p50_ms']:15.0f} {ratio:8.2f} "
                  f"{'-' if cos is None else f'{cos:.5f}':>11} {'-' if iou is None else f'{iou:.4f}':>9} "
                  f"{g.get('decoder_p50_ms', float('nan')):15.2f} {g.get('segment_p50_ms', float('nan')):15.2f}")
        cpu = cpu_info()
        print(f"\nbest encoder speed-up vs torch fp32 eager: {best:.2f}x (target >= 4x)")
        print(f"CPU: {cpu.get('model')}, {cpu.get('usable_cores')} cores, ISA {', '.join(cpu.get('isa', []))}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2, default=str)


if __name__ == "__main__":
    main()
