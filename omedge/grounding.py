"""GLIP / MIU-VL grounded detection on the run side: numpy + Pillow + `tokenizers`, no torch.

The graph gives raw per-location outputs (box_regression, centerness, token_logits over
the 5 FPN levels, one anchor per location); everything after it is here, following
microsoft/GLIP at inference:
- anchors: modeling/rpn/anchor_generator.py (generate_anchors, grid_anchors);
- decoding: modeling/rpn/vldyhead.py BoxCoder (weights 10,10,5,5, TO_REMOVE=1, dw/dh
  clamped at log(1000/16));
- scores: modeling/rpn/inference.py ATSSPostProcessor with dot-product logits: sigmoid,
  MEAN over each phrase's tokens (convert_grounding_to_od_logits), candidates > 0.05 per
  level, at most 1000 per level by score x sigmoid(centerness), sqrt, clip to the resized
  image, per-phrase NMS 0.6 (csrc/cuda/ml_nms.cu: +1 areas, IoU > thresh), top 100 by
  kthvalue (ties kept), then BoxList.resize to the original image;
- input: data/transforms (Resize(800, 1333).get_size, PIL bilinear, ToTensor, BGR x 255,
  Normalize), structures/image_list.py (zero pad bottom/right);
- prompts: engine/predictor_glip.py create_positive_map (char span -> tokens with the
  tokenizer's char_to_token and its +-1/2 fallbacks).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError, UsageError

STRIDES = (8, 16, 32, 64, 128)
SIZES = (64, 128, 256, 512, 1024)
MAX_TOKENS = 256
# the official test-time settings (GLIP config defaults, MIU-VL config): used where the manifest says nothing
POST = {"pre_nms_thresh": 0.05, "pre_nms_top_n": 1000, "nms_thresh": 0.6, "detections": 100, "min_size": 0}
BBOX_CLIP = math.log(1000.0 / 16)
WEIGHTS = (10.0, 10.0, 5.0, 5.0)


# -- anchors -----------------------------------------------------------------------
def cell_anchors(stride: int, sizes=(64,), ratios=(1.0,)) -> np.ndarray:
    """generate_anchors(stride, sizes, ratios) as float32 [A, 4]: the (0, 0, s-1, s-1) window,
    each ratio at a rounded equal area, then each size / stride scale, about the same centre."""
    def mk(ws, hs, cx, cy):
        return np.stack([cx - 0.5 * (ws - 1), cy - 0.5 * (hs - 1), cx + 0.5 * (ws - 1), cy + 0.5 * (hs - 1)], 1)
    w = h = float(stride)
    cx = cy = 0.5 * (stride - 1)
    ratios = np.asarray(ratios, np.float64)
    ws = np.round(np.sqrt(w * h / ratios))
    per_ratio = mk(ws, np.round(ws * ratios), cx, cy)
    scales = np.asarray(sizes, np.float64) / stride
    out = []
    for a in per_ratio:
        aw, ah = a[2] - a[0] + 1, a[3] - a[1] + 1
        out.append(mk(aw * scales, ah * scales, a[0] + 0.5 * (aw - 1), a[1] + 0.5 * (ah - 1)))
    return np.concatenate(out).astype(np.float32)


def level_shapes(canvas_hw, strides=STRIDES) -> list[tuple[int, int]]:
    """FPN level sizes of a canvas: ceil(H / s) x ceil(W / s) (P6/P7 are stride-2 3x3 convs)."""
    return [(-(-int(canvas_hw[0]) // s), -(-int(canvas_hw[1]) // s)) for s in strides]


def make_anchors(canvas_hw, strides=STRIDES, sizes=SIZES) -> np.ndarray:
    """float32 [N, 4] x1,y1,x2,y2 in canvas pixels: levels in order, each row-major over
    (y, x), one anchor per location (grid_anchors: shifts 0, s, 2s, ... plus the cell anchor)."""
    if len(strides) != len(sizes):
        raise UsageError(f"{len(strides)} strides but {len(sizes)} anchor sizes")
    parts = []
    for (gh, gw), s, size in zip(level_shapes(canvas_hw, strides), strides, sizes):
        base = cell_anchors(s, (size,) if np.isscalar(size) else tuple(size))
        sx = np.arange(0, gw * s, s, dtype=np.float32)
        sy = np.arange(0, gh * s, s, dtype=np.float32)
        yy, xx = np.meshgrid(sy, sx, indexing="ij")
        shifts = np.stack([xx.ravel(), yy.ravel(), xx.ravel(), yy.ravel()], 1)
        parts.append((shifts[:, None, :] + base[None]).reshape(-1, 4))
    return np.concatenate(parts).astype(np.float32)


# -- image ---------------------------------------------------------------------------
def official_size(h: int, w: int, min_size: int = 800, max_size: int = 1333) -> tuple[int, int]:
    """Resize.get_size: short side min_size unless the long side would pass max_size
    (then the short side is round(max_size * short / long)); the other side truncated."""
    size = min_size
    lo, hi = float(min(h, w)), float(max(h, w))
    if max_size is not None and hi / lo * size > max_size:
        size = round(max_size * lo / hi)
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


@dataclass
class Frame:
    """Where an input image went on the fixed canvas: the official resize, what was used
    (smaller when the official one does not fit the canvas) and whether the padding is the
    official multiple-of-32 one (else the model sees more zero padding than the original)."""
    original: tuple[int, int]
    official: tuple[int, int]
    resized: tuple[int, int]
    canvas: tuple[int, int]
    shrunk: bool = False
    official_padding: bool = True
    notes: list[str] = field(default_factory=list)


def fit_canvas(h: int, w: int, canvas_hw, min_size=800, max_size=1333, divisor=32) -> Frame:
    ch, cw = int(canvas_hw[0]), int(canvas_hw[1])
    oh, ow = official_size(h, w, min_size, max_size)
    frame = Frame((h, w), (oh, ow), (oh, ow), (ch, cw))
    if oh > ch or ow > cw:
        r = min(ch / h, cw / w)
        frame.resized = (max(1, min(ch, round(h * r))), max(1, min(cw, round(w * r))))
        frame.shrunk = True
        frame.notes.append(f"the official size {ow}x{oh} does not fit the {cw}x{ch} canvas: resized to "
                           f"{frame.resized[1]}x{frame.resized[0]} instead (export with image_size to match it)")
    padded = tuple(-(-s // divisor) * divisor for s in frame.resized)
    if padded != (ch, cw):
        frame.official_padding = False
        frame.notes.append(f"padded to the {cw}x{ch} canvas, the original pads to {padded[1]}x{padded[0]}")
    return frame


def preprocess(image, pre: dict) -> tuple[np.ndarray, Frame]:
    """RGB image (path, PIL, HWC array) -> ([1, 3, H, W] float32 on the canvas, Frame):
    PIL bilinear to the official size, /255 then x255 as ToTensor + to_bgr255 do, BGR,
    (x - mean) / std, zero padding bottom/right."""
    from PIL import Image

    from .io.images import read_image
    img = read_image(image, grayscale=pre.get("grayscale", "replicate"), alpha=pre.get("alpha", "drop"))
    ch, cw = pre["canvas"]
    frame = fit_canvas(img.shape[0], img.shape[1], (ch, cw), pre.get("min_size", 800), pre.get("max_size", 1333),
                       pre.get("size_divisibility", 32))
    rh, rw = frame.resized
    if img.dtype == np.uint8:
        x = np.asarray(Image.fromarray(img).resize((rw, rh), Image.BILINEAR), np.float32) / np.float32(255)
    else:  # float [0, 1]: each channel resized in Pillow's float mode
        x = np.stack([np.asarray(Image.fromarray(img[..., c], mode="F").resize((rw, rh), Image.BILINEAR))
                      for c in range(3)], 2).astype(np.float32)
    x = x[..., ::-1] * np.float32(255) if pre.get("color", "BGR") == "BGR" else x * np.float32(255)
    x = (x - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    out = np.zeros((1, 3, ch, cw), np.float32)
    out[0, :, :rh, :rw] = x.transpose(2, 0, 1)
    return out, frame


# -- text ----------------------------------------------------------------------------
class Tokenizer:
    """BERT WordPiece from the stored vocab (id order), as transformers' BertTokenizerFast
    builds it: BertNormalizer (clean text, Chinese chars, lowercase, accents stripped when
    lowercasing unless told), BertPreTokenizer, [CLS] text [SEP]."""

    def __init__(self, vocab, lowercase: bool = True, strip_accents=None, max_tokens: int = MAX_TOKENS):
        try:
            from tokenizers.implementations import BertWordPieceTokenizer
        except ImportError:
            raise UsageError("grounded-detection bundles need the `tokenizers` package to read prompts",
                             'pip install "omedge[text]"') from None
        words = [str(v) for v in np.asarray(vocab).ravel()]
        missing = [t for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]") if t not in words]
        if missing:
            raise UsageError(f"the vocabulary has no {', '.join(missing)}: it is not a BERT WordPiece vocab.txt")
        self.vocab = {w: i for i, w in enumerate(words)}  # a repeated line: the last id wins, as load_vocab
        self.max_tokens = int(max_tokens)
        self.pad_id = self.vocab["[PAD]"]
        self._tok = BertWordPieceTokenizer(self.vocab, lowercase=bool(lowercase), strip_accents=strip_accents,
                                           clean_text=True, handle_chinese_chars=True)

    def encode(self, text: str):
        """The tokenizers Encoding ([CLS] ... [SEP], no truncation, no padding)."""
        return self._tok.encode(text)


@dataclass
class Prompt:
    input_ids: np.ndarray        # int64 [1, 256]
    attention_mask: np.ndarray   # int64 [1, 256]
    positive_map: np.ndarray     # float32 [P, 256], 1 on each phrase's tokens
    phrases: list[str]
    spans: list[tuple[int, int]]  # character spans in the caption
    tokens: int


def caption_phrases(caption: str) -> list[tuple[int, int]]:
    """Default labels of a caption: each part of a GLIP class list "a . b . c" (parts
    separated by a period followed by a space, or ending one), else the whole caption."""
    spans, start = [], 0
    for m in list(re.finditer(r"\.(?=\s|$)", caption)) + [None]:
        end = m.start() if m else len(caption)
        part = caption[start:end]
        if part.strip():
            lead = len(part) - len(part.lstrip())
            spans.append((start + lead, start + lead + len(part.strip())))
        start = m.end() if m else end
    return spans


def find_phrase(caption: str, phrase: str) -> tuple[int, int]:
    """The first whole-word, case-insensitive occurrence (else the first occurrence at all)."""
    low, p = caption.lower(), phrase.strip().lower()
    if not p:
        raise InputError("an empty --phrase was given", "give words of the prompt, e.g. --phrase polyp")
    m = re.search(r"(?<!\w)" + re.escape(p) + r"(?!\w)", low)
    start = m.start() if m else low.find(p)
    if start < 0:
        raise InputError(f"phrase {phrase!r} is not in the prompt {caption!r}",
                         "each --phrase must be words of the --prompt, which is the caption the model reads")
    return start, start + len(p)


def span_tokens(enc, beg: int, end: int) -> tuple[int, int] | None:
    """create_positive_map: char_to_token(beg) (else beg+1, beg+2) .. char_to_token(end-1)
    (else end-2, end-3), inclusive token indices."""
    first = next((t for t in (enc.char_to_token(c) for c in (beg, beg + 1, beg + 2)) if t is not None), None)
    last = next((t for t in (enc.char_to_token(c) for c in (end - 1, end - 2, end - 3) if c >= 0)
                 if t is not None), None)
    return None if first is None or last is None else (first, last)


def encode_prompt(tokenizer: Tokenizer, prompt: str, phrases=None) -> Prompt:
    """Caption -> the graph's input_ids / attention_mask (padded to 256) and the positive
    map of the phrases that label the boxes (default: caption_phrases)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty", 'give a caption, e.g. --prompt "pink round polyp"')
    enc = tokenizer.encode(prompt)
    n, limit = len(enc.ids), tokenizer.max_tokens
    if n > limit:
        raise InputError(f"the prompt is {n} tokens long ([CLS] and [SEP] included); the model reads at most {limit}",
                         "shorten the caption")
    if phrases:
        names = [str(p) for p in phrases]
        spans = [find_phrase(prompt, p) for p in names]
    else:
        spans = caption_phrases(prompt)
        names = [prompt[a:b] for a, b in spans]
    pm = np.zeros((len(spans), limit), np.float32)
    for i, ((a, b), name) in enumerate(zip(spans, names)):
        toks = span_tokens(enc, a, b)
        if toks is None:
            raise InputError(f"phrase {name!r} covers no token of the prompt", "choose words, not spaces or symbols")
        pm[i, toks[0]:toks[1] + 1] = 1.0
    ids = np.full((1, limit), tokenizer.pad_id, np.int64)
    ids[0, :n] = enc.ids
    mask = np.zeros((1, limit), np.int64)
    mask[0, :n] = 1
    return Prompt(ids, mask, pm, names, spans, n)


# -- post-processing -------------------------------------------------------------------
def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return (1.0 / (1.0 + np.exp(-np.clip(x, -88.0, 88.0)))).astype(np.float32)


def decode(box_regression: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """vldyhead.BoxCoder.decode: centre offsets x anchor size / 10, sizes exp(d / 5) (clamped),
    x2 = cx + (w - 1) / 2 (the +1 pixel convention of maskrcnn_benchmark)."""
    rel, a = np.asarray(box_regression, np.float32), np.asarray(anchors, np.float32)
    w, h = a[:, 2] - a[:, 0] + 1, a[:, 3] - a[:, 1] + 1
    cx, cy = (a[:, 2] + a[:, 0]) / 2, (a[:, 3] + a[:, 1]) / 2
    dx, dy = rel[:, 0] / WEIGHTS[0], rel[:, 1] / WEIGHTS[1]
    dw = np.minimum(rel[:, 2] / WEIGHTS[2], BBOX_CLIP)
    dh = np.minimum(rel[:, 3] / WEIGHTS[3], BBOX_CLIP)
    px, py = dx * w + cx, dy * h + cy
    pw, ph = np.exp(dw) * w, np.exp(dh) * h
    return np.stack([px - 0.5 * (pw - 1), py - 0.5 * (ph - 1), px + 0.5 * (pw - 1), py + 0.5 * (ph - 1)],
                    1).astype(np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, thresh: float) -> np.ndarray:
    """Greedy NMS as ml_nms.cu: by score, drop boxes whose IoU (+1 pixel areas) is > thresh."""
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        iw = np.maximum(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]) + 1, 0)
        ih = np.maximum(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]) + 1, 0)
        inter = iw * ih
        order = rest[inter / (area[i] + area[rest] - inter) <= thresh]
    return np.asarray(keep, np.int64)


def phrase_scores(token_logits: np.ndarray, positive_map: np.ndarray) -> np.ndarray:
    """[n, 256] logits -> [n, P]: the MEAN of the sigmoid over each phrase's tokens."""
    pm = (np.asarray(positive_map) > 0).astype(np.float32)
    cols = np.nonzero(pm.any(0))[0]  # only the phrases' tokens: a 16x smaller sigmoid for a 16-token prompt
    return (sigmoid(token_logits[:, cols]) @ pm[:, cols].T) / np.maximum(pm.sum(1), 1)[None]


def candidates(outputs: dict, anchors, positive_map, canvas_hw, resized_hw, post: dict):
    """Per level: (boxes on the resized image, scores, phrase index) of the ATSS candidates."""
    reg, cent = outputs["box_regression"][0], outputs["centerness"][0]
    logits = outputs["token_logits"][0]
    rh, rw = resized_hw
    out, start = [], 0
    for gh, gw in level_shapes(canvas_hw, post.get("strides", STRIDES)):
        sl = slice(start, start + gh * gw)
        start += gh * gw
        scores = phrase_scores(logits[sl], positive_map)
        cand = scores > post["pre_nms_thresh"]
        k = min(int(cand.sum()), int(post["pre_nms_top_n"]))
        if k == 0:
            continue
        weighted = scores * sigmoid(cent[sl])[:, None]
        loc, cls = np.nonzero(cand)
        vals = weighted[loc, cls]
        top = np.argsort(-vals, kind="stable")[:k]
        loc, cls, vals = loc[top], cls[top], vals[top]
        boxes = decode(reg[sl][loc], np.asarray(anchors)[sl][loc])
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, rw - 1)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, rh - 1)
        w, h = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
        big = (w >= post["min_size"]) & (h >= post["min_size"])
        out.append((boxes[big], np.sqrt(vals[big]), cls[big]))
    if start != len(logits):
        raise InputError(f"the outputs have {len(logits)} locations, a {canvas_hw[1]}x{canvas_hw[0]} canvas has "
                         f"{start}", "the bundle's canvas and graph disagree: export it again")
    return out


def select(parts, post: dict):
    """All levels together: NMS per phrase, then the best `detections` (ties at the cut kept)."""
    if not parts:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    boxes, scores, cls = (np.concatenate(x) for x in zip(*parts))
    keep = np.concatenate([np.nonzero(cls == c)[0][nms(boxes[cls == c], scores[cls == c], post["nms_thresh"])]
                           for c in np.unique(cls)])
    boxes, scores, cls = boxes[keep], scores[keep], cls[keep]
    n = int(post["detections"])
    if len(scores) > n > 0:
        cut = np.sort(scores)[len(scores) - n]  # torch.kthvalue(scores, len - n + 1)
        ok = scores >= cut
        boxes, scores, cls = boxes[ok], scores[ok], cls[ok]
    return boxes, scores, cls


def detect(outputs: dict, anchors, positive_map, frame: Frame, phrases, score_threshold: float = 0.0,
           post: dict | None = None) -> list[dict]:
    """Raw graph outputs -> [{box [x1,y1,x2,y2] in original-image pixels, score, phrase,
    phrase_index}], best first; the official list is every box, `score_threshold` keeps
    those above it (GLIPDemo's confidence threshold). No match: an empty list."""
    post = {**POST, **(post or {})}
    boxes, scores, cls = select(candidates(outputs, anchors, positive_map, frame.canvas, frame.resized, post), post)
    (h, w), (rh, rw) = frame.original, frame.resized
    rx, ry = w / rw, h / rh
    boxes = boxes * np.float32(rx) if rx == ry else boxes * np.array([rx, ry, rx, ry], np.float32)
    order = np.argsort(-scores, kind="stable")
    return [{"box": [round(float(v), 2) for v in boxes[i]], "score": float(scores[i]), "phrase": phrases[int(cls[i])],
             "phrase_index": int(cls[i])} for i in order if scores[i] > score_threshold]


# -- drawing ---------------------------------------------------------------------------
def render(image: np.ndarray, dets: list[dict], n_phrases: int | None = None):
    """The picture with each box outlined in its phrase's palette colour (pictures.label_colours,
    phrase i -> colour i + 1) and a "phrase 0.87" tag on a filled band above it."""
    from PIL import Image, ImageDraw, ImageFont

    from .pictures import label_colours
    pic = Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    n = n_phrases or (max((d["phrase_index"] for d in dets), default=0) + 1)
    colours = label_colours(n + 1)
    width = max(2, round(min(pic.size) / 300))
    try:
        font = ImageFont.load_default(size=max(11, round(min(pic.size) / 40)))
    except TypeError:  # Pillow without FreeType sizes
        font = ImageFont.load_default()
    for d in reversed(dets):  # the best box drawn last, on top
        draw.rectangle(d["box"], outline=tuple(int(c) for c in colours[d["phrase_index"] + 1]), width=width)
    placed = []
    for d in dets:  # tags best first, each moved clear of those already placed and kept inside the picture
        colour = tuple(int(c) for c in colours[d["phrase_index"] + 1])
        text = f"{d['phrase']} {d['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 4, bottom - top + 4
        x = max(0, min(d["box"][0], pic.width - tw))
        y = d["box"][1] - th if d["box"][1] - th >= 0 else d["box"][1]
        while any(x < px + pw and px < x + tw and y < py + ph and py < y + th for px, py, pw, ph in placed):
            y += th
        placed.append((x, y, tw, th))
        draw.rectangle([x, y, x + tw, y + th], fill=colour)
        ink = (0, 0, 0) if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 128 else (255, 255, 255)
        draw.text((x + 2 - left, y + 2 - top), text, fill=ink, font=font)
    return pic


def draw(image, dets: list[dict], path, overwrite: bool = False, n_phrases: int | None = None):
    """`render` written atomically, PNG or JPEG by the name's suffix."""
    from .io.images import read_image
    from .io.volume import check_output, write_atomic
    path = check_output(path, overwrite, (".png", ".jpg", ".jpeg"), "the drawn boxes are written as PNG or JPEG")
    pic = render(read_image(image), dets, n_phrases)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    return write_atomic(path, lambda f: pic.save(f, format=fmt, **({"quality": 92} if fmt == "JPEG" else {})))
