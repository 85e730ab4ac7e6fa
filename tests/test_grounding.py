"""omedge.grounding against re-implementations of the official GLIP code (microsoft/GLIP,
maskrcnn_benchmark) written here from its semantics: torch for the ATSS post-processor,
transformers' BertTokenizerFast for the tokens, Pillow + torch for the test transform."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from omedge import grounding as g
from omedge.errors import InputError, UsageError

WORDS = ["pink", "round", "polyp", "polyps", "in", "rectum", "the", "a", "of", "and", "red", "white", "yellow", "oval",
         "bump", "wound", "colon", "adenoma", "tumour", "background", "photo", "image", ".", ",", "##s", "##ed",
         "##ing", "cafe"]
VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + ["pol", "##yp", "rect", "##um"]


# -- anchors: anchor_generator.generate_anchors / grid_anchors, as the official code computes them -------
def official_cell(stride, sizes, ratios):
    def whctrs(a):
        w, h = a[2] - a[0] + 1, a[3] - a[1] + 1
        return w, h, a[0] + 0.5 * (w - 1), a[1] + 0.5 * (h - 1)

    def mk(ws, hs, x, y):
        ws, hs = ws[:, None], hs[:, None]
        return np.hstack((x - 0.5 * (ws - 1), y - 0.5 * (hs - 1), x + 0.5 * (ws - 1), y + 0.5 * (hs - 1)))
    anchor = np.array([1, 1, stride, stride], np.float64) - 1
    w, h, x, y = whctrs(anchor)
    ws = np.round(np.sqrt(w * h / np.array(ratios, np.float64)))
    ratio_anchors = mk(ws, np.round(ws * np.array(ratios)), x, y)
    scales = np.array(sizes, np.float64) / stride
    out = []
    for a in ratio_anchors:
        w, h, x, y = whctrs(a)
        out.append(mk(w * scales, h * scales, x, y))
    return torch.from_numpy(np.vstack(out)).float()


def official_grid(canvas, strides, sizes):
    out = []
    for s, size in zip(strides, sizes):
        base = official_cell(s, (size,), (1.0,))
        gh, gw = math.ceil(canvas[0] / s), math.ceil(canvas[1] / s)
        sx = torch.arange(0, gw * s, step=s, dtype=torch.float32)
        sy = torch.arange(0, gh * s, step=s, dtype=torch.float32)
        yy, xx = torch.meshgrid(sy, sx, indexing="ij")
        shifts = torch.stack((xx.reshape(-1), yy.reshape(-1), xx.reshape(-1), yy.reshape(-1)), 1)
        out.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
    return torch.cat(out).numpy()


def test_cell_anchors_match_generate_anchors():
    for s, size in zip(g.STRIDES, g.SIZES):
        np.testing.assert_array_equal(g.cell_anchors(s, (size,)), official_cell(s, (size,), (1.0,)).numpy())
    np.testing.assert_array_equal(g.cell_anchors(8, (64,)), [[-28, -28, 35, 35]])
    np.testing.assert_array_equal(g.cell_anchors(16, (32, 64), (0.5, 1.0, 2.0)),
                                  official_cell(16, (32, 64), (0.5, 1.0, 2.0)).numpy())


@pytest.mark.parametrize("canvas", [(256, 320), (800, 1344), (96, 160)])
def test_make_anchors_match_grid_anchors(canvas):
    got = g.make_anchors(canvas)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, official_grid(canvas, g.STRIDES, g.SIZES))
    assert len(got) == sum(h * w for h, w in g.level_shapes(canvas))


# -- the test transform: Resize(800, 1333) + ToTensor + bgr255 Normalize + to_image_list(32) ---------
def official_get_size(w, h, size=800, max_size=1333):
    lo, hi = float(min(w, h)), float(max(w, h))
    if hi / lo * size > max_size:
        size = round(max_size * lo / hi)
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    return (int(size * h / w), size) if w < h else (size, int(size * w / h))


MEAN, STD = [103.53, 116.28, 123.675], [57.375, 57.12, 58.395]
PRE = {"mean": MEAN, "std": STD, "min_size": 800, "max_size": 1333, "size_divisibility": 32}


def official_tensor(pil):
    oh, ow = official_get_size(*pil.size)
    t = torch.from_numpy(np.array(pil.resize((ow, oh), Image.BILINEAR))).permute(2, 0, 1).float().div(255)
    t = t[[2, 1, 0]] * 255
    t = (t - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    ph, pw = math.ceil(oh / 32) * 32, math.ceil(ow / 32) * 32
    out = torch.zeros(1, 3, ph, pw)
    out[0, :, :oh, :ow] = t
    return out.numpy(), (oh, ow)


@pytest.mark.parametrize("hw", [(480, 640), (1080, 1920), (900, 600), (333, 500)])
def test_preprocess_matches_official_transform(hw):
    rng = np.random.default_rng(hw[0])
    pil = Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
    ref, (oh, ow) = official_tensor(pil)
    assert g.official_size(*hw) == (oh, ow)
    got, frame = g.preprocess(pil, {**PRE, "canvas": ref.shape[-2:]})
    assert frame.resized == (oh, ow) and frame.original == hw and not frame.shrunk and frame.official_padding
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)
    assert (got[0, :, oh:, :] == 0).all() and (got[0, :, :, ow:] == 0).all()


def test_preprocess_channel_order_is_bgr():
    img = np.zeros((800, 800, 3), np.uint8)
    img[..., 0] = 255  # pure red
    x, _ = g.preprocess(img, {**PRE, "canvas": (800, 800)})
    np.testing.assert_allclose(x[0, :, 10, 10], [(0 - MEAN[0]) / STD[0], (0 - MEAN[1]) / STD[1],
                                                 (255 - MEAN[2]) / STD[2]], rtol=1e-6)


def test_fit_canvas_shrinks_and_says_so():
    f = g.fit_canvas(1333, 800, (800, 1344))          # portrait: official 1333 x 800 does not fit
    assert f.official == (1333, 800) and f.shrunk and f.resized == (800, 480)
    assert any("does not fit" in n for n in f.notes)
    f = g.fit_canvas(576, 720, (800, 1344))           # 4:3: fits, but padded wider than 1024
    assert f.resized == (800, 1000) and not f.shrunk and not f.official_padding
    assert g.fit_canvas(800, 1333, (800, 1344)).notes == []


def test_preprocess_image_rules(tmp_path):
    """grey and RGBA as the official loader's convert('RGB'); 16-bit and CHW refused."""
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (64, 80), dtype=np.uint8)
    pre = {**PRE, "canvas": (800, 1024)}
    a, _ = g.preprocess(grey, pre)
    b, _ = g.preprocess(np.repeat(grey[..., None], 3, 2), pre)
    np.testing.assert_array_equal(a, b)
    rgba = rng.integers(0, 256, (64, 80, 4), dtype=np.uint8)
    np.testing.assert_array_equal(g.preprocess(rgba, pre)[0], g.preprocess(rgba[..., :3].copy(), pre)[0])
    Image.fromarray(rng.integers(0, 65535, (64, 80), dtype=np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(InputError, match="16-bit"):
        g.preprocess(tmp_path / "deep.png", pre)
    with pytest.raises(InputError, match="channels-first"):
        g.preprocess(rng.integers(0, 256, (3, 64, 80), dtype=np.uint8), pre)


# -- tokens: BertTokenizerFast on the same vocab, create_positive_map with its char_to_token -----------
@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from transformers import BertTokenizerFast
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    return BertTokenizerFast(str(path), do_lower_case=True)


def official_positive_map(tokenized, spans):
    pm = np.zeros((len(spans), 256), np.float32)
    for j, (beg, end) in enumerate(spans):
        b = tokenized.char_to_token(beg)
        b = b if b is not None else tokenized.char_to_token(beg + 1)
        b = b if b is not None else tokenized.char_to_token(beg + 2)
        e = tokenized.char_to_token(end - 1)
        e = e if e is not None else tokenized.char_to_token(end - 2)
        e = e if e is not None else tokenized.char_to_token(end - 3)
        pm[j, b:e + 1] = 1
    return pm


@pytest.mark.parametrize("caption, phrases, spans", [
    ("pink round polyp in rectum", ["polyp"], [(11, 16)]),
    ("pink round polyp in rectum", ["pink round polyp"], [(0, 16)]),
    ("pink round polyp in rectum", None, [(0, 26)]),
    ("Pink Round POLYPS in the Rectum", ["polyps"], [(11, 17)]),
    ("polyp . adenoma . tumour .", None, [(0, 5), (8, 15), (18, 24)]),
    ("polyp. adenoma", None, [(0, 5), (7, 14)]),
    ("a red café bump, white wound", ["wound", "red café bump"], [(23, 28), (2, 15)]),
])
def test_prompt_matches_bert_tokenizer_fast(hf, caption, phrases, spans):
    tok = g.Tokenizer(VOCAB)
    got = g.encode_prompt(tok, caption, phrases)
    ref = hf([caption], padding="max_length", max_length=256, return_tensors="np")
    np.testing.assert_array_equal(got.input_ids, ref["input_ids"])
    np.testing.assert_array_equal(got.attention_mask, ref["attention_mask"])
    assert got.input_ids.dtype == np.int64 and got.input_ids.shape == (1, 256)
    assert got.spans == spans
    np.testing.assert_array_equal(got.positive_map, official_positive_map(hf([caption]), spans))
    assert got.phrases == (phrases or [caption[a:b] for a, b in spans])


def test_prompt_errors():
    tok = g.Tokenizer(VOCAB)
    for empty in ("", "   "):
        with pytest.raises(InputError, match="empty"):
            g.encode_prompt(tok, empty)
    with pytest.raises(InputError, match="302 tokens"):
        g.encode_prompt(tok, " ".join(["polyp"] * 300))
    with pytest.raises(InputError, match="'tumour' is not in the prompt"):
        g.encode_prompt(tok, "pink round polyp", ["tumour"])
    with pytest.raises(UsageError, match="not a BERT"):
        g.Tokenizer(["a", "b"])
    assert g.encode_prompt(tok, " ".join(["polyp"] * 254)).tokens == 256


# -- post-processing: ATSSPostProcessor (dot-product logits) + vldyhead.BoxCoder, in torch ------------
def official_decode(preds, anchors):
    widths, heights = anchors[:, 2] - anchors[:, 0] + 1, anchors[:, 3] - anchors[:, 1] + 1
    ctr_x, ctr_y = (anchors[:, 2] + anchors[:, 0]) / 2, (anchors[:, 3] + anchors[:, 1]) / 2
    dx, dy = preds[:, 0::4] / 10.0, preds[:, 1::4] / 10.0
    dw = torch.clamp(preds[:, 2::4] / 5.0, max=math.log(1000.0 / 16))
    dh = torch.clamp(preds[:, 3::4] / 5.0, max=math.log(1000.0 / 16))
    px, py = dx * widths[:, None] + ctr_x[:, None], dy * heights[:, None] + ctr_y[:, None]
    pw, ph = torch.exp(dw) * widths[:, None], torch.exp(dh) * heights[:, None]
    out = torch.zeros_like(preds)
    out[:, 0::4], out[:, 1::4] = px - 0.5 * (pw - 1), py - 0.5 * (ph - 1)
    out[:, 2::4], out[:, 3::4] = px + 0.5 * (pw - 1), py + 0.5 * (ph - 1)
    return out


def official_ml_nms(boxes, scores, labels, thresh):
    order = scores.argsort(descending=True)
    b, lab = boxes[order], labels[order]
    area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    lt, rb = torch.max(b[:, None, :2], b[None, :, :2]), torch.min(b[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt + 1).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    iou = inter / (area[:, None] + area[None] - inter)
    iou[lab[:, None] != lab[None]] = 0
    removed = torch.zeros(len(b), dtype=torch.bool)
    keep = []
    for i in range(len(b)):
        if not removed[i]:
            keep.append(i)
            removed |= iou[i] > thresh
    return order[torch.tensor(keep, dtype=torch.long)].sort().values


def official_postprocess(levels, anchors_per_level, positive_map, image_wh, orig_wh):
    """forward_for_single_feature_map per level, select_over_all_levels, BoxList.resize."""
    boxes, scores, labels = [], [], []
    for (reg, cent, dot), anchors in zip(levels, anchors_per_level):
        n, _, h, w = reg.shape
        logits = dot.sigmoid()
        cls = torch.zeros(1, logits.shape[1], len(positive_map))
        for j, toks in positive_map.items():
            cls[:, :, j - 1] = logits[:, :, torch.LongTensor(toks)].mean(-1)
        reg = reg.view(n, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
        cand = cls > 0.05
        top_n = cand.reshape(n, -1).sum(1).clamp(max=1000)
        cent = cent.view(n, -1, 1, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1).sigmoid()
        cls = cls * cent[:, :, None]
        per = cls[0][cand[0]]
        per, idx = per.topk(int(top_n[0]), sorted=False)
        nz = cand[0].nonzero()[idx, :]
        det = official_decode(reg[0][nz[:, 0]], anchors[nz[:, 0]])
        det[:, 0].clamp_(0, image_wh[0] - 1), det[:, 2].clamp_(0, image_wh[0] - 1)
        det[:, 1].clamp_(0, image_wh[1] - 1), det[:, 3].clamp_(0, image_wh[1] - 1)
        boxes.append(det), scores.append(torch.sqrt(per)), labels.append(nz[:, 1] + 1)
    boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    keep = official_ml_nms(boxes, scores, labels, 0.6)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    if len(scores) > 100:
        thresh, _ = torch.kthvalue(scores, len(scores) - 100 + 1)
        ok = scores >= thresh.item()
        boxes, scores, labels = boxes[ok], scores[ok], labels[ok]
    rw, rh = orig_wh[0] / image_wh[0], orig_wh[1] / image_wh[1]
    boxes = boxes * rw if rw == rh else boxes * torch.tensor([rw, rh, rw, rh])
    return boxes.numpy(), scores.numpy(), labels.numpy()


def random_outputs(canvas, seed, logit_shift=0.0):
    """Per-level official-layout maps (NCHW, dot products [1, HW, 256]) and the contract's
    flat outputs made from them (levels concatenated, row-major over y, x)."""
    rng = np.random.default_rng(seed)
    levels = []
    for h, w in g.level_shapes(canvas):
        reg = rng.normal(0, 1.0, (1, 4, h, w)).astype(np.float32)
        reg[0, 2:, : max(1, h // 4)] += 30  # some sizes past the log(1000/16) clamp
        cent = rng.normal(0, 1.5, (1, 1, h, w)).astype(np.float32)
        dot = (rng.normal(-1.0, 2.0, (1, h * w, 256)) + logit_shift).astype(np.float32)
        levels.append((reg, cent, dot))
    flat = {"box_regression": np.concatenate([r.transpose(0, 2, 3, 1).reshape(1, -1, 4) for r, _, _ in levels], 1),
            "centerness": np.concatenate([c.reshape(1, -1) for _, c, _ in levels], 1),
            "token_logits": np.concatenate([d for _, _, d in levels], 1)}
    return levels, flat


@pytest.mark.parametrize("seed, original", [(0, (200, 250)), (1, (512, 1024)), (2, (256, 300))])
def test_detect_matches_official_atss_postprocessor(seed, original):
    canvas, resized = (256, 320), (200, 250)
    levels, flat = random_outputs(canvas, seed)
    anchors = g.make_anchors(canvas)
    sizes = [h * w for h, w in g.level_shapes(canvas)]
    per_level = torch.split(torch.from_numpy(anchors), sizes)
    pm = np.zeros((2, 256), np.float32)
    pm[0, 1:4], pm[1, 5] = 1, 1
    ref_b, ref_s, ref_l = official_postprocess([tuple(map(torch.from_numpy, lv)) for lv in levels], per_level,
                                               {1: [1, 2, 3], 2: [5]}, resized[::-1], original[::-1])
    frame = g.Frame(original, resized, resized, canvas)
    got = g.detect(flat, anchors, pm, frame, ["pink round polyp", "rectum"])
    assert 0 < len(got) == len(ref_s) and len(got) >= 100   # the top-100 cut took part
    order = np.argsort(-ref_s, kind="stable")
    np.testing.assert_allclose([d["score"] for d in got], ref_s[order], rtol=1e-5)
    np.testing.assert_allclose([d["box"] for d in got], ref_b[order], atol=0.01)
    assert [d["phrase_index"] + 1 for d in got] == ref_l[order].tolist()
    assert {d["phrase"] for d in got} == {"pink round polyp", "rectum"}
    assert all(0 <= d["box"][0] <= d["box"][2] <= original[1] for d in got)


def test_detect_level_top_n_and_threshold():
    """Every location a candidate: 1000 per level at most before NMS; score_threshold filters."""
    canvas = (256, 320)
    _, flat = random_outputs(canvas, 3, logit_shift=6.0)
    pm = np.zeros((1, 256), np.float32)
    pm[0, 1] = 1
    post = {**g.POST, "nms_thresh": 1.0, "detections": 0}
    parts = g.candidates(flat, g.make_anchors(canvas), pm, canvas, canvas, post)
    assert [len(p[0]) for p in parts] == [1000, 320, 80, 20, 6]
    frame = g.Frame(canvas, canvas, canvas, canvas)
    dets = g.detect(flat, g.make_anchors(canvas), pm, frame, ["x"], score_threshold=0.5)
    assert dets and all(d["score"] > 0.5 for d in dets)
    assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)


def test_no_match_is_an_empty_list():
    canvas = (256, 320)
    _, flat = random_outputs(canvas, 4, logit_shift=-30.0)
    pm = np.zeros((1, 256), np.float32)
    pm[0, 1:3] = 1
    assert g.detect(flat, g.make_anchors(canvas), pm, g.Frame(canvas, canvas, canvas, canvas), ["polyp"]) == []
    flat["token_logits"] = flat["token_logits"][:, :-5]
    with pytest.raises(InputError, match="locations"):
        g.detect(flat, g.make_anchors(canvas), pm, g.Frame(canvas, canvas, canvas, canvas), ["polyp"])


# -- drawing ---------------------------------------------------------------------------
def test_draw_boxes_in_phrase_colours(tmp_path):
    from omedge.pictures import label_colours
    img = np.full((240, 320, 3), 90, np.uint8)
    dets = [{"box": [40.0, 60.0, 200.0, 180.0], "score": 0.87, "phrase": "polyp", "phrase_index": 0},
            {"box": [220.0, 20.0, 300.0, 100.0], "score": 0.55, "phrase": "adenoma", "phrase_index": 1}]
    path = g.draw(img, dets, tmp_path / "boxes.png", n_phrases=2)
    with Image.open(path) as im:
        assert im.format == "PNG"
        out = np.asarray(im.convert("RGB"))
    colours = label_colours(3)
    assert (out[120, 40] == colours[1]).all() and (out[180, 120] == colours[1]).all()   # left / bottom edges
    assert (out[60, 300] == colours[2]).all()
    assert (out[120, 120] == 90).all() and (out[220, 10] == 90).all()                    # inside / outside
    tag = out[47:59, 41:96]  # the "polyp 0.87" band just above the first box: its colour, with text ink on it
    ink = (tag.astype(int).sum(-1) > int(colours[1].astype(int).sum()) + 100).mean()  # white, anti-aliased
    assert (tag == colours[1]).all(-1).mean() > 0.5 and 0.05 < ink < 0.5
    assert (out[40:46, 40:100] == 90).all()   # nothing above the band
    jpg = g.draw(img, dets, tmp_path / "boxes.jpg")
    with Image.open(jpg) as im:
        assert im.format == "JPEG"
    with pytest.raises(UsageError, match="PNG or JPEG"):
        g.draw(img, dets, tmp_path / "boxes.tif")
    with pytest.raises(UsageError, match="exists"):
        g.draw(img, dets, tmp_path / "boxes.png")
