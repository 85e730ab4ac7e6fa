"""Promptable segmentation (SAM, MedSAM): an image encoder run once per image, then a
prompt decoder run per prompt (boxes, points), in numpy + the backends.

The official pipeline of segment_anything's SamPredictor, as data in the manifest:
ResizeLongestSide (PIL bilinear to round(side * S / longest)), (x - mean) / std on 0-255
RGB, zero pad bottom/right to S; prompts scaled into the resized frame, a box being 2
points labelled 2/3, a padding point (label -1) when there is no box; low-res logits ->
bilinear S -> crop to the resized size -> bilinear to the input size -> > threshold.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ..errors import ExportError, InputError, UsageError
from ..parity import compare, cosine_rows, decisive_share
from ..runtime.predictor import Predictor
from ..runtime.preprocess import bilinear_taps
from .base import Kind

# per gate class: the encoder's embedding cosine and the decoder's mask IoU vs torch fp32
GATES = {"fp32": {"cosine_min": 0.9999, "mask_iou_min": 0.99}, "fp16": {"cosine_min": 0.999, "mask_iou_min": 0.98},
         "bf16": {"cosine_min": 0.999, "mask_iou_min": 0.98}, "int8": {"cosine_min": 0.99, "mask_iou_min": 0.95}}


# -- numpy pipeline ------------------------------------------------------------------
def resized_size(h: int, w: int, longest: int) -> tuple[int, int]:
    """ResizeLongestSide.get_preprocess_shape: int(side * scale + 0.5)."""
    scale = longest * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def prepare_image(item, pre: dict) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """Image -> ((1, 3, S, S) float32, input size (h, w), resized size)."""
    from PIL import Image

    from ..io.images import read_image
    img = read_image(item, grayscale=pre.get("grayscale", "replicate"), alpha=pre.get("alpha", "drop"))
    s = int(pre["image_size"])
    h, w = img.shape[:2]
    nh, nw = resized_size(h, w, s)
    x = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR), np.float32)
    x = (x - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    out = np.zeros((1, 3, s, s), np.float32)
    out[0, :, :nh, :nw] = x.transpose(2, 0, 1)
    return out, (h, w), (nh, nw)


def _numbers(value, n: int, what: str) -> list[float]:
    vals = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
    if len(vals) != n or not all(np.isfinite(vals)):
        raise InputError(f"{what} {value!r} needs {n} finite numbers")
    return vals


def prompt_arrays(size, resized, boxes=None, points=None, point_labels=None):
    """Prompts in input-pixel coordinates -> (coords (B, N, 2), labels (B, N)) in the model
    frame: one prompt per box (the points go with every box), else one of the points."""
    h, w = size
    boxes = [_numbers(b, 4, "box") for b in (boxes or [])]
    points = [_numbers(p, 2, "point") for p in (points or [])]
    labels = [1] * len(points) if point_labels is None else list(point_labels)
    if not boxes and not points:
        raise InputError("no prompt given", "give at least one box (x1,y1,x2,y2) or point (x,y) in input pixels")
    if len(labels) != len(points):
        raise InputError(f"{len(points)} points but {len(labels)} point labels")
    for lab in labels:
        if lab not in (0, 1) or isinstance(lab, bool):
            raise InputError(f"point label {lab!r} is not 0 (background) or 1 (foreground)")
    for x1, y1, x2, y2 in boxes:
        if x2 <= x1 or y2 <= y1:
            raise InputError(f"box {x1:g},{y1:g},{x2:g},{y2:g} has zero area", "give x1,y1,x2,y2 with x2 > x1, y2 > y1")
        if min(x1, y1) < 0 or x2 > w or y2 > h:
            raise InputError(f"box {x1:g},{y1:g},{x2:g},{y2:g} is outside the {w}x{h} image")
    for x, y in points:
        if not (0 <= x <= w and 0 <= y <= h):
            raise InputError(f"point {x:g},{y:g} is outside the {w}x{h} image")
    scale = np.array([resized[1] / w, resized[0] / h], np.float32)
    pts = np.asarray(points, np.float32).reshape(-1, 2) * scale
    labs = np.asarray(labels, np.float32)
    if boxes:
        corners = np.asarray(boxes, np.float32).reshape(-1, 2, 2) * scale
        coords = np.concatenate([np.broadcast_to(pts, (len(boxes), *pts.shape)), corners], 1)
        labs = np.concatenate([np.broadcast_to(labs, (len(boxes), len(labs))), np.full((len(boxes), 2), [2, 3])], 1)
        return coords.astype(np.float32), labs.astype(np.float32)
    return np.concatenate([pts, [[0, 0]]])[None].astype(np.float32), np.append(labs, -1)[None].astype(np.float32)


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    i0, i1, w0, w1 = bilinear_taps(n_in, n_out)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), i0), w0)
    np.add.at(m, (np.arange(n_out), i1), w1)
    return m


def postprocess_masks(low_res: np.ndarray, image_size: int, resized, size) -> np.ndarray:
    """(B, K, L, L) logits -> (B, K, H, W): bilinear to S, crop, bilinear to the input size
    (F.interpolate, align_corners=False). Each step is linear, so rows and columns each get
    one composed map; a map mixes a few neighbouring inputs per output, applied as that
    many weighted gathers (no BLAS call: its threads waking beside the backend's spinning
    ones cost more than the decoder)."""
    rows, cols = _post_maps(low_res.shape[-2], low_res.shape[-1], image_size, tuple(resized), tuple(size))
    x = low_res.astype(np.float32, copy=False)
    idx, w = rows
    x = sum(x[..., idx[:, j], :] * w[:, j, None] for j in range(idx.shape[1]))
    idx, w = cols
    return sum(x[..., idx[:, j]] * w[:, j] for j in range(idx.shape[1]))


def _band(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A (n_out, n_in) interpolation map whose rows touch a few neighbouring inputs ->
    (indices, weights), both (n_out, width); taps past the end get weight 0."""
    nz = m != 0
    start = nz.argmax(1)
    end = m.shape[1] - nz[:, ::-1].argmax(1)
    taps = start[:, None] + np.arange(int((end - start).max()))
    inside = taps < m.shape[1]
    idx = np.where(inside, taps, m.shape[1] - 1)
    return idx, np.where(inside, np.take_along_axis(m, idx, 1), 0).astype(np.float32)


@lru_cache(maxsize=16)
def _post_maps(lh: int, lw: int, image_size: int, resized: tuple, size: tuple):
    """The row and column maps of postprocess_masks as bands, cached: every prompt on one
    image reuses them."""
    rows = _interp_matrix(resized[0], size[0]) @ _interp_matrix(lh, image_size)[:resized[0]]
    cols = _interp_matrix(resized[1], size[1]) @ _interp_matrix(lw, image_size)[:resized[1]]
    return _band(rows), _band(cols)


def mask_ious(ref: np.ndarray, got: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """IoU per mask of logits > 0 over the pixels whose reference logit is at least
    `margin` from the threshold (near-ties that rounding may flip are left out, as the
    volume kind's Dice does; two empty masks agree)."""
    ref, got = ref.reshape(-1, ref.shape[-2] * ref.shape[-1]), got.reshape(-1, got.shape[-2] * got.shape[-1])
    keep = np.abs(ref) >= margin
    a, b = (ref > 0) & keep, (got > 0) & keep
    inter, union = (a & b).sum(1), (a | b).sum(1)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


@dataclass
class Embedding:
    """One image's encoder output and the sizes its prompts and masks are mapped with;
    `decoder_side`: the encoder's other outputs (the decoder's per-image projections;
    empty for bundles exported before they were)."""
    image_embeddings: np.ndarray
    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    artifact: str
    decoder_side: dict = field(default_factory=dict)


def embed_with(run, pre: dict, image, artifact: str = "") -> Embedding:
    """The encoder over any runner `run(role, feeds)` (SAM's predictor, MedLSAM's slices)."""
    x, size, resized = prepare_image(image, pre)
    out = run("encoder", {"pixel_values": x})
    emb = out.pop("image_embeddings")
    return Embedding(emb, size, resized, artifact, out)


def decoder_feeds(emb: Embedding, coords, labels) -> dict:
    """The decoder's inputs: the encoder's side outputs and the prompts; the embedding itself
    only for bundles exported before the encoder gave its token layout (image_tokens)."""
    image = {} if "image_tokens" in emb.decoder_side else {"image_embeddings": emb.image_embeddings}
    return {**image, **emb.decoder_side, "point_coords": coords, "point_labels": labels}


def segment_with(run, pre: dict, emb: Embedding, boxes=None, points=None, point_labels=None,
                 multimask_output=False):
    """Prompts -> the decoder over any runner -> masks at the embedded image's size, scores."""
    if not isinstance(emb, Embedding):
        raise InputError("segment() takes the result of embed(image)", "emb = p.embed(image)")
    coords, labels = prompt_arrays(emb.original_size, emb.resized_size, boxes, points, point_labels)
    out = run("decoder", decoder_feeds(emb, coords, labels))
    pick = slice(1, 4) if multimask_output else slice(0, 1)
    logits = postprocess_masks(out["low_res_masks"][:, pick], int(pre["image_size"]), emb.resized_size,
                               emb.original_size)
    masks, scores = logits > float(pre.get("mask_threshold", 0.0)), out["iou_predictions"][:, pick]
    return (masks, scores) if multimask_output else (masks[:, 0], scores[:, 0])


class PromptablePredictor(Predictor):
    role = "encoder"

    def embed(self, image) -> Embedding:
        """Run the image encoder once; keep the result for any number of `segment` calls."""
        return embed_with(self.run_graph, self.manifest.preprocess, image, self.artifact.name)

    def segment(self, emb: Embedding, boxes=None, points=None, point_labels=None, multimask_output=False):
        """masks (bool, N x H x W; N x 3 x H x W with multimask_output) and scores."""
        return segment_with(self.run_graph, self.manifest.preprocess, emb, boxes, points, point_labels,
                            multimask_output)

    def predict(self, image, boxes=None, points=None, point_labels=None, multimask_output=False):
        return self.segment(self.embed(image), boxes, points, point_labels, multimask_output)


class PromptableKind(Kind):
    name = "promptable-segmentation"
    predictor = PromptablePredictor
    min_verify = 3
    max_verify = 8
    serves_oip = False
    cli_predict_help = "one image and --box/--point prompts"

    # -- build side ---------------------------------------------------------------
    def model_request(self, spec, pre, model):
        s, grid, dim = model.img_size, model.grid, model.prompt_encoder.no_mask_embed.weight.shape[1]
        pre = {**pre, "image_size": s, "low_res_size": 4 * grid}
        emb = (1, dim, grid, grid)
        inner = model.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj.out_features
        side = {"image_tokens": (1, grid * grid, dim), **{name: (1, grid * grid, inner)
                                                           for name in ("image_q", "image_k", "image_v")}}
        return pre, {"pixel_values": (1, 3, s, s), "image_embeddings": emb, **side,
                     "low_res_masks": (None, 4, 4 * grid, 4 * grid)}

    def folder_samples(self, source, pre, limit, name="pixel_values"):
        from ..io.images import list_images
        files = list_images(source)
        if limit:
            files = files[::max(1, len(files) // limit)][:limit]
        return [{name: prepare_image(f, pre)[0]} for f in files], [str(f) for f in files]

    def synthetic_samples(self, n, seed, pre, name="pixel_values"):
        from .image import synthetic_images
        s = int(pre["image_size"])
        sizes = [(s, s), (s * 3 // 4, s), (s, s * 2 // 3)]
        return [{name: prepare_image(im[:sizes[i % 3][0], :sizes[i % 3][1]], pre)[0]}
                for i, im in enumerate(synthetic_images(n, seed, size=s))]

    def graph_feeds(self, role, samples, upstream, seed, purpose, model=None):
        """The decoder's prompts, one set per image, in the model frame: 4 boxes, 2 sets of
        2 points (+ padding), or a box with a point (seeded: verification holds out its own)."""
        if role != "decoder":
            raise ExportError(f"{self.name} has no graph '{role}'")
        rng = np.random.default_rng(seed)
        s = samples[0]["pixel_values"].shape[-1]
        feeds = []
        for i in range(len(samples)):
            lo = rng.uniform(0.05, 0.45, (4, 2)) * s
            box = np.concatenate([lo, lo + rng.uniform(0.15, 0.5, (4, 2)) * s], 1).reshape(4, 2, 2)
            pts = rng.uniform(0.1, 0.9, (2, 2, 2)) * s
            if i % 3 == 0:
                coords, labels = box, np.tile([2, 3], (4, 1))
            elif i % 3 == 1:
                coords = np.concatenate([pts, np.zeros((2, 1, 2))], 1)
                labels = np.concatenate([rng.integers(0, 2, (2, 2)), -np.ones((2, 1))], 1)
            else:
                coords, labels = np.concatenate([pts[:1, :1], box[:1]], 1), np.array([[1, 2, 3]])
            feeds.append({"point_coords": coords.astype(np.float32), "point_labels": labels.astype(np.float32)})
        return feeds

    # -- parity -------------------------------------------------------------------
    def parity(self, reference, candidate, gate, overrides, inputs):
        """Embedding cosine (encoder) and mask IoU of the low-res logits > 0 (decoder),
        for the outputs the candidate has; the decoder's inputs came from the candidate
        encoder, so its IoU is end to end."""
        gates = {**GATES[gate], **(overrides or {}).get(gate, {})}
        names = set(candidate[0])
        result = {"gates": gates, "outputs": {}, "failures": []}
        if "image_embeddings" in names:
            emb = compare({"image_embeddings": np.concatenate([r["image_embeddings"] for r in reference])},
                          {"image_embeddings": np.concatenate([c["image_embeddings"] for c in candidate])},
                          {"cosine_min": gates["cosine_min"]})
            result["outputs"].update(emb["outputs"])
            result["failures"] += emb["failures"]
        if "low_res_masks" in names:
            pairs = [(r["low_res_masks"], c["low_res_masks"]) for r, c in zip(reference, candidate)]
            scale = float(np.sqrt(np.mean([np.mean(r.astype(np.float64) ** 2) for r, _ in pairs])))
            margin = decisive_share(gate) * scale
            ious = np.concatenate([mask_ious(r, c, margin) for r, c in pairs])
            every = np.concatenate([mask_ious(r, c) for r, c in pairs])
            score = max(float(np.abs(r["iou_predictions"] - c["iou_predictions"]).max())
                        for r, c in zip(reference, candidate))
            cos = np.concatenate([cosine_rows(r[None], c[None]) for rc, cc in pairs for r, c in zip(rc, cc)])
            score_cos = np.concatenate([cosine_rows(r["iou_predictions"], c["iou_predictions"])
                                        for r, c in zip(reference, candidate)])
            result["outputs"]["low_res_masks"] = {
                "mask_iou_min": float(ious.min()), "mask_iou_mean": float(ious.mean()), "masks": int(ious.size),
                "mask_iou_all_pixels_min": float(every.min()), "decisive_margin": margin,
                "cosine_min": float(cos.min()),  # of the logits, recorded (the gate is the IoU)
                "on": "low-res logits > 0, all 4 outputs, pixels whose torch logit is >= decisive_margin from 0"}
            result["outputs"]["iou_predictions"] = {"max_abs": score, "cosine_min": float(score_cos.min())}
            if ious.min() < gates["mask_iou_min"]:
                result["failures"].append(f"low_res_masks: mask IoU {ious.min():.4f} < {gates['mask_iou_min']}")
        result["passed"] = not result["failures"]
        return result

    def bench_graphs(self, p, inputs, runs):
        """Per-prompt latency on one cached embedding: the decoder graph alone, and
        `segment` (decoder + numpy post-processing to a 600x800 input), one box each."""
        import time
        emb = p.embed(np.zeros((600, 800, 3), np.uint8))
        coords, labels = prompt_arrays((600, 800), emb.resized_size, boxes=[[100, 120, 420, 380]])
        feeds = decoder_feeds(emb, coords, labels)
        out = {}
        for name, call in (("decoder", lambda: p.run_graph("decoder", feeds)),
                           ("segment", lambda: p.segment(emb, boxes=[[100, 120, 420, 380]]))):
            call()
            times = []  # a call takes milliseconds: 5 runs gave a p50 twice the steady one
            while len(times) < max(30, runs) or sum(times) < 1000:
                t = time.perf_counter()
                call()
                times.append((time.perf_counter() - t) * 1000)
            out[f"{name}_p50_ms"] = float(np.percentile(times, 50))
        return out

    # -- CLI ----------------------------------------------------------------------
    def add_cli_arguments(self, parser):
        parser.add_argument("--box", action="append", help="x1,y1,x2,y2 in input pixels (repeatable)")
        parser.add_argument("--point", action="append", help="x,y[,label] in input pixels; label 1 (default) or 0")
        parser.add_argument("--multimask", action="store_true", help="3 candidate masks per prompt; the best is kept")

    def cli_predict(self, p, args, ui) -> int:
        if len(args.inputs) != 1:
            raise UsageError(f"give one image, got {len(args.inputs)}", "embed once, prompt many: use the Python API")
        points, labels = [], []
        for text in args.point or []:
            vals = _numbers(text, 3 if text.count(",") == 2 else 2, "point")
            points.append(vals[:2])
            labels.append(1 if len(vals) == 2 else int(vals[2]) if vals[2] in (0.0, 1.0) else vals[2])
        from ..io.volume import check_output
        if args.output:
            check_output(args.output, args.overwrite, (".png",), "a mask is written as PNG")
        preview = getattr(args, "preview", None)
        if preview:
            check_output(preview, args.overwrite, (".png",), "a preview is written as PNG")
        masks, scores = p.predict(args.inputs[0], boxes=args.box, points=points, point_labels=labels,
                                  multimask_output=args.multimask)
        if args.multimask:  # the best of the 3 per prompt, as SamPredictor users do
            best = scores.argmax(1)
            masks, scores = masks[np.arange(len(best)), best], scores[np.arange(len(best)), best]
        if args.output:
            write_mask_png(args.output, masks)
        if preview:  # the picture with each prompt's mask and box drawn, to check by eye
            from ..io.images import read_image
            from ..pictures import write_overlay
            boxes = [_numbers(b, 4, "box") for b in args.box or []]
            write_overlay(read_image(args.inputs[0]), masks, preview, boxes, args.overwrite)
        results = [{"prompt": i, "box": (args.box or [None] * len(masks))[i], "score": float(scores[i]),
                    "area_px": int(masks[i].sum())} for i in range(len(masks))]
        if args.json:
            print(json.dumps({"runtime": p.describe(), "input": args.inputs[0], "points": points,
                              "point_labels": labels, "output": args.output, "preview": preview,
                              "results": results}, indent=2))
            return 0
        ui.runtime_line(p)
        ui.table("masks", ["prompt", "box", "score", "area px"],
                 [(r["prompt"], r["box"] or "-", f"{r['score']:.3f}", r["area_px"]) for r in results])
        return 0

    def decode_request(self, predictor, tensors, config):
        raise UsageError(f"{self.name} bundles are not served over OIP yet (an embedding cached per image and "
                         "prompts per request need their own API)", "use the Python API: p.embed() then p.segment()")


def write_mask_png(path, masks: np.ndarray):
    """One prompt: a 0/255 mask; several: a label image, prompt i has value i + 1 (later
    prompts drawn over earlier ones). Written atomically (temp file + rename)."""
    import io

    from PIL import Image

    from ..io.volume import write_atomic
    if len(masks) > 255:
        raise InputError(f"{len(masks)} prompts do not fit an 8-bit label PNG (255 at most)")
    out = np.zeros(masks.shape[1:], np.uint8)
    for i, m in enumerate(masks):
        out[m] = 255 if len(masks) == 1 else i + 1
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format="PNG")
    from pathlib import Path
    return write_atomic(Path(path), lambda f: f.write(buf.getvalue()))


KIND = PromptableKind()
