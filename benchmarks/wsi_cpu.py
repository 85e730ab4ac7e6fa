"""Whole-slide embedding on this CPU, in one run: a synthetic 40,000 x 30,000 px pyramidal
SVS (JPEG tiles, 0.25 µm/px, ~50% tissue), written tile by tile (never whole in memory),
embedded at 0.5 µm/px / 224 px with a BROW INT8 bundle (random weights: the speed is the
weights'-independent part). Prints tiles/s end to end (read + resize + preprocess + INT8
embed + HDF5) against the backend's own tiles/s on the same tiles already in memory, the IO
pipeline's cost (1 - end-to-end / backend; target <= 15%), and RSS sampled over the run.

    python benchmarks/wsi_cpu.py                      # ViT-B, every tissue tile
    python benchmarks/wsi_cpu.py --variant tiny --tiles 400   # a quick run
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests.wsi_files: the slide painter

import omedge
from omedge.io.wsi import low_res, open_slide, plan_level, tile_grid, tissue_mask
from omedge.wsi import embed_slide, read_tile
from tests.wsi_files import Layout, write_slide


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20


class RssSampler(threading.Thread):
    """RSS every 0.1 s, with the tiles done at that moment (flat = no growth with tiles)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples, self.done, self.stop = [], 0, threading.Event()

    def run(self):
        while not self.stop.wait(0.1):
            self.samples.append((self.done, rss_mb()))


def slide_layout(width: int, height: int) -> Layout:
    """Four tissue blocks covering ~50% of the slide, and a pen stroke on the glass."""
    w, h = width, height
    a, b = int(w * 0.355), int(h * 0.35)   # 4 blocks of 0.355 w x 0.35 h: ~50% of the slide
    tissue = [(x, y, x + a, y + b) for x in (w // 20, w // 2 + w // 40) for y in (h // 20, h // 2 + h // 40)]
    return Layout(w, h, tissue=tissue, pen=[(w // 20, h * 45 // 100, w * 9 // 20, h * 46 // 100)])


def rss_summary(sampler: RssSampler, tiles: int, start: float) -> dict:
    """RSS before, at the peak, and the highest seen up to each quarter of the tiles."""
    quarters = [max((r for d, r in sampler.samples if d <= q * tiles), default=float("nan"))
                for q in (0.25, 0.5, 0.75, 1.0)]
    return {"before": round(start), "peak": round(max(r for _, r in sampler.samples)),
            "max_by_quarter_of_tiles": [round(q) for q in quarters]}


def backend_only(p, slide, plan, coords, batch: int) -> float:
    """tiles/s of predictor.run alone, on the same tiles preprocessed into memory first."""
    pre = p.manifest.preprocess
    chw = np.stack([read_tile(slide, plan, int(x), int(y), pre) for x, y in coords])
    p.run(chw[:batch], batch_size=batch)   # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(chw), batch):
        p.run(chw[i:i + batch], batch_size=batch)
    return len(chw) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="B", choices=["B", "tiny"])
    ap.add_argument("--format", default="openvino", choices=["openvino", "onnx"])
    ap.add_argument("--tiles", type=int, help="embed only the first N tissue tiles")
    ap.add_argument("--width", type=int, default=40000)
    ap.add_argument("--height", type=int, default=30000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--threads", type=int, help="backend threads")
    ap.add_argument("--work", help="folder for the slide and bundle (default: a temp folder)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="omedge-wsi-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    slide_path, bundle = work / f"synthetic_{args.width}x{args.height}.svs", work / f"brow-{args.variant}-int8.omedge"
    t0 = time.perf_counter()
    if not slide_path.exists():
        write_slide(slide_path, slide_layout(args.width, args.height), downsamples=(1, 4, 16, 64))
    t_write = time.perf_counter() - t0
    if not bundle.exists():
        with contextlib.redirect_stdout(sys.stderr):   # the quantizer's progress bars; stdout is the JSON
            omedge.export("brow", random_weights=True, variant=args.variant, precision="int8", calib="synthetic",
                          calib_size=16, formats=[args.format], out=bundle)
    p = omedge.load(bundle, backend="openvino" if args.format == "openvino" else "onnxruntime", threads=args.threads,
                    mode="throughput")
    sampler = RssSampler()
    rss_start = rss_mb()
    sampler.start()
    t0 = time.perf_counter()

    def progress(done, total, rate):
        sampler.done = done
        progress.rate, progress.total = rate, total
    summary = embed_slide(p, slide_path, mpp=0.5, tile=224, out=work / "features.h5", overwrite=True, limit=args.tiles,
                          batch_size=args.batch, workers=args.workers, progress=progress)
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    (work / "features.h5").unlink()
    slide = open_slide(slide_path)
    plan = plan_level(slide, 0.5, 224)
    picture, scale = low_res(slide)   # the tile list again, as the run made it
    all_coords = tile_grid(tissue_mask(picture, scale * plan.mpp_base), scale, slide.dims, plan.patch_level0, 0.5)[0]
    coords = all_coords[:args.tiles] if args.tiles else all_coords
    n_backend = min(len(coords), max(4 * args.batch, 256))
    backend_rate = backend_only(p, slide, plan, coords[:n_backend], args.batch)
    slide.close()
    e2e = progress.rate
    result = {"slide": f"{args.width}x{args.height} px, levels 1/4/16/64, JPEG 256 px tiles",
              "slide_write_s": round(t_write, 1), "bundle": f"brow {args.variant} int8 {args.format}",
              "runtime": {k: v for k, v in p.describe().items() if k in ("backend", "device", "precision", "streams")},
              "tissue_fraction": summary["tissue_fraction"], "tissue_tiles_on_slide": len(all_coords),
              "tiles": summary["tiles"], "wall_s": round(wall, 1),
              "tiles_per_s_end_to_end": round(e2e, 2), "tiles_per_s_backend_only": round(backend_rate, 2),
              "backend_only_tiles": n_backend, "io_pipeline_cost": round(1 - e2e / backend_rate, 3),
              "rss_mb": rss_summary(sampler, summary["tiles"], rss_start)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
