"""Official-layout GLIP-T / MIU-VL checkpoints and local BERT folders, for tests.

The names and shapes are spelled out from microsoft/GLIP's structure (GeneralizedVLRCNN:
backbone, language_backbone.body.model = transformers BertModel with its pooler,
rpn.head = VLDyHead with cls_logits, rpn.anchor_generator.cell_anchors), independently of
omedge's module. GLIP's Checkpointer.save writes {'model', 'optimizer', 'scheduler',
'iteration', 'model_ema'} with DataParallel `module.` prefixes."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.glip_swin_data import SIZES as SWIN
from tests.glip_swin_data import official_backbone_keys, synth_backbone_state

F32, I64 = torch.float32, torch.int64
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = ("polyp pink round wound rectum adenoma colon red yellow oval bump lesion ulcer bleeding mucosa tumor "
         "small large flat raised white dark a an the in on of with and or is are this that there left right "
         "upper lower area region image frame endoscopy colonoscopy skin cell nucleus gland tissue vessel "
         "stomach liver kidney lung heart brain bone blood fluid mass cyst nodule scar edge border shape "
         "color texture surface smooth rough irregular regular bright pale blue green purple brown black "
         "one two three four five many few some any no not very more most less least near far above below "
         "inside outside center middle top bottom side front back")
WORDS = _WORDS.split()
PIECES = ["##s", "##ed", "##ing", "##ly", "##er", "##y", "##al", "##ic", ".", ",", "-", "(", ")"]
TINY_VOCAB = SPECIAL + WORDS + PIECES + [f"[unused{i}]" for i in range(40)]
BERT = {"tiny": {"vocab_size": len(TINY_VOCAB), "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "intermediate_size": 128},
        "T": {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
              "intermediate_size": 3072}}
HEAD = {"tiny": {"num_convs": 2, "fuse_dim": 64}, "T": {"num_convs": 6, "fuse_dim": 2048}}  # VLFuse embed_dim
STRIDES, ANCHOR_SIZES = (8, 16, 32, 64, 128), (64, 128, 256, 512, 1024)


def _lin(keys, name, cin, cout):
    keys[f"{name}.weight"], keys[f"{name}.bias"] = ((cout, cin), F32), ((cout,), F32)


def _ln(keys, name, dim):
    keys[f"{name}.weight"], keys[f"{name}.bias"] = ((dim,), F32), ((dim,), F32)


def _conv(keys, name, cin, cout, k):
    keys[f"{name}.weight"], keys[f"{name}.bias"] = ((cout, cin, k, k), F32), ((cout,), F32)


def _bert_layer(keys, p, hidden, inter):
    for m in ("query", "key", "value"):
        _lin(keys, f"{p}.attention.self.{m}", hidden, hidden)
    _lin(keys, f"{p}.attention.output.dense", hidden, hidden)
    _ln(keys, f"{p}.attention.output.LayerNorm", hidden)
    _lin(keys, f"{p}.intermediate.dense", hidden, inter)
    _lin(keys, f"{p}.output.dense", inter, hidden)
    _ln(keys, f"{p}.output.LayerNorm", hidden)


def language_keys(size: str) -> dict:
    """language_backbone.body.model.*: BertModel incl. the pooler and position_ids [1, 512]."""
    b, keys, p = BERT[size], {}, "language_backbone.body.model"
    h = b["hidden_size"]
    keys[f"{p}.embeddings.word_embeddings.weight"] = ((b["vocab_size"], h), F32)
    keys[f"{p}.embeddings.position_embeddings.weight"] = ((512, h), F32)
    keys[f"{p}.embeddings.token_type_embeddings.weight"] = ((2, h), F32)
    _ln(keys, f"{p}.embeddings.LayerNorm", h)
    keys[f"{p}.embeddings.position_ids"] = ((1, 512), I64)
    for i in range(b["num_hidden_layers"]):
        _bert_layer(keys, f"{p}.encoder.layer.{i}", h, b["intermediate_size"])
    _lin(keys, f"{p}.pooler.dense", h, h)
    return keys


def head_keys(size: str, n_classes: int) -> dict:
    """rpn.head.* (VLDyHead, MHA-B early fusion, DyConv with DCN offsets) + cell anchors."""
    c, lang, keys = SWIN[size]["fpn_channels"], BERT[size], {}
    h, e = lang["hidden_size"], HEAD[size]["fuse_dim"]
    for i in range(HEAD[size]["num_convs"]):
        f, t, d = (f"rpn.head.dyhead_tower.{3 * i + j}" for j in range(3))
        _ln(keys, f"{f}.b_attn.layer_norm_v", c)
        _ln(keys, f"{f}.b_attn.layer_norm_l", h)
        for m, cin in (("v_proj", c), ("l_proj", h), ("values_v_proj", c), ("values_l_proj", h)):
            _lin(keys, f"{f}.b_attn.attn.{m}", cin, e)
        _lin(keys, f"{f}.b_attn.attn.out_v_proj", e, c)
        _lin(keys, f"{f}.b_attn.attn.out_l_proj", e, h)
        keys[f"{f}.b_attn.gamma_v"], keys[f"{f}.b_attn.gamma_l"] = ((c,), F32), ((h,), F32)
        _bert_layer(keys, t, h, lang["intermediate_size"])
        for j in range(3):
            _conv(keys, f"{d}.DyConv.{j}.conv", c, c, 3)
            _ln(keys, f"{d}.DyConv.{j}.bn", c)  # GroupNorm: weight, bias
        _conv(keys, f"{d}.AttnConv.1", c, 1, 1)
        _lin(keys, f"{d}.relu.fc.0", c, c // 4)
        _lin(keys, f"{d}.relu.fc.2", c // 4, 4 * c)
        _conv(keys, f"{d}.offset", c, 27, 3)
    _conv(keys, "rpn.head.cls_logits", c, n_classes, 1)
    _conv(keys, "rpn.head.bbox_pred", c, 4, 1)
    _conv(keys, "rpn.head.centerness", c, 1, 1)
    _lin(keys, "rpn.head.dot_product_projection_text", h, c)
    keys["rpn.head.log_scale"], keys["rpn.head.bias0"] = ((1,), F32), ((1,), F32)
    keys["rpn.head.bias_lang"] = ((h,), F32)
    for i in range(5):
        keys[f"rpn.head.scales.{i}.scale"] = ((1,), F32)
    for i in range(5):
        keys[f"rpn.anchor_generator.cell_anchors.{i}"] = ((1, 4), F32)
    return keys


def official_keys(size: str = "tiny", n_classes: int = 80) -> dict:
    """{name without `module.`: (shape, dtype)} of the whole GLIP-T model of `size`."""
    backbone = {f"backbone.{k}": v for k, v in official_backbone_keys(**SWIN[size]).items()}
    return {**backbone, **language_keys(size), **head_keys(size, n_classes)}


def cell_anchor(stride: int, size: int) -> torch.Tensor:
    """generate_anchors for ratio 1: the (0, 0, s-1, s-1) cell scaled to `size` about its centre."""
    ctr, half = (stride - 1) / 2, (size - 1) / 2
    return torch.tensor([[ctr - half, ctr - half, ctr + half, ctr + half]], dtype=F32)


def _value(name, shape, gen, num_convs):
    if name.endswith(("gamma_v", "gamma_l")):
        return torch.full(shape, 1.0 / num_convs) + torch.randn(shape, generator=gen) * 0.02
    if name.endswith("scale"):  # Scale and log_scale
        return (0.0 if "log_scale" in name else 1.0) + torch.randn(shape, generator=gen) * 0.05
    if name.endswith("bias0"):
        return torch.full(shape, -4.6)
    if len(shape) == 1:
        norm = any(s in name for s in ("LayerNorm", "layer_norm", ".bn.")) and name.endswith(".weight")
        return (1.0 if norm else 0.0) + torch.randn(shape, generator=gen) * 0.1
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return torch.randn(shape, generator=gen) * fan_in ** -0.5


def synth_model_state(size: str = "tiny", seed: int = 0, n_classes: int = 80) -> dict:
    gen = torch.Generator().manual_seed(seed + 1)
    state = synth_backbone_state("module.backbone.", size, seed)
    for name, (shape, dtype) in {**language_keys(size), **head_keys(size, n_classes)}.items():
        if name.endswith("position_ids"):
            value = torch.arange(512, dtype=I64).view(1, 512)
        elif "cell_anchors" in name:
            i = int(name.rsplit(".", 1)[1])
            value = cell_anchor(STRIDES[i], ANCHOR_SIZES[i])
        else:
            value = _value(name, shape, gen, HEAD[size]["num_convs"])
        assert tuple(value.shape) == shape and value.dtype == dtype, name
        state[f"module.{name}"] = value
    return state


def write_glip_checkpoint(path, size: str = "tiny", seed: int = 0, n_classes: int = 80, model=None) -> Path:
    """The file GLIP's Checkpointer.save writes. `model` overrides the synthesised state
    (e.g. a Swin-L-shaped backbone for the refusal test)."""
    model = model if model is not None else synth_model_state(size, seed, n_classes)
    ema = {k: v.clone() for k, v in list(model.items())[:4]}
    first = next(v for v in model.values() if v.dtype == F32)
    raw = {"model": model, "optimizer": {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(first)}},
                                         "param_groups": [{"lr": 1e-4, "weight_decay": 1e-4, "params": [0]}]},
           "scheduler": {"last_epoch": 10, "base_lrs": [1e-4], "milestones": [20, 27]}, "iteration": 10,
           "model_ema": ema}
    path = Path(path)
    torch.save(raw, path)
    return path


def write_bert_folder(path, size: str = "tiny") -> Path:
    """config.json (model_type bert) + vocab.txt + tokenizer_config.json (do_lower_case)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_act": "gelu",
           "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0,
           **BERT[size]}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    if size == "tiny":
        vocab = TINY_VOCAB
    else:  # the real bert-base-uncased vocab is not at hand: same count, placeholder words
        vocab = SPECIAL + [f"word{i}" for i in range(BERT[size]["vocab_size"] - len(SPECIAL))]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    return path
