"""MIU-VL: GLIP-T grounded detection (MembrAI/MIU-VL, a microsoft/GLIP fork).

One graph at a fixed canvas (Swin's shift masks depend on the size): Swin-T + FPN
(layers/glip_swin.py), BERT (transformers, `language_backbone.body.model`) and the VLDyHead
(layers/glip_head.py) give, per anchor location over P3..P7, the raw ATSS box regression,
the centerness logit and the dot-product logit of every one of the 256 caption tokens.
Tokenising, anchors decoding, the phrase's score aggregation and NMS run on the run side
(omedge/grounding.py) in numpy. The GLIP file holds the BERT weights; the --text-encoder
folder gives its config.json and vocab.txt only."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..errors import CheckpointError, UsageError
from ..spec import ModelSpec, TensorSpec
from .checkpoint import drop, strip_prefix, unwrap

MAX_QUERY_LEN = 256
STRIDES, ANCHOR_SIZES = (8, 16, 32, 64, 128), (64, 128, 256, 512, 1024)
MEAN, STD = [103.53, 116.28, 123.675], [57.375, 57.12, 58.395]
# bert-base-uncased, what GLIP-T's LANGUAGE_BACKBONE.MODEL_TYPE loads (used without a folder)
BERT_BASE = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
             "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
             "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12}
TINY_BERT = {**BERT_BASE, "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 128}
# Swin embed dim of patch_embed.proj and the depth of stage 3 of the GLIP releases
SWIN_BY_EMBED = {96: "GLIP-T (Swin-T)", 32: "tiny", 128: "GLIP-B (Swin-B)", 192: "GLIP-L (Swin-L)"}
STAGE3_DEPTH = {96: 6, 32: 2}  # the sizes omedge builds


def read_bert_folder(folder) -> tuple[dict, list[str]]:
    """(config dict, vocab in id order) of a local BERT folder: GLIP's text side is BERT
    WordPiece and the run side rebuilds that tokenizer."""
    from ..io.text_folder import read_bert_folder as read
    cfg, words, _ = read(folder, "MIU-VL (GLIP-T) uses bert-base-uncased: model_type bert with a WordPiece vocab.txt")
    if len(words) != cfg.get("vocab_size", len(words)):
        raise UsageError(f"--text-encoder {folder}: vocab.txt has {len(words)} entries, config.json says "
                         f"vocab_size {cfg.get('vocab_size')}")
    return {**BERT_BASE, **cfg}, words


def _bert(cfg: dict):
    from transformers import BertConfig, BertModel
    keep = {k: cfg[k] for k in BERT_BASE if k in cfg}
    config = BertConfig(**keep)
    config._attn_implementation = "eager"  # plain MatMul/Softmax in the exported graph
    return BertModel(config, add_pooling_layer=False)


class _Body(nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.model = bert


class _Rpn(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head


class MiuVL(nn.Module):
    """GeneralizedVLRCNN (RPN_ONLY) at inference, one image and one 256-token caption."""

    def __init__(self, size, bert_cfg, vocab=None, image_size=(800, 1344)):
        super().__init__()
        from .layers.glip_head import HEAD_SIZES, VLDyHead
        from .layers.glip_swin import SWIN_SIZES, GlipSwinFPN
        h, w = (int(v) for v in image_size)
        if h % 32 or w % 32:
            raise UsageError(f"image_size {h}x{w}: both sides must be multiples of 32 (SIZE_DIVISIBILITY)")
        self.canvas, self.vocab, self.size = (h, w), vocab, size
        self.backbone = GlipSwinFPN(**SWIN_SIZES[size])
        self.language_backbone = nn.Sequential(OrderedDict(body=_Body(_bert(bert_cfg))))
        lang = {"hidden": bert_cfg["hidden_size"], "heads": bert_cfg["num_attention_heads"],
                "intermediate": bert_cfg["intermediate_size"], "eps": bert_cfg["layer_norm_eps"],
                "act": bert_cfg["hidden_act"]}
        self.rpn = _Rpn(VLDyHead(SWIN_SIZES[size]["fpn_channels"], lang, **HEAD_SIZES[size]))

    def forward(self, pixel_values, input_ids, attention_mask):
        bert = self.language_backbone.body.model
        hidden = bert(input_ids=input_ids, attention_mask=attention_mask,
                      token_type_ids=torch.zeros_like(input_ids)).last_hidden_state  # N_LAYERS 1
        feats = self.backbone(pixel_values)
        boxes, centers, logits = self.rpn.head(feats, hidden, attention_mask)
        return {"box_regression": boxes, "centerness": centers, "token_logits": logits}

    def constants(self) -> dict:
        import numpy as np

        from ..grounding import make_anchors
        if self.vocab is None:
            raise UsageError("miu-vl needs the BERT vocabulary for its bundle",
                             "pass --text-encoder <bert-base-uncased folder> (config.json + vocab.txt)")
        anchors = make_anchors(self.canvas, strides=STRIDES, sizes=ANCHOR_SIZES)
        return {"anchors": torch.as_tensor(np.asarray(anchors, dtype=np.float32)), "vocab": np.array(self.vocab)}


def build(variant: str, image_size=(800, 1344), text_encoder=None):
    if text_encoder is not None:
        cfg, vocab = read_bert_folder(text_encoder)
    else:
        cfg, vocab = (BERT_BASE if variant == "T" else TINY_BERT), None
    return MiuVL(variant, cfg, vocab, image_size)


def _check_size(sd: dict):
    """GLIP-L / GLIP-B files have the same key layout with a wider Swin: name them."""
    w = sd.get("backbone.body.patch_embed.proj.weight")
    if w is None:
        raise CheckpointError("no GLIP backbone (backbone.body.patch_embed.proj.weight) in this file; "
                              f"it has {len(sd)} tensors, e.g. {', '.join(sorted(sd)[:3])}")
    embed = int(w.shape[0])
    depth3 = len({k.split(".")[5] for k in sd if k.startswith("backbone.body.layers.2.blocks.")})
    if STAGE3_DEPTH.get(embed) != depth3:
        name = SWIN_BY_EMBED.get(embed, f"a GLIP with a Swin of embed dim {embed}")
        raise CheckpointError(f"this is {name}, omedge deploys GLIP-T (Swin-T: embed 96, stage-3 depth 6; "
                              f"this file: embed {embed}, stage-3 depth {depth3})",
                              "use the GLIP-T checkpoint (glip_tiny_model_o365_goldg*.pth) or MIU-VL's "
                              "fine-tuned GLIP-T file")


def _check_anchors(sd: dict):
    """The file's cell anchors must be ATSS's (sizes 64..1024, ratio 1, strides 8..128):
    the run side decodes with those, so a file with other anchors is refused."""
    import numpy as np

    from ..grounding import cell_anchors
    for i, (stride, size) in enumerate(zip(STRIDES, ANCHOR_SIZES)):
        want = cell_anchors(stride, (size,))
        got = sd.get(f"rpn.anchor_generator.cell_anchors.{i}")
        if got is None:
            continue
        if got.shape != tuple(np.shape(want)) or not np.allclose(got.float().numpy(), want, atol=1e-3):
            raise CheckpointError(f"rpn.anchor_generator.cell_anchors.{i} is {got.tolist()}, not the GLIP-T "
                                  f"ATSS anchor {np.asarray(want).tolist()} (RPN.ANCHOR_SIZES / ANCHOR_STRIDE differ)")


def remap(raw):
    """`{'model': ...}` with `module.` prefixes (model_ema, optimizer, scheduler, iteration
    ignored). Dropped: BERT pooler (add_pooling_layer=False) and position_ids (a
    non-persistent buffer in transformers >= 4.31), cls_logits of any class count (at
    inference only its channel count is read, as the label range) and the cell anchors
    (checked, then recomputed on the run side)."""
    sd = strip_prefix(unwrap(raw, keys=("model", "state_dict")), "module.")
    _check_size(sd)
    _check_anchors(sd)
    sd = drop(sd, r"language_backbone\.body\.model\.pooler\.", r"language_backbone\.body\.model\.embeddings\."
              r"(position_ids|token_type_ids)$", r"rpn\.head\.cls_logits\.", r"rpn\.anchor_generator\.")
    return sd, {}


def _tensors():
    canvas = {2: 32, 3: 32}
    inputs = (TensorSpec("pixel_values", "NCHW", shape=(1, 3, None, None), multiple_of=canvas,
                         description="BGR 0-255 minus mean, over std; resized (min 800 / max 1333) and zero-padded "
                                     "bottom/right to the fixed canvas"),
              TensorSpec("input_ids", "NL", dtype="int64", shape=(1, MAX_QUERY_LEN),
                         description="BERT WordPiece ids, [CLS] caption [SEP], padded with 0 to 256"),
              TensorSpec("attention_mask", "NL", dtype="int64", shape=(1, MAX_QUERY_LEN)))
    outputs = (TensorSpec("box_regression", "NLC", shape=(1, None, 4),
                          description="raw ATSS regression (dx, dy, dw, dh; weights 10,10,5,5) per anchor, P3..P7"),
               TensorSpec("centerness", "NL", shape=(1, None), description="centerness logits per anchor"),
               TensorSpec("token_logits", "NLC", shape=(1, None, MAX_QUERY_LEN),
                          description="dot-product logits of every anchor with every token, before sigmoid"))
    return inputs, outputs


PREPROCESS = {"color": "BGR", "range": "0-255", "mean": MEAN, "std": STD, "resize": "min_max_size",
              "min_size": 800, "max_size": 1333, "interpolation": "bilinear", "size_divisibility": 32,
              "pad": "bottom_right", "canvas": [800, 1344], "max_query_len": MAX_QUERY_LEN, "lower_case": True,
              "strides": list(STRIDES), "anchor_sizes": list(ANCHOR_SIZES), "box_coder_weights": [10.0, 10.0, 5.0, 5.0],
              "score_agg": "MEAN", "score_threshold": 0.05, "pre_nms_top_n": 1000, "nms": 0.6, "detections": 100}
OFFICIAL = {
    "repo": "microsoft/GLIP (MembrAI/MIU-VL is a fork: configs/glip_Swin_T_O365_GoldG_polyp_kvasir.yaml)",
    "entry": "maskrcnn_benchmark/modeling/detector/generalized_vl_rcnn.py (GeneralizedVLRCNN.forward); "
             "modeling/language_backbone/bert_model.py (BertEncoder, N_LAYERS 1); modeling/rpn/vldyhead.py "
             "(VLDyHead, VLFuse, DyConv, BertEncoderLayer); utils/fuse_helper.py (BiAttentionBlockForCheckpoint, "
             "BiMultiHeadAttention); modeling/rpn/modeling_bert.py; layers/dyrelu.py; layers/deform_conv.py + "
             "csrc/cuda/deform_conv_kernel_cuda.cu (DCNv2); modeling/rpn/anchor_generator.py; "
             "modeling/rpn/inference.py (ATSSPostProcessor); config/defaults.py",
    "config": "configs/pretrain/glip_Swin_T_O365_GoldG.yaml: SWINT-FPN-RETINANET, bert-base-uncased, "
              "DYHEAD NUM_CONVS 6, GN, DyReLU, DFCONV, DyFuse, MHA-B early fusion, fused-feature dot product, "
              "layer scale, all CLAMP_* on; RPN anchors 64..1024 / strides 8..128, ratio 1",
    "transform": "transforms.Resize(800, 1333) get_size -> ToTensor -> to_bgr255 -> Normalize(mean, std) -> "
                 "pad to a multiple of 32 (to_image_list)",
    "post": "ATSSPostProcessor: sigmoid(dot logits) averaged over the phrase tokens (SCORE_AGG MEAN) > 0.05, "
            "top 1000 per level, x sigmoid(centerness), decode (10,10,5,5), sqrt score, NMS 0.6, 100"}

SPECS = [ModelSpec(
    id="miu-vl", title="MIU-VL (GLIP-T) prompt-grounded detection for medical images", kind="grounded-detection",
    inputs=_tensors()[0], outputs=_tensors()[1], primary_output="token_logits", variants=("T", "tiny"),
    default_variant="T", preprocess=PREPROCESS, licence="GLIP code MIT; MIU-VL README CC-BY-NC 4.0",
    source="https://github.com/MembrAI/MIU-VL", build=build, remap=remap, constants=("anchors", "vocab"),
    official=OFFICIAL,
    onnx_opset=19,  # DeformConv (DCNv2) exists from opset 19
    notes="One fixed canvas per bundle (image_size, multiples of 32): Swin's shifted-window masks depend on it.")]
