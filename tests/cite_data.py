"""Synthetic CITE files in the official layout (mmcls tools/train.py + mmcv save_checkpoint):
{'meta', 'state_dict', 'optimizer'}; `backbone.prompt` first, then the OpenAI CLIP visual
names under `backbone.model.`, then `neck.*`; a GPU-trained file's dtype mix (clip.load on
CUDA makes conv1 / in_proj / out_proj / c_fc / c_proj / proj fp16; LayerNorms, class and
positional embeddings stay fp32; prompt and neck fp16). The key list is written here from
the official structure, not from omedge's module. A tiny local BERT folder stands in for
BioLinkBERT-large."""
from __future__ import annotations

import json
from pathlib import Path

import torch

SIZES = {"B": dict(dim=768, depth=12, heads=12, proj=512, text=1024),
         "tiny": dict(dim=64, depth=2, heads=2, proj=32, text=64)}
TEXTS = ["Well differentiated tubular adenocarcinoma", "Moderately differentiated tubular adenocarcinoma",
         "Poorly differentiated adenocarcinoma"]
CONFIG = """arch = 'ViT-B/16'
TEXTS = {texts!r}
model = dict(
    type='ImageClassifier',
    backbone=dict(type='PromptedCLIPImageBackbone', arch='ViT-B/16', prompt_length=1, prompt_pos='prepend',
                  prompt_init='token'),
    neck=dict(type='ProjectionNeck', in_features=512, out_features=1024, init='normal_identity', float16=True),
    head=dict(type='TextEmbeddingHead', texts={texts!r}, temperature=4.6052, float16=True,
              text_encoder=dict(type='BERT', model='michiyasunaga/BioLinkBERT-large')))
"""
WORDS = ("well moderately poorly differentiated tubular adenocarcinoma normal gastric mucosa with intestinal "
         "metaplasia signet ring cell carcinoma a the of and in").split()


def _w(g, *shape, fan_in=None, dtype=torch.float16):
    fan_in = fan_in or shape[-1]
    return (torch.randn(*shape, generator=g) / fan_in ** 0.5).to(dtype)


def official_state(size: str = "tiny", seed: int = 0) -> dict:
    s = SIZES[size]
    d, g = s["dim"], torch.Generator().manual_seed(seed)
    h16, f32 = torch.float16, torch.float32
    sd = {"backbone.prompt": (torch.randn(1, 1, d, generator=g) * 0.5).to(h16)}
    m = "backbone.model."
    sd[m + "class_embedding"] = torch.randn(d, generator=g) * d ** -0.5
    sd[m + "positional_embedding"] = torch.randn(197, d, generator=g) * 0.1
    sd[m + "proj"] = _w(g, d, s["proj"], fan_in=d)
    sd[m + "conv1.weight"] = _w(g, d, 3, 16, 16, fan_in=3 * 256)
    for name in ("ln_pre", "ln_post"):
        sd[m + f"{name}.weight"] = (1 + 0.1 * torch.randn(d, generator=g)).to(f32)
        sd[m + f"{name}.bias"] = (0.05 * torch.randn(d, generator=g)).to(f32)
    for i in range(s["depth"]):
        b = f"{m}transformer.resblocks.{i}."
        sd[b + "attn.in_proj_weight"] = _w(g, 3 * d, d)
        sd[b + "attn.in_proj_bias"] = (0.02 * torch.randn(3 * d, generator=g)).to(h16)
        sd[b + "attn.out_proj.weight"] = _w(g, d, d)
        sd[b + "attn.out_proj.bias"] = (0.02 * torch.randn(d, generator=g)).to(h16)
        for ln in ("ln_1", "ln_2"):
            sd[b + f"{ln}.weight"] = (1 + 0.1 * torch.randn(d, generator=g)).to(f32)
            sd[b + f"{ln}.bias"] = (0.05 * torch.randn(d, generator=g)).to(f32)
        sd[b + "mlp.c_fc.weight"] = _w(g, 4 * d, d)
        sd[b + "mlp.c_fc.bias"] = (0.02 * torch.randn(4 * d, generator=g)).to(h16)
        sd[b + "mlp.c_proj.weight"] = _w(g, d, 4 * d)
        sd[b + "mlp.c_proj.bias"] = (0.02 * torch.randn(d, generator=g)).to(h16)
    # normal_identity init of the neck, then trained: identity block + noise
    neck = 0.02 * torch.randn(s["text"], s["proj"], generator=g)
    neck[:s["proj"], :s["proj"]] += torch.eye(s["proj"])
    sd["neck.weight"], sd["neck.bias"] = neck.to(h16), (0.01 * torch.randn(s["text"], generator=g)).to(h16)
    return sd


def write_cite_checkpoint(path, size: str = "tiny", seed: int = 0, texts=TEXTS, config: bool = True) -> Path:
    sd = official_state(size, seed)
    meta = {"mmcls_version": "0.25.0", "mmcv_version": "1.7.1", "CLASSES": [str(i) for i in range(len(texts))],
            "iter": 1000, "epoch": 1, "time": "Thu Mar  2 10:11:12 2023"}
    if config:
        meta["config"] = CONFIG.format(texts=list(texts))
    optimizer = {"state": {0: {"momentum_buffer": torch.zeros_like(sd["backbone.prompt"])}},
                 "param_groups": [{"lr": 0.001, "momentum": 0.9, "weight_decay": 0.0005, "params": [0, 1, 2]}]}
    path = Path(path)
    torch.save({"meta": meta, "state_dict": sd, "optimizer": optimizer}, path)
    return path


def write_bert_folder(path, hidden: int = 64, layers: int = 2, heads: int = 2, seed: int = 0,
                      model_type: str = "bert") -> Path:
    """A local Hugging Face BERT folder (config.json, vocab.txt, weights), offline."""
    from transformers import BertConfig, BertModel
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s", "##ed", "##al", ",", "."]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=2 * hidden, max_position_embeddings=64)
    torch.manual_seed(seed)
    BertModel(cfg).save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizer"}))
    if model_type != "bert":
        c = json.loads((path / "config.json").read_text())
        c["model_type"] = model_type
        (path / "config.json").write_text(json.dumps(c))
    return path
