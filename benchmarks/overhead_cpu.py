"""The predict path's own cost beside the backend's (issue #16), on this CPU.

For a BROW ViT-B INT8 bundle (256 px H&E tiles) and a DeblurringMIM ConvMAE-B INT8 bundle
(640x480 ultrasound frames), both full size with seeded random weights: `predict` on PNG
and JPEG files against the backend's own run on the already prepared batch (same batch
size), split into

  decode       file -> pixels (Pillow; the cv2-compatible grey decode for DeblurringMIM)
  preprocess   the rest of `prepare`: blur, resize, crop, normalise, batch stacking
  backend      `Predictor.run` on the prepared batch (dtype cast, chunking, the backend)
  wrapper      Predictor.run minus the backend's own run on the same feed (cast, chunking)
  postprocess  predict(return_dict=True)'s step after the run: softmax, labels

and the overhead share (decode + preprocess + wrapper + postprocess) / raw backend run.
Medians over interleaved repeats, so a background load shifts every stage alike; the
whole `predict` is printed beside them.

    python benchmarks/overhead_cpu.py                      # exports both bundles (a few minutes)
    python benchmarks/overhead_cpu.py --brow B.omedge --convmae C.omedge --batch 1 --batch 8
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import omedge
from omedge.io.images import read_image
from omedge.io.opencv_compat import imread_gray
from omedge.runtime.predictor import softmax


def pictures(folder: Path, n: int, size: tuple[int, int], grey_like: bool, seed: int) -> dict[str, list[Path]]:
    """n smooth, slightly noisy pictures (h, w) as PNG and as JPEG (quality 90)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"png": [], "jpeg": []}
    for i in range(n):
        base = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size[::-1], Image.BICUBIC)
        px = np.clip(np.asarray(base, np.int16) + rng.integers(-20, 21, (*size, 3)), 0, 255).astype(np.uint8)
        if grey_like:  # B-mode ultrasound saved as RGB: equal channels
            px = np.repeat(px[..., :1], 3, axis=2)
        for ext, opts in (("png", {}), ("jpeg", {"quality": 90})):
            path = folder / f"p{i:02d}.{'jpg' if ext == 'jpeg' else ext}"
            Image.fromarray(px).save(path, **opts)
            files[ext].append(path)
    return files


def decode_only(paths, pre: dict) -> list[np.ndarray]:
    """What `prepare` spends on decoding: the grey cv2-like decode where the model blurs a
    grey plane (DeblurringMIM), Pillow's RGB decode otherwise."""
    if (pre.get("blur") or {}).get("on") == "grayscale":
        return [imread_gray(p) for p in paths]
    return [read_image(p, pre.get("grayscale", "replicate"), pre.get("alpha", "drop")) for p in paths]


def clock(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def postprocess(p, outputs: dict):
    """predict(return_dict=True)'s step after the run: probabilities and label names."""
    if "logits" in outputs and p.labels:
        softmax(outputs["logits"])
        [p.labels[i] for i in outputs["logits"].argmax(-1)]


def measure(p, files: list[Path], batch: int, repeats: int) -> dict:
    """Each stage timed on its own, in interleaved repeats; the predictor's own share of the
    run is the median of (Predictor.run - backend.run) taken back to back, so the backend's
    run-to-run spread (large on a shared machine) does not swamp the few ms measured."""
    names = [str(f) for f in files[:batch]]
    pre = p.manifest.preprocess
    x = p.prepare(names)
    feed = {p.input_name: x}
    outputs = p.run(x, batch_size=batch)
    p.predict(names, batch_size=batch, return_dict=True)  # warm-up: compilation, allocation, file cache
    t = {k: [] for k in ("decode", "prepare", "run", "raw", "wrapper", "post", "predict")}
    for _ in range(repeats):
        t["decode"].append(clock(lambda: decode_only(names, pre)))
        t["prepare"].append(clock(lambda: p.prepare(names)))
        t["run"].append(clock(lambda: p.run(x, batch_size=batch)))
        t["raw"].append(clock(lambda: p.backend.run(feed)))
        t["wrapper"].append(t["run"][-1] - t["raw"][-1])
        t["post"].append(clock(lambda: postprocess(p, outputs)))
        t["predict"].append(clock(lambda: p.predict(names, batch_size=batch, return_dict=True)))
    m = {k: float(np.median(v)) for k, v in t.items()}
    own = m["prepare"] + max(m["wrapper"], 0.0) + m["post"]
    return {"decode_ms": m["decode"], "preprocess_ms": m["prepare"] - m["decode"], "backend_ms": m["run"],
            "wrapper_ms": m["wrapper"], "postprocess_ms": m["post"], "raw_backend_ms": m["raw"],
            "predict_ms": m["predict"], "overhead_share": own / m["raw"]}


def export_bundles(tmp: Path, calib_size: int) -> dict[str, Path]:
    out = {}
    for key, model in (("brow", "brow"), ("convmae", "deblurring-convmae")):
        print(f"exporting {model} B int8 (openvino, random weights)", flush=True)
        out[key] = omedge.export(model, None, variant="B", formats=["openvino"], precision="int8", calib="synthetic",
                                 calib_size=calib_size, random_weights=True, out=tmp / f"{model}-int8.omedge",
                                 overwrite=True, force=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--brow", type=Path, help="a BROW ViT-B bundle (default: export one)")
    ap.add_argument("--convmae", type=Path, help="a DeblurringMIM ConvMAE-B bundle (default: export one)")
    ap.add_argument("--batch", type=int, action="append", help="batch size(s) (default 1 and 8)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--calib-size", type=int, default=16)
    ap.add_argument("--json")
    args = ap.parse_args()
    batches = args.batch or [1, 8]
    rows = []
    with tempfile.TemporaryDirectory(prefix="omedge-overhead-") as tmp:
        tmp = Path(tmp)
        bundles = {"brow": args.brow, "convmae": args.convmae}
        if not all(bundles.values()):
            bundles = {**export_bundles(tmp, args.calib_size), **{k: v for k, v in bundles.items() if v}}
        inputs = {"brow": pictures(tmp / "tiles", max(batches), (256, 256), False, 1),
                  "convmae": pictures(tmp / "frames", max(batches), (480, 640), True, 2)}
        print(f"{'bundle':10s} {'file':5s} {'batch':>5s} {'decode':>8s} {'preproc':>8s} {'backend':>8s} "
              f"{'wrapper':>8s} {'post':>6s} {'raw run':>8s} {'predict':>8s} {'overhead':>8s}   (ms per batch)")
        for key, bundle in bundles.items():
            p = omedge.load(bundle)
            for ext, files in inputs[key].items():
                for batch in batches:
                    r = {"bundle": key, "artifact": p.describe()["artifact"], "file": ext, "batch": batch,
                         **measure(p, files, batch, args.repeats)}
                    rows.append(r)
                    print(f"{key:10s} {ext:5s} {batch:5d} {r['decode_ms']:8.2f} {r['preprocess_ms']:8.2f} "
                          f"{r['backend_ms']:8.2f} {r['wrapper_ms']:8.2f} {r['postprocess_ms']:6.2f} "
                          f"{r['raw_backend_ms']:8.2f} "
                          f"{r['predict_ms']:8.2f} {r['overhead_share']:8.1%}", flush=True)
            del p
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
