"""MIU-VL (GLIP-T, full size: Swin-T + BERT-base + 6-layer VLDyHead, seeded random weights)
at the official 800 x 1344 canvas, batch 1, on this CPU: torch fp32 eager vs the OpenVINO
bundles (fp32, bf16 where native, INT8 calibrated on 12 frames) in one run, each in its
own process. Prints p50 seconds per frame of the graph, peak RSS, parity, and then the
whole `detect()` (numpy preprocessing, graph, ATSS decoding + NMS) on a 1920x1080 frame for
the fastest bundle. Target (issue #15): the best bundle >= 2x torch fp32."""
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1]))
from omedge.bench import add_ratios, bench_model  # noqa: E402
from omedge.cli import bench_table, out  # noqa: E402
from tests.miuvl_data import write_bert_folder  # noqa: E402
from common import bench_arguments  # noqa: E402


def frames(folder: Path, n: int, seed: int = 0) -> Path:
    """Endoscopy-sized smooth colour frames (1920 x 1080), for calibration and the end-to-end run."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = Image.fromarray(rng.integers(0, 256, (9, 16, 3), dtype=np.uint8)).resize((1920, 1080), Image.BICUBIC)
        base.save(folder / f"frame{i:02d}.png")
    return folder


def end_to_end(bundle: Path, frame: Path, runs: int) -> dict:
    import omedge
    p = omedge.load(bundle)
    p.detect(str(frame), "pink round polyp in rectum", phrases=["polyp"])
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        p.detect(str(frame), "pink round polyp in rectum", phrases=["polyp"])
        times.append(time.perf_counter() - t)
    return {"bundle": bundle.name, "runtime": p.describe()["backend"], "p50_s": float(np.percentile(times, 50))}


def main():
    ap = bench_arguments(runs=5, seconds=20)
    ap.add_argument("--formats", default="openvino", help="onnxruntime's DeformConv kernel is the slower one here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="miuvl-bench-") as tmp:
        tmp = Path(tmp)
        bert = write_bert_folder(tmp / "bert-base", size="T")
        calib = frames(tmp / "calib", 12)
        rows = bench_model("miu-vl", calib=calib, calib_size=12, precisions=args.precisions.split(","),
                           formats=tuple(args.formats.split(",")), runs=args.runs, seconds=args.seconds,
                           threads=args.threads or None, workdir=tmp, log=print, text_encoder=str(bert),
                           image_size=(800, 1344), prompt="pink round polyp")
        rows = add_ratios(rows)
        out.print(bench_table(rows, 1))
        timed = [r for r in rows if "p50_ms" in r and r.get("backend") != "torch" and "artifact" in r]
        for r in rows:
            if "p50_ms" in r:
                print(f"{r['variant']:24s} p50 {r['p50_ms'] / 1000:6.2f} s/frame  peak RSS {r['peak_rss_mb']:6.0f} MB  "
                      f"{r.get('speedup_vs_torch', 1.0):.2f}x torch fp32")
        if timed:
            best = min(timed, key=lambda r: r["p50_ms"])
            precision = best["variant"].split()[-1]
            e2e = end_to_end(tmp / f"miu-vl-{precision}.omedge", calib / "frame00.png", max(3, args.runs))
            print(f"detect() end to end on a 1920x1080 frame with {e2e['bundle']} ({e2e['runtime']}): "
                  f"p50 {e2e['p50_s']:.2f} s")
            rows.append({"end_to_end": e2e})
    if args.json:
        json.dump({"rows": rows}, open(args.json, "w"), indent=2, default=str)


if __name__ == "__main__":
    main()
