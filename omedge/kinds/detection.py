"""Grounded detection (GLIP-T / MIU-VL): an image and a caption in, boxes labelled with
the caption's phrases out.

One fixed-size graph (Swin's shifted-window masks depend on the shape) runs the image and
the tokens together; the caption's tokenisation, the positive map, the anchors, ATSS
decoding, score aggregation, NMS and top-k run here in numpy (omedge.grounding).

Prompts: `prompt` is the caption the model reads ("pink round polyp in rectum"); the
phrases are the parts of it that label boxes (MIU-VL: only the name span is positive).
Default: the whole caption is one phrase, or each part of a GLIP class list "a . b . c".
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .. import grounding as g
from ..errors import ExportError, InputError, UsageError
from ..parity import compare, concat, gates_for
from ..runtime.predictor import Predictor
from .base import Kind

IMAGE_SIZE = (800, 1344)     # 800 x 1333 padded to 32: the official canvas of a landscape frame
DEFAULT_PROMPT = "polyp"
SCORE_THRESHOLD = 0.5        # GLIPDemo.run_on_web_image's default confidence
# box parity: reference boxes above BOX_SCORE must have a candidate box of the same phrase at IoU >= BOX_IOU
BOX_GATES = {"box_score": 0.3, "box_iou_min": 0.9, "box_match_min": 0.99, "fallback_top": 10}
RUNS_WHERE = {"graph (backend)": "Swin-T backbone, FPN P3-P7, BERT, VLDyHead fusion + DCNv2 towers: raw box "
                                 "regression, centerness, token logits per location",
              "run side (numpy, omedge.grounding)": "resize/normalise/pad, WordPiece tokenizer (tokenizers), "
                                                    "positive map, anchors, ATSS decoding, MEAN score aggregation, "
                                                    "per-phrase NMS, top-100, boxes to input pixels"}


def post_facts(pre: dict) -> dict:
    """The ATSS post-processing settings of the spec's preprocessing, in omedge.grounding's names."""
    return {"pre_nms_thresh": float(pre.get("score_threshold", g.POST["pre_nms_thresh"])),
            "pre_nms_top_n": int(pre.get("pre_nms_top_n", g.POST["pre_nms_top_n"])),
            "nms_thresh": float(pre.get("nms", g.POST["nms_thresh"])),
            "detections": int(pre.get("detections", g.POST["detections"])), "min_size": g.POST["min_size"],
            "strides": list(pre.get("strides", g.STRIDES)), "anchor_sizes": list(pre.get("anchor_sizes", g.SIZES))}


def text_facts(folder, pre: dict | None = None) -> tuple[dict, list[str]]:
    """The tokenizer facts of a local Hugging Face BERT folder (lowercase: its
    tokenizer_config.json, else the spec's lower_case), with the vocab's hash."""
    from ..io.text_folder import read_bert_folder
    _, words, extra = read_bert_folder(folder, "GLIP-T / MIU-VL read captions with bert-base-uncased: give that folder")
    pre = pre or {}
    facts = {"lowercase": bool(extra.get("do_lower_case", pre.get("lower_case", True))),
             "strip_accents": extra.get("strip_accents"), "max_tokens": int(pre.get("max_query_len", g.MAX_TOKENS)),
             "vocab": "constant 'vocab'", "vocab_size": len(words),
             "vocab_sha256": hashlib.sha256("\n".join(words).encode()).hexdigest()}
    return facts, words


def _canvas(value) -> tuple[int, int]:
    if isinstance(value, str):
        value = value.lower().replace(",", "x").split("x")
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise UsageError(f"image_size {value!r} is not H x W", "e.g. image_size=(800, 1344) or --image-size 800x1344")
    if h % 32 or w % 32 or min(h, w) < 64 or max(h, w) > 2048:
        raise UsageError(f"image_size {h}x{w} must be multiples of 32, between 64 and 2048",
                         "the default 800x1344 holds the official 800 x 1333 resize of a landscape frame")
    return h, w


def tokenizer_for(pre: dict, vocab) -> g.Tokenizer:
    t = pre.get("text", {})
    return g.Tokenizer(vocab, t.get("lowercase", True), t.get("strip_accents"), t.get("max_tokens", g.MAX_TOKENS))


class DetectionPredictor(Predictor):
    _tokenizer = None
    _anchors = None

    @property
    def tokenizer(self) -> g.Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = tokenizer_for(self.manifest.preprocess, self.constant("vocab"))
        return self._tokenizer

    @property
    def anchors(self) -> np.ndarray:
        if self._anchors is None:
            self._anchors = self.constant("anchors").astype(np.float32)
        return self._anchors

    def encode(self, prompt: str, phrases=None) -> g.Prompt:
        """The caption's graph inputs and the positive map of its phrases (omedge.grounding.encode_prompt)."""
        return g.encode_prompt(self.tokenizer, prompt, phrases)

    def detect_one(self, image, prompt: g.Prompt, score_threshold: float):
        """(detections, Frame) of one image for an encoded prompt."""
        pre = self.manifest.preprocess
        x, frame = g.preprocess(image, pre)
        out = self.run_graph(self.role, {"pixel_values": x, "input_ids": prompt.input_ids,
                                         "attention_mask": prompt.attention_mask})
        dets = g.detect(out, self.anchors, prompt.positive_map, frame, prompt.phrases, score_threshold,
                        pre.get("post"))
        return dets, frame

    def detect(self, images, prompt: str, phrases=None, score_threshold: float = SCORE_THRESHOLD):
        """Boxes for `prompt` in an image (path, PIL image, HWC array): a list of {box
        [x1, y1, x2, y2] in the image's pixels, score, phrase, phrase_index}, best first; a
        list of images gives a list of such lists. No match is an empty list."""
        if not isinstance(score_threshold, (int, float)) or not 0 <= score_threshold < 1:
            raise InputError(f"score threshold {score_threshold!r} is not in [0, 1)")
        encoded = self.encode(prompt, phrases)
        if isinstance(images, (list, tuple)):
            return [self.detect_one(im, encoded, score_threshold)[0] for im in images]
        return self.detect_one(images, encoded, score_threshold)[0]


class DetectionKind(Kind):
    name = "grounded-detection"
    predictor = DetectionPredictor
    min_verify = 2
    max_verify = 4
    run_extras = ("text",)
    serves_oip = False
    serve_merge = False
    cli_predict_help = "images and a --prompt caption (--phrase: which words label the boxes)"

    # -- build side ---------------------------------------------------------------
    def export_request(self, spec, preprocess, options):
        """text_encoder (a local BERT folder: its config, vocab and casing), image_size (the
        fixed canvas, H x W), prompt (the caption of the calibration/verification samples)."""
        unknown = sorted(set(options) - {"text_encoder", "image_size", "prompt"})
        if unknown:
            raise UsageError(f"{', '.join(unknown)} do not apply to {spec.id}",
                             "it takes text_encoder, image_size and prompt")
        if not options.get("text_encoder"):
            raise UsageError(f"{spec.id} needs its text encoder's folder (config + vocab)",
                             "--text-encoder bert-base-uncased/ (a local Hugging Face folder)")
        h, w = _canvas(options.get("image_size", preprocess.get("canvas", IMAGE_SIZE)))
        facts, words = text_facts(options["text_encoder"], preprocess)
        prompt = options.get("prompt") or DEFAULT_PROMPT
        tok = g.Tokenizer(words, facts["lowercase"], facts["strip_accents"], facts["max_tokens"])
        facts["pad_id"] = tok.pad_id
        captions = [prompt, f"{prompt} . background"]
        encoded = [g.encode_prompt(tok, c) for c in captions]  # refuses a bad prompt now, not after the build
        pre = {"min_size": 800, "max_size": 1333, "size_divisibility": 32, "interpolation": "bilinear",
               "color": "BGR", "grayscale": "replicate", "alpha": "drop", **preprocess, "canvas": [h, w],
               "text": facts, "post": post_facts(preprocess), "runs_where": RUNS_WHERE,
               "verify_captions": [{"text": c, "ids": e.input_ids[0, :e.tokens].tolist()}
                                   for c, e in zip(captions, encoded)]}
        for key in ("mean", "std"):
            if key not in pre:
                raise ExportError(f"{spec.id}'s spec gives no pixel {key}")
        inputs = [{**i.to_dict(), "shape": [1, 3, h, w]} if i.name == "pixel_values" else i.to_dict()
                  for i in spec.inputs]
        return pre, inputs, {"image_size": (h, w), "text_encoder": str(options["text_encoder"])}

    def model_request(self, spec, pre, model):
        """The output sizes of the canvas, and the model's constants checked against the run
        side's: anchors equal to make_anchors(canvas), the vocab the prompts were tokenised with."""
        h, w = pre["canvas"]
        anchors = g.make_anchors((h, w), pre["post"]["strides"], pre["post"]["anchor_sizes"])
        n = len(anchors)
        consts = model.constants() if hasattr(model, "constants") else {}
        if "anchors" in consts:
            got = np.asarray(consts["anchors"].detach().cpu().numpy() if hasattr(consts["anchors"], "detach")
                             else consts["anchors"], np.float32)
            if got.shape != anchors.shape or not np.allclose(got, anchors):
                raise ExportError(f"the model's anchors {got.shape} differ from the run side's {anchors.shape}")
        if "vocab" in consts:
            words = [str(v) for v in np.asarray(consts["vocab"]).ravel()]
            if hashlib.sha256("\n".join(words).encode()).hexdigest() != pre["text"]["vocab_sha256"]:
                raise ExportError("the model's vocab constant is not the text encoder folder's vocab.txt")
        return pre, {"pixel_values": (1, 3, h, w), "box_regression": (1, n, 4), "centerness": (1, n),
                     "token_logits": (1, n, pre["text"]["max_tokens"])}

    def _feed(self, image, pre, i: int) -> dict:
        x, _ = g.preprocess(image, pre)
        caps = pre["verify_captions"]
        ids = caps[i % len(caps)]["ids"]
        tokens = np.full((1, pre["text"]["max_tokens"]), pre["text"].get("pad_id", 0), np.int64)
        tokens[0, :len(ids)] = ids
        mask = (np.arange(tokens.shape[1]) < len(ids)).astype(np.int64)[None]
        return {"pixel_values": x, "input_ids": tokens, "attention_mask": mask}

    def folder_samples(self, source, pre, limit, name="pixel_values"):
        """Frames of the user's folder, each with a verification caption (the export's prompt)."""
        from ..io.images import list_images
        files = list_images(source)
        if limit:
            files = files[::max(1, len(files) // limit)][:limit]
        return [self._feed(f, pre, i) for i, f in enumerate(files)], [str(f) for f in files]

    def synthetic_samples(self, n, seed, pre, name="pixel_values"):
        """Smooth random pictures of landscape and portrait sizes, with the captions."""
        from .image import synthetic_images
        ch, cw = pre["canvas"]
        shapes = [(ch * 3 // 4, cw), (ch, ch), (ch // 2, cw * 2 // 3)]
        pics = synthetic_images(n, seed, size=max(ch, cw))
        return [self._feed(p[:shapes[i % 3][0], :shapes[i % 3][1]], pre, i) for i, p in enumerate(pics)]

    # -- parity -------------------------------------------------------------------
    def parity(self, reference, candidate, gate, overrides, inputs):
        """Raw outputs: cosine (and max error) per sample; boxes: both sides through the same
        numpy post-processing (the caption's tokens as one phrase), reference boxes above
        box_score matched by a candidate box of the same phrase at IoU >= box_iou_min."""
        result = compare(concat(reference), concat(candidate), gates_for(gate, overrides))
        gates = {**BOX_GATES, **(overrides or {}).get(gate, {})}
        result["gates"] = {**result["gates"], **gates}
        counts = box_match(reference, candidate, inputs, gates)
        result["outputs"]["boxes"] = counts
        if counts["matched_share"] < gates["box_match_min"]:
            result["failures"].append(f"boxes: {counts['matched']}/{counts['reference_boxes']} reference boxes "
                                      f"matched at IoU >= {gates['box_iou_min']} ({counts['matched_share']:.3f} < "
                                      f"{gates['box_match_min']})")
        result["passed"] = not result["failures"]
        return result

    # -- CLI ----------------------------------------------------------------------
    def add_cli_arguments(self, parser):
        parser.add_argument("--prompt", help="grounded detection: the caption the model reads, e.g. "
                            "\"pink round polyp in rectum\"")
        parser.add_argument("--phrase", action="append", help="grounded detection: words of --prompt that label "
                            "boxes (repeatable; default: the whole caption, or each part of \"a . b . c\")")
        parser.add_argument("--score-threshold", type=float, default=SCORE_THRESHOLD,
                            help=f"grounded detection: keep boxes scoring above this (default {SCORE_THRESHOLD}; "
                            "0 lists the official top 100)")

    def cli_predict(self, p, args, ui) -> int:
        return cli_run(p, args, ui)

    def decode_request(self, predictor, tensors, config):
        raise UsageError(f"{self.name} bundles are not served over OIP yet (an image and a caption per request, "
                         "boxes back, need their own request format)",
                         "use the Python API: p.detect(image, prompt) or `omedge predict BUNDLE IMAGE --prompt ...`")


def box_match(reference, candidate, inputs, gates) -> dict:
    """Counts of the box comparison over all samples (see DetectionKind.parity); candidate
    boxes above box_score that no reference box matches are counted too (recorded)."""
    total = matched = fallback = cand_boxes = extra = 0
    worst = 1.0
    for ref, cand, feed in zip(reference, candidate, inputs):
        canvas = tuple(feed["pixel_values"].shape[-2:])
        frame, anchors = g.Frame(canvas, canvas, canvas, canvas), g.make_anchors(canvas)
        pm, names = _halves(int(np.asarray(feed["attention_mask"][0]).sum()), feed["attention_mask"].shape[-1])
        if not names:
            continue
        r = g.detect(ref, anchors, pm, frame, names)
        c = g.detect(cand, anchors, pm, frame, names)
        cand_boxes += len(c)
        sel = [d for d in r if d["score"] > gates["box_score"]]
        if not sel:
            sel, fallback = r[:gates["fallback_top"]], fallback + 1
        rb = np.asarray([d["box"] for d in r], np.float32).reshape(-1, 4)
        cb = np.asarray([d["box"] for d in c], np.float32).reshape(-1, 4)
        labels = np.asarray([d["phrase_index"] for d in c], np.int64)
        for d in sel:
            best = float(iou(np.asarray(d["box"], np.float32), cb[labels == d["phrase_index"]]).max(initial=0.0))
            worst = min(worst, best)
            matched += best >= gates["box_iou_min"]
            total += 1
        ref_labels = np.asarray([d["phrase_index"] for d in r], np.int64)
        extra += sum(iou(np.asarray(d["box"], np.float32), rb[ref_labels == d["phrase_index"]]).max(initial=0.0)
                     < gates["box_iou_min"] for d in c if d["score"] > gates["box_score"])
    out = {"reference_boxes": total, "matched": int(matched), "candidate_boxes": cand_boxes,
           "candidate_confident_unmatched": int(extra), "matched_share": matched / total if total else 1.0,
           "iou_min": worst if total else None, "samples_top10_fallback": fallback,
           "on": f"boxes with reference score > {gates['box_score']} (samples with none: their top "
                 f"{gates['fallback_top']}), a box of the same phrase; phrases: the caption's tokens in two halves, "
                 "boxes on the canvas"}
    if not total:
        out["note"] = ("the reference has no box above the 0.05 candidate threshold (random weights keep GLIP's "
                       "prior of 0.01): the raw-output gates decide")
    return out


def _halves(n_tokens: int, width: int) -> tuple[np.ndarray, list[str]]:
    """Two phrases over the caption's tokens (without [CLS] and [SEP]): the first and the
    second half (one phrase for a one-token caption), so phrase labels are compared too."""
    first, last = 1, n_tokens - 2
    if last < first:
        return np.zeros((0, width), np.float32), []
    mid = (first + last + 1) // 2 if last > first else last + 1
    pm = np.zeros((2 if last > first else 1, width), np.float32)
    pm[0, first:mid] = 1.0
    if last > first:
        pm[1, mid:last + 1] = 1.0
    return pm, [f"tokens {first}-{mid - 1}", f"tokens {mid}-{last}"][:len(pm)]


def iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Plain IoU (continuous coordinates) of one box against many."""
    iw = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = iw * ih
    union = (box[2] - box[0]) * (box[3] - box[1]) + (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return np.where(union - inter > 0, inter / np.maximum(union - inter, 1e-12), 1.0)


def drawn_paths(output, inputs: list[str]) -> list[Path | None]:
    """-o for one input is that file; for several, NAME-<input stem>.SUFFIX beside it."""
    if not output:
        return [None] * len(inputs)
    out = Path(output)
    if len(inputs) == 1:
        return [out]
    paths, seen = [], set()
    for i, name in enumerate(inputs):
        stem = Path(name).stem
        path = out.with_name(f"{out.stem}-{stem}{out.suffix}")
        if path in seen:
            path = out.with_name(f"{out.stem}-{stem}-{i}{out.suffix}")
        seen.add(path)
        paths.append(path)
    return paths


def cli_run(p, args, ui) -> int:
    if not args.prompt:
        raise UsageError("grounded detection needs a caption", 'add --prompt "pink round polyp"')
    if not args.inputs:
        raise UsageError("give at least one image")
    from ..io.volume import check_output
    paths = drawn_paths(args.output, args.inputs)
    for path in paths:
        if path is not None:
            check_output(path, args.overwrite, (".png", ".jpg", ".jpeg"), "the drawn boxes are written as PNG or JPEG")
    encoded = p.encode(args.prompt, args.phrase)
    if not 0 <= args.score_threshold < 1:
        raise UsageError(f"--score-threshold {args.score_threshold} is not in [0, 1)")
    results = []
    for name, path in zip(args.inputs, paths):
        dets, frame = p.detect_one(name, encoded, args.score_threshold)
        if path is not None:
            g.draw(name, dets, path, args.overwrite, len(encoded.phrases))
        results.append({"input": name, "size": [frame.original[1], frame.original[0]], "detections": dets,
                        "drawn": str(path) if path else None, "notes": frame.notes})
    if args.json:
        print(json.dumps({"runtime": p.describe(), "prompt": args.prompt, "phrases": encoded.phrases,
                          "score_threshold": args.score_threshold, "results": results}, indent=2))
        return 0
    ui.runtime_line(p)
    for r in results:
        rows = [(d["phrase"], f"{d['score']:.3f}", ", ".join(f"{v:.0f}" for v in d["box"])) for d in r["detections"]]
        title = f"{r['input']}: {len(rows)} boxes for {', '.join(repr(x) for x in encoded.phrases)}"
        ui.table(title + (f" (drawn: {r['drawn']})" if r["drawn"] else ""), ["phrase", "score", "x1, y1, x2, y2"],
                 rows or [("-", "-", "no box above the threshold")])
        for note in r["notes"]:
            ui.err.print(f"note: {note}")
    return 0


KIND = DetectionKind()
