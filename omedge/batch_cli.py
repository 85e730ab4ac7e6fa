"""`omedge batch BUNDLE INPUTS -o OUT [--ray] [--workers N]`: argument parsing and the
report; the job itself is omedge.batch.run_batch."""
from __future__ import annotations

import json

from .cli import positive_int


def add_parser(subparsers):
    s = subparsers.add_parser("batch", help="run a bundle over a folder, file list or manifest CSV into Parquet "
                              "(segmentation: a folder of NIfTI label maps); reruns resume")
    s.add_argument("bundle")
    s.add_argument("inputs", help="a folder, a text file of paths (one a line) or a manifest .csv with a `path` column")
    s.add_argument("-o", "--output", required=True,
                   help="results .parquet (segmentation bundles: a folder for the label maps and index.parquet)")
    s.add_argument("--ray", action="store_true", help="run on a Ray cluster (Ray Data) instead of local processes")
    s.add_argument("--ray-address", help="the cluster to join (default: RAY_ADDRESS, else a new local one)")
    s.add_argument("--workers", type=positive_int, help="processes / Ray actors, each with one predictor "
                   "(default: cores / threads)")
    s.add_argument("--threads", type=positive_int, help="backend threads per worker (default: cores / workers)")
    s.add_argument("--chunk-size", type=positive_int, default=64, help="items per part file (the unit of resume)")
    s.add_argument("--batch-size", type=positive_int, help="images per run (default 8; volumes: windows per run, 2)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "gpu", "npu"])
    s.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "openvino"])
    s.add_argument("--overwrite", action="store_true", help="start again instead of resuming earlier results")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_batch)
    return s


def cmd_batch(args) -> int:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from .batch import run_batch
    from .cli.commands import console, out
    with Progress(TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=args.json) as bar:
        task = bar.add_task("items", total=None)
        result = run_batch(args.bundle, args.inputs, args.output, ray=args.ray, workers=args.workers,
                           threads=args.threads, chunk_size=args.chunk_size, batch_size=args.batch_size,
                           device=args.device, backend=args.backend, overwrite=args.overwrite,
                           ray_address=args.ray_address,
                           on_chunk=lambda done, total: bar.update(task, completed=done, total=total))
    if args.json:
        print(json.dumps(result))
        return 0
    out.print(f"{result['items']} items -> {result['output']}: {result['ok']} ok, "
              f"{result['items'] - result['ok']} failed, {result['skipped']} resumed from an earlier run")
    if result["items"] - result["ok"]:
        console.print("failed items have ok=false and their message in the `error` column; "
                      "run the same command again to retry them")
    return 0
