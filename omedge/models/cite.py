"""CITE (Yunkun-Zhang/CITE): OpenAI CLIP ViT-B/16 image tower with one learned prompt token,
a 512 -> 1024 neck, and a cosine head (scale 100) against BioLinkBERT-large embeddings of
the class names. Gastric pathology, 3 classes.

The class-text embeddings are not in the trained file: they are computed once at export
from a local BioLinkBERT folder (`--text-encoder`), rounded to fp16 as the official head
keeps them, and stored in the bundle (constant `class_embeddings`). With
`--with-text-encoder` the BERT tower is exported as a second graph (`text`) so a device
can embed new class names offline (`--classes`)."""
from __future__ import annotations

import ast

import torch
from torch import nn

from ..errors import CheckpointError, UsageError
from ..spec import IMAGENET_MEAN, IMAGENET_STD, GraphSpec, ModelSpec, TensorSpec, image_input
from .checkpoint import unwrap
from .vit import Block

TEXTS = ["Well differentiated tubular adenocarcinoma", "Moderately differentiated tubular adenocarcinoma",
         "Poorly differentiated adenocarcinoma"]
SCALE = 100.0  # exp(4.6052), the config's temperature, as the fp16 head computes it (100.0 in fp16)
SIZES = {"B": dict(dim=768, depth=12, heads=12, proj=512),
         "tiny": dict(dim=64, depth=2, heads=2, proj=32)}
TEXT_DIM = {"B": 1024, "tiny": 64}  # BioLinkBERT-large's width; the tiny test BERT's


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class PromptedCLIP(nn.Module):
    """The official forward: patches + class token + position table -> ln_pre -> the prompt
    inserted after the class token (no position) -> blocks -> ln_post(class token) @ proj ->
    neck -> 100 * cos(., class embeddings)."""

    def __init__(self, dim, depth, heads, proj, text_dim=1024, n_classes=3, class_texts=None,
                 text_encoder=None, with_text_encoder=False, img_size=224, patch=16):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch, bias=False)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * dim ** -0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch) ** 2 + 1, dim) * dim ** -0.5)
        self.prompt = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.norm_pre = nn.LayerNorm(dim, eps=1e-5)
        self.blocks = nn.ModuleList([Block(dim, heads, eps=1e-5) for _ in range(depth)])
        for b in self.blocks:
            b.mlp.act = QuickGELU()
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.head = nn.Linear(dim, proj, bias=False)
        self.neck = nn.Linear(proj, text_dim)
        self.register_buffer("class_embeddings", torch.randn(n_classes, text_dim).half().float(), persistent=False)
        self.class_texts = list(class_texts) if class_texts else None
        self.text_encoder, self.with_text_encoder = text_encoder, with_text_encoder
        self._text = None

    def embed(self, pixel_values):
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm_pre(x)
        x = torch.cat([x[:, :1], self.prompt.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.neck(self.head(self.norm(x[:, 0])))

    def forward(self, pixel_values):
        emb = self.embed(pixel_values)
        text = self.class_embeddings / self.class_embeddings.norm(dim=-1, keepdim=True)
        return {"embedding": emb, "logits": SCALE * (emb / emb.norm(dim=-1, keepdim=True)) @ text.t()}

    # -- the exporters' protocols ------------------------------------------------------
    def graph_modules(self) -> dict:
        self._attach_text()
        graphs = {"model": self}
        if self.with_text_encoder:
            graphs["text"] = _TextTower(self._text[0])
        return graphs

    def constants(self) -> dict:
        import numpy as np
        self._attach_text()
        return {"class_embeddings": self.class_embeddings,
                "vocab": np.asarray(self._text[1]) if self.with_text_encoder else None}

    def text_preprocess(self) -> dict | None:
        """What the device needs to tokenise class names as the export did (text graph only)."""
        self._attach_text()
        if not self.with_text_encoder:
            return None
        bert, _, tokenize = self._text
        return {"lower_case": tokenize.lower_case, "max_tokens": int(bert.config.max_position_embeddings),
                "rounding": "float16, as the official head keeps its class embeddings"}

    def text_feeds(self, n: int) -> list[dict]:
        """Token feeds for verifying the text graph: the class names, then variants."""
        import numpy as np
        texts = (self.class_texts or TEXTS) + ["adenocarcinoma", "normal gastric mucosa with intestinal metaplasia"]
        tok = self._text[2]
        feeds = []
        for i in range(n):
            ids = tok(texts[i % len(texts)])["input_ids"]
            feeds.append({"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)})
        return feeds

    def _attach_text(self):
        """Class embeddings from the local BERT folder (once); random weights keep random ones."""
        if self._text is not None:
            return
        if self.text_encoder is None:
            if self.with_text_encoder:
                raise UsageError("--with-text-encoder needs --text-encoder FOLDER (a local BioLinkBERT-large folder)")
            if self.class_texts:
                raise UsageError("CITE's class embeddings are not in the checkpoint: give --text-encoder FOLDER "
                                 "(a local Hugging Face BioLinkBERT-large folder, e.g. from `huggingface-cli download "
                                 "michiyasunaga/BioLinkBERT-large` on a connected machine)")
            return
        bert, vocab, tokenize = read_text_encoder(self.text_encoder)
        if bert.config.hidden_size != self.neck.out_features:
            raise UsageError(f"the text encoder in {self.text_encoder} gives {bert.config.hidden_size}-d embeddings; "
                             f"this CITE neck gives {self.neck.out_features}-d (BioLinkBERT-large: 1024)")
        texts = self.class_texts or TEXTS
        with torch.no_grad():
            rows = [bert(**{k: torch.tensor([v]) for k, v in tokenize(t).items()}).pooler_output for t in texts]
        # cast to fp16 as the official head stores them (float16=True), then used in fp32
        self.class_embeddings = torch.cat(rows).half().float()
        self._text = (bert, vocab, tokenize)


class _TextTower(nn.Module):
    """BERT (ids, mask) -> pooler_output, the class-name embedding (token types all 0)."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                        token_type_ids=torch.zeros_like(input_ids))
        return {"text_embedding": out.pooler_output}


def read_text_encoder(folder):
    """(BertModel, vocab list, tokenize(text) -> {input_ids, attention_mask}) from a local
    Hugging Face folder, offline. Anything that is not a BERT-like folder is refused."""
    from ..io.text_folder import read_bert_folder
    read_bert_folder(folder, "CITE embeds class names with BioLinkBERT-large (model_type bert, a WordPiece vocab.txt)")
    from transformers import BertModel, BertTokenizer
    from transformers.utils import logging as hf_logging
    tokenizer = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the export's own log says what happens
    try:
        bert = BertModel.from_pretrained(str(folder), local_files_only=True, attn_implementation="eager").eval()
    except OSError as e:
        raise UsageError(f"--text-encoder {folder}: no weights could be read: {e}") from None
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
    vocab = [t for t, _ in sorted(tokenizer.vocab.items(), key=lambda kv: kv[1])]

    def tokenize(text):  # alone: [CLS] text [SEP], no padding, as the official head does
        enc = tokenizer(text)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    tokenize.lower_case = bool(tokenizer.do_lower_case)
    return bert, vocab, tokenize


def build(variant: str, text_dim: int | None = None, n_classes: int = 3, class_texts=None, text_encoder=None,
          with_text_encoder: bool = False):
    if class_texts and len(class_texts) != n_classes:
        raise UsageError(f"--classes names {len(class_texts)} classes; this CITE file was trained for "
                         f"{n_classes} classes",
                         f"give {n_classes} class texts in the file's label order, or none (the file's own)")
    return PromptedCLIP(**SIZES[variant], text_dim=text_dim or TEXT_DIM[variant], n_classes=n_classes,
                        class_texts=class_texts, text_encoder=text_encoder, with_text_encoder=with_text_encoder)


# OpenAI CLIP visual names -> ours (timm's): prefixes of the key, then parts inside it
CLIP_PREFIXES = {"conv1.": "patch_embed.", "class_embedding": "cls_token", "positional_embedding": "pos_embed",
                 "ln_pre.": "norm_pre.", "ln_post.": "norm.", "transformer.resblocks.": "blocks.",
                 "proj": "head.weight"}
CLIP_PARTS = {".ln_1.": ".norm1.", ".ln_2.": ".norm2.", ".attn.in_proj_weight": ".attn.qkv.weight",
              ".attn.in_proj_bias": ".attn.qkv.bias", ".attn.out_proj.": ".attn.proj.", ".mlp.c_fc.": ".mlp.fc1.",
              ".mlp.c_proj.": ".mlp.fc2."}


def _our_name(clip_key: str) -> str:
    for old, new in CLIP_PREFIXES.items():
        if clip_key == old or (old.endswith(".") and clip_key.startswith(old)):
            clip_key = new + clip_key[len(old):]
            break
    for old, new in CLIP_PARTS.items():
        clip_key = clip_key.replace(old, new)
    return clip_key


def remap(raw):
    """mmcls file {'meta', 'state_dict', 'optimizer'} -> our names, all fp32 (a GPU-trained
    file mixes fp16 and fp32 tensors). The saved prompt is deployed as saved: the official
    code would add the first batch's token mean to it again after loading (its
    'initialised' flag is not saved)."""
    sd = unwrap(raw, ("state_dict",))
    if "backbone.prompt" not in sd or not any(k.startswith("backbone.model.") for k in sd):
        raise CheckpointError("not a CITE file: no backbone.prompt / backbone.model.* (CLIP visual) keys")
    out = {}
    for key, v in sd.items():
        k = _our_name(key[len("backbone.model."):]) if key.startswith("backbone.model.") else key
        k = "prompt" if k == "backbone.prompt" else k
        v = v.float()
        if k in ("cls_token", "pos_embed"):
            v = v.reshape(1, -1, v.shape[-1])
        elif k == "head.weight":
            v = v.t().contiguous()  # CLIP keeps proj as [dim, 512] and multiplies x @ proj
        elif k == "prompt" and tuple(v.shape[:2]) != (1, 1):
            raise CheckpointError(f"CITE prompt of shape {list(v.shape)}: omedge deploys one prompt token at layer 0")
        out[k] = v
    texts, n = class_texts(raw)
    return out, {"text_dim": int(out["neck.weight"].shape[0]), "n_classes": n, "class_texts": texts}


def class_texts(raw) -> tuple[list[str], int]:
    """The head's texts from the config text saved in meta (meta['CLASSES'] holds only '0', '1',
    '2'); the official config's texts when the file has no readable config."""
    meta = raw.get("meta") if isinstance(raw, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    n = len(meta.get("CLASSES") or TEXTS)
    texts = _texts_in_config(meta.get("config"))
    if texts is None:
        texts = TEXTS if n == len(TEXTS) else [f"class {i}" for i in range(n)]
    if len(texts) != n:
        raise CheckpointError(f"the file's config names {len(texts)} class texts but meta['CLASSES'] has {n}")
    return texts, n


def _texts_in_config(text) -> list[str] | None:
    if not isinstance(text, str):
        return None
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        value = None
        if isinstance(node, ast.keyword) and node.arg == "texts":
            value = node.value
        elif isinstance(node, ast.Dict):
            value = next((v for k, v in zip(node.keys, node.values)
                          if isinstance(k, ast.Constant) and k.value == "texts"), None)
        if value is not None:
            try:
                got = ast.literal_eval(value)
            except ValueError:
                continue
            if isinstance(got, (list, tuple)) and got and all(isinstance(t, str) for t in got):
                return list(got)
    return None


TEXT_INPUTS = (TensorSpec("input_ids", "NL", dtype="int64", shape=(1, None), dynamic={1: "tokens"},
                          description="[CLS] class name [SEP], WordPiece ids"),
               TensorSpec("attention_mask", "NL", dtype="int64", shape=(1, None), dynamic={1: "tokens"}))
SPECS = [ModelSpec(
    id="cite", title="CITE prompted CLIP ViT-B/16 gastric pathology classifier (BioLinkBERT class names)",
    kind="prompted-classification",
    inputs=(image_input(), *TEXT_INPUTS),
    outputs=(TensorSpec("embedding", "NC", shape=(None, None), dynamic={0: "batch"},
                        description="neck output, compared by cosine with the class embeddings"),
             TensorSpec("logits", "NC", shape=(None, None), dynamic={0: "batch"},
                        description="100 * cosine with the stored class-name embeddings"),
             TensorSpec("text_embedding", "NC", shape=(1, None), when="with_text_encoder",
                        description="BERT pooler_output of one class name")),
    graphs=(GraphSpec("model", ("pixel_values",), ("embedding", "logits")),
            GraphSpec("text", ("input_ids", "attention_mask"), ("text_embedding",), quantize="no",
                      when="with_text_encoder")),
    constants=("class_embeddings", "vocab"),
    primary_output="logits", variants=("B", "tiny"), default_variant="B",
    preprocess={"color": "RGB", "grayscale": "replicate", "alpha": "drop",
                "resize": {"size": [224, 224], "interpolation": "bilinear"},
                "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "logit_scale": SCALE,
                "note": "resized to 224x224 directly (no crop), ImageNet mean/std (not CLIP's), as the official "
                        "test pipeline"},
    licence="none stated by the authors", source="https://github.com/Yunkun-Zhang/CITE",
    build=build, remap=remap, labels=TEXTS, parity={"int8": {"top1_agreement": 0.98}},
    official={"repo": "Yunkun-Zhang/CITE", "entry": "models/clip_models.py (PromptedCLIPImageBackbone.forward); "
              "models/prompt_vit.py (ProjectionNeck, TextEmbeddingHead, BERT); datasets/pipelines.py "
              "(PatchGastricPipeline, test_mode=True); "
                       "configs/gastric/cite/clip-vitb16_biolinkbert-l_cb_bs128_i1000.py",
              "transform": "PIL RGB -> Resize((224, 224)) bilinear -> ToTensor -> Normalize(ImageNet)",
              "output": "softmax(100 * cos(neck(proj(ln_post(cls))), BioLinkBERT pooler_output of each class text))",
              "prompt": "deployed as saved (the official code re-adds the first batch's token mean after loading "
                        "because prompt_init='token' does not save its flag)"},
    notes="Class texts come from the config saved in the file's meta. The fp16 tensors of a GPU-trained file "
          "are upcast; the deployed model runs in fp32 (the official one in fp16 on a GPU).")]
