"""Image kind: one picture in, an embedding and/or class logits out (BROW, PathoDuet,
DeblurringMIM). Also the frame-by-frame streaming of image models."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.images import IMAGE_SUFFIXES
from ..parity import compare, concat, gates_for
from ..runtime.predictor import Predictor, softmax
from ..runtime.preprocess import as_items, preprocess, preprocess_one
from .base import Kind


class ImagePredictor(Predictor):
    def predict(self, images, batch_size: int = 8, return_dict: bool = False):
        """Images (paths, PIL images, HWC arrays, or a list / NHWC batch of them) -> the
        primary output, one row per image (a dict of all outputs with return_dict)."""
        outputs = self.run(self.prepare(images), batch_size)
        if not return_dict:
            return outputs[self.manifest.primary_output]
        if "logits" in outputs and self.labels:
            outputs["probabilities"] = softmax(outputs["logits"])
            outputs["labels"] = [self.labels[i] for i in outputs["logits"].argmax(-1)]
        return outputs

    def prepare(self, images) -> np.ndarray:
        return preprocess(images, self.manifest.preprocess)

    def stream_plan(self):
        """(frames per result, sampling interval, frame -> CHW, window -> batch)."""
        pre = self.manifest.preprocess
        return 1, None, lambda f: preprocess_one(f, pre), lambda xs: xs[-1][None]

    def stream(self, source, stride=None, fps=None, queue_size: int = 8, drop=None):
        """Timestamped results for a video file, a folder of frames or a live iterator
        of frames; see omedge.runtime.stream. Counters: `last_stream_stats`."""
        from ..runtime.stream import stream
        return stream(self, source, stride=stride, fps=fps, queue_size=queue_size, drop=drop)


class ImageKind(Kind):
    name = "image"
    predictor = ImagePredictor
    batch_suffixes = tuple(sorted(IMAGE_SUFFIXES))

    def folder_samples(self, source, pre, limit, name="pixel_values"):
        from ..io.images import list_images
        files = list_images(source)
        if limit:
            step = max(1, len(files) // limit)  # spread over the folder, deterministic
            files = files[::step][:limit]
        feeds = []
        for f in files:
            try:
                feeds.append({name: preprocess_one(f, pre)[None]})
            except InputError as e:
                raise InputError(f"calibration image {f} cannot be used: {e.message}",
                                 e.hint or "remove or fix it, then run again") from e
        return feeds, [str(f) for f in files]

    def synthetic_samples(self, n, seed, pre, name="pixel_values"):
        return [{name: preprocess_one(im, pre)[None]} for im in synthetic_images(n, seed)]

    def pipeline_reference(self, run_torch, pre, seed):
        """Raw pictures of odd sizes and the torch outputs for them, so `omedge verify`
        runs the manifest's preprocessing too: a bundle whose preprocessing was changed
        after export fails, although its stored tensors still match."""
        raws = raw_pictures(seed + 5)
        batch = np.stack([preprocess_one(r, pre) for r in raws])
        out = {f"raw_image.{i}": r for i, r in enumerate(raws)}
        out.update({f"raw_reference.{k}": v for k, v in run_torch(batch).items()})
        return out

    def pipeline_check(self, run, stored, pre, gate):
        keys = list(stored.files if hasattr(stored, "files") else stored)
        names = sorted((k for k in keys if k.startswith("raw_image.")), key=lambda k: int(k.split(".")[1]))
        if not names:
            return {}, []
        got = concat([run(preprocess_one(np.asarray(stored[k]), pre)[None]) for k in names])  # batch 1: any graph
        reference = {k.split(".", 1)[1]: np.asarray(stored[k]) for k in keys if k.startswith("raw_reference.")}
        result = self.compare_outputs(reference, got, gates_for(gate))
        failures = [f"from raw pictures through the manifest's preprocessing: {f}" for f in result["failures"]]
        return {"raw_pipeline": {"pictures": len(names), "outputs": result["outputs"]}}, failures

    def parity(self, reference, candidate, gate, overrides, inputs):
        return self.compare_outputs(concat(reference), concat(candidate), gates_for(gate, overrides))

    def compare_outputs(self, reference: dict, candidate: dict, gates: dict) -> dict:
        """The metric of stored and raw-picture checks alike: cosine, top-1 of the logits."""
        return compare(reference, candidate, gates, classify=("logits",))

    # -- serving ------------------------------------------------------------------
    raw_input = "image"

    def serve_outputs(self, manifest):
        meta = super().serve_outputs(manifest)
        if manifest.labels and any(o["name"] == "logits" for o in manifest.outputs):
            meta += [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(manifest.labels)]},
                     {"name": "label", "datatype": "BYTES", "shape": [-1]}]
        return meta

    def decode_raw(self, p, items, config):
        """PNG/JPEG/TIFF/... bytes, decoded and preprocessed as predict does for such files."""
        limit = getattr(config, "max_pixels", None)
        pre = p.manifest.preprocess
        return {p.input_name: np.stack([preprocess_bytes(b, pre, f"image[{i}]", limit) for i, b in enumerate(items)])}

    def decode_files(self, p, paths, config):
        return {p.input_name: p.prepare([str(x) for x in paths])}

    def encode_response(self, p, outputs):
        if "logits" in outputs and p.labels:
            outputs = {**outputs, "probabilities": softmax(outputs["logits"]).astype(np.float32)}
            outputs["label"] = [p.labels[i] for i in outputs["logits"].argmax(-1)]
        return outputs

    def add_cli_arguments(self, parser):
        parser.add_argument("--stride", type=int, help="videos / frame folders: a result every N sampled frames")
        parser.add_argument("--wsi", action="store_true", help="inputs are whole-slide images (implied for .svs, "
                            ".ndpi, .scn, .bif): tissue tiles -> HDF5 features + coords (-o NAME.h5)")
        parser.add_argument("--mpp", type=float, default=0.5, help="slides: µm/px of the tiles (default 0.5, 20x)")
        parser.add_argument("--tile", type=int, default=224, help="slides: tile size in px at --mpp (default 224)")
        parser.add_argument("--mpp-base", type=float, help="slides: the scan's µm/px, for files that do not say it")
        parser.add_argument("--mpp-nearest", action="store_true", help="slides: when --mpp is finer than the scan, "
                            "read tiles at the scan's resolution (with a warning) instead of refusing")
        parser.add_argument("--min-tissue", type=float, default=0.5, help="slides: least tissue share of a tile")
        parser.add_argument("--workers", type=int, default=4, help="slides: tile-reading threads (default 4)")
        parser.add_argument("--thumbnail", help="slides: PNG of the slide with the tissue mask and tile grid")
        parser.add_argument("--heatmap", nargs="?", const="top", metavar="CLASS", help="slides, classifier "
                            "bundles: colour the thumbnail's tiles by CLASS's probability (default: the top class)")

    def cli_predict(self, p, args, ui) -> int:
        from ..io.video import VIDEO_SUFFIXES
        from ..io.wsi import SLIDE_SUFFIXES
        if getattr(args, "wsi", False) or any(Path(i).suffix.lower() in SLIDE_SUFFIXES for i in args.inputs):
            from ..wsi import cli_run
            return cli_run(p, args, ui)
        if any(Path(i).suffix.lower() in VIDEO_SUFFIXES or Path(i).is_dir() for i in args.inputs):
            return stream_report(p, args, ui)
        outputs = p.predict(args.inputs, batch_size=args.batch_size or 8, return_dict=True)
        results = []
        for i, name in enumerate(args.inputs):
            results.append({"input": name, **{k: v[i] if k == "labels" else v[i].tolist() for k, v in outputs.items()}})
        info = p.describe()
        if args.json:
            print(json.dumps({"runtime": info, "results": results}, indent=None if len(results) > 4 else 2))
            return 0
        ui.runtime_line(p)
        if "labels" in outputs:
            ui.table("predictions", ["input", "label", "probability"],
                     [(r["input"], r["labels"], f"{max(r['probabilities']):.3f}") for r in results])
        else:
            primary = p.manifest.primary_output
            ui.table("embeddings", ["input", "dim", "L2 norm", "values"],
                     [(r["input"], len(r[primary]), f"{np.linalg.norm(r[primary]):.4f}",
                       ", ".join(f"{x:.4f}" for x in r[primary][:4]) + ", ...") for r in results])
        return 0


def stream_report(p, args, ui) -> int:
    """Video files / frame folders: one result per clip window (or frame), with times."""
    report = []
    for src in args.inputs:
        windows = []
        for r in p.stream(src, stride=args.stride):
            w = {k: v for k, v in r.items() if k != "outputs"}
            w.update({k: v.tolist() for k, v in r["outputs"].items()})
            windows.append(w)
        report.append({"input": src, "windows": windows, "stats": p.last_stream_stats})
    if args.json:
        print(json.dumps({"runtime": p.describe(), "results": report}))
        return 0
    for item in report:
        rows = [(w["index"], f"{w['t_start']:.2f}-{w['t_end']:.2f}", w.get("label", "-"),
                 f"{w['probability']:.3f}" if "probability" in w else "-", f"{w['latency_ms']:.0f}")
                for w in item["windows"]]
        st = item["stats"]
        ui.table(f"{item['input']}: {st['results']} results, {st['dropped']} dropped, {st['corrupt']} corrupt frames",
                 ["window", "time s", "label", "probability", "latency ms"], rows)
    return 0


def preprocess_bytes(data: bytes, pre: dict, name: str, max_pixels: int | None = None) -> np.ndarray:
    """An encoded image held in memory -> CHW, exactly as preprocess_one does for a file with
    these bytes: the header is size-checked before decoding (io.images.open_image, the same
    Pillow decoder), then the manifest's pipeline. Grey-blur models (DeblurringMIM) read grey
    as cv2.imread does, which io.opencv_compat.imread_gray does from a path only: their bytes
    go through a private temporary file, deleted at once."""
    import io
    import tempfile

    from ..io.images import open_image
    with open_image(io.BytesIO(data), name, max_pixels) as img:
        if (pre.get("blur") or {}).get("on") != "grayscale":
            img.load()
            return preprocess_one(img, pre)
    with tempfile.NamedTemporaryFile(prefix="omedge-serve-", suffix=".img") as f:
        f.write(data)
        f.flush()
        try:
            return preprocess_one(Path(f.name), pre)
        except InputError as e:
            raise InputError(e.message.replace(f.name, name), e.hint) from None


def synthetic_images(n: int, seed: int, size: int = 256) -> list[np.ndarray]:
    """Smooth random colour fields (not noise): 16x16 random RGB upsampled bicubically.
    Only used when the user asks for synthetic data; the manifest says so."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    return [np.asarray(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
                       .resize((size, size), Image.BICUBIC)) for _ in range(n)]


def raw_pictures(seed: int) -> list[np.ndarray]:
    """Three synthetic RGB pictures, not square and not the model's size, so resizing,
    cropping and normalisation all take part."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    pictures = []
    for w, h in ((300, 260), (224, 224), (389, 517)):
        base = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        noise = rng.integers(-12, 13, (h, w, 3))
        pictures.append(np.clip(np.asarray(base, np.int16) + noise, 0, 255).astype(np.uint8))
    return pictures


KIND = ImageKind()
__all__ = ["KIND", "ImagePredictor", "as_items"]
