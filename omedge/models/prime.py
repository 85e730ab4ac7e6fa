"""PRIME / TemPL protein language model (ai4protein/Prime, MIT): an ESM-2-650M clone.

Pre-LN transformer with rotary positions, erf-GELU, LayerNorm eps 1e-5 and a final
`emb_layer_norm_after`; the same maths as transformers' EsmForMaskedLM, with `esm.`
named `model.`, a 25-row token embedding and an untied LM decoder. Module paths are
the official key names, so the released files load with a strict `load_state_dict`
(including the 33 persistent `...rotary_embeddings.inv_freq` buffers).

Token ids (the tokenizer lives in omedge/io/protein.py): 0 cls, 1 pad, 2 eos, 3 unk,
4-23 "LAGVSERTIDPKQNFYMHWC", 24 X. ESM's B/U/Z/O (25-28) and mask (32) index past
the 25-row embedding and must never reach the graph; the 33 LM logits keep ESM-2's
alphabet order. No attention mask: every row is one whole sequence, so batches hold
sequences of equal length.

Heads, as the official `prime/model.py` defines them:
- `prime.pt` (ForMaskedLM / ZeroShot): `lm_head.{dense,layer_norm,decoder}` + `lm_head.bias`.
- `prime_ogt.pt` (SupervisedRegression): `regression.attention1d.layer` (Conv1d 1280->1,
  kernel 1) softmax-pooled over ALL positions (cls and eos included), then
  `regression.linear` -> tanh -> `regression.final` (->1), degrees C. The official
  notebook loads it strictly into a model without `lm_head`, so the file has none.
  prime_tm.pt / prime_topt.pt share this layout; the weights cannot tell them apart.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..spec import ModelSpec, TensorSpec
from .checkpoint import describe_mismatch, strip_prefix, unwrap

SIZES = {
    "650M": {"layers": 33, "dim": 1280, "heads": 20, "ffn": 5120},
    "tiny": {"layers": 2, "dim": 64, "heads": 4, "ffn": 128},
}
EMBEDDING_ROWS = 25   # the release's token table; ESM-2's has 33
LM_TOKENS = 33        # the LM head keeps ESM-2's full alphabet
# ESM's token-dropout rescale (1 - 0.15 * 0.8) / (1 - observed mask ratio); mask tokens
# never reach this model, so the observed ratio is 0 and the factor is a constant.
TOKEN_SCALE = 1 - 0.15 * 0.8
EMBED = "model.embeddings.word_embeddings.weight"


class RotaryEmbedding(nn.Module):
    """ESM rotary embedding. cos/sin come from `positions` (0..L-1, made once from the
    input ids) so an exported graph keeps the sequence axis dynamic: the tracing
    exporter freezes sizes read from intermediate tensors here to the example length."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, q, k, positions):
        freqs = positions.to(self.inv_freq.dtype)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.rotary_embeddings = RotaryEmbedding(self.head_dim)

    def _split(self, x):  # (N, L, C) -> (N, H, L, D); static sizes only
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x, positions):
        q = self._split(self.query(x)) * self.head_dim ** -0.5   # ESM scales before rotating
        k, v = self._split(self.key(x)), self._split(self.value(x))
        q, k = self.rotary_embeddings(q, k, positions)
        # Written out (not SDPA) so the graph keeps plain MatMul/Softmax nodes.
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return (attn @ v).transpose(1, 2).flatten(2)


class Dense(nn.Module):
    """A Linear under the name `dense` (the official nesting: `output.dense`, ...)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.dense(x)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.self = SelfAttention(dim, heads)
        self.output = Dense(dim, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x, positions):
        return x + self.output(self.self(self.LayerNorm(x), positions))


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.attention = Attention(dim, heads)
        self.intermediate = Dense(dim, ffn)
        self.output = Dense(ffn, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x, positions):
        x = self.attention(x, positions)
        return x + self.output(F.gelu(self.intermediate(self.LayerNorm(x))))


class Encoder(nn.Module):
    def __init__(self, layers: int, dim: int, heads: int, ffn: int):
        super().__init__()
        self.layer = nn.ModuleList([Layer(dim, heads, ffn) for _ in range(layers)])
        self.emb_layer_norm_after = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x, positions):
        for layer in self.layer:
            x = layer(x, positions)
        return self.emb_layer_norm_after(x)


class ProteinEncoder(nn.Module):
    def __init__(self, layers: int, dim: int, heads: int, ffn: int):
        super().__init__()
        # No padding_idx: it only affects training (and makes the tracer warn).
        self.embeddings = nn.ModuleDict({"word_embeddings": nn.Embedding(EMBEDDING_ROWS, dim)})
        self.encoder = Encoder(layers, dim, heads, ffn)

    def forward(self, input_ids):
        x = self.embeddings["word_embeddings"](input_ids) * TOKEN_SCALE
        return self.encoder(x, torch.arange(input_ids.shape[1], device=input_ids.device))


class LMHead(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.layer_norm = nn.LayerNorm(dim, eps=1e-5)
        self.decoder = nn.Linear(dim, LM_TOKENS, bias=False)
        self.bias = nn.Parameter(torch.zeros(LM_TOKENS))

    def forward(self, h):
        return self.decoder(self.layer_norm(F.gelu(self.dense(h)))) + self.bias


class AttentionPool(nn.Module):
    """Softmax-weighted mean over every position (cls and eos too, as trained)."""

    def __init__(self, dim: int):
        super().__init__()
        self.layer = nn.Conv1d(dim, 1, kernel_size=1)

    def forward(self, h):                                  # (N, L, C) -> (N, C)
        w = self.layer(h.transpose(1, 2)).softmax(dim=-1)  # (N, 1, L)
        return (w @ h).squeeze(1)


class RegressionHead(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.attention1d = AttentionPool(dim)
        self.linear = nn.Linear(dim, dim)
        self.final = nn.Linear(dim, 1)

    def forward(self, h):
        return self.final(torch.tanh(self.linear(self.attention1d(h)))).squeeze(-1)


class Prime(nn.Module):
    """forward(input_ids int64 (N, L)) -> {"log_probs": (N, L, 33)} or {"ogt": (N,)}."""

    def __init__(self, layers: int, dim: int, heads: int, ffn: int, head: str = "lm"):
        super().__init__()
        if head not in ("lm", "ogt"):
            raise ValueError(f"unknown PRIME head {head!r} (lm or ogt)")
        self.head = head
        self.model = ProteinEncoder(layers, dim, heads, ffn)
        if head == "lm":
            self.lm_head = LMHead(dim)
        else:
            self.regression = RegressionHead(dim)

    def forward(self, input_ids):
        h = self.model(input_ids)
        if self.head == "lm":
            return {"log_probs": torch.log_softmax(self.lm_head(h), dim=-1)}
        return {"ogt": self.regression(h)}


def build(variant: str, head: str = "lm") -> Prime:
    return Prime(**SIZES[variant], head=head)


def build_lm(variant: str) -> Prime:
    return build(variant, "lm")


def build_ogt(variant: str) -> Prime:
    return build(variant, "ogt")


def official_keys(layers: int, head: str) -> list[str]:
    """The keys of a released file with `layers` blocks (17 per block + 9): our module's
    own, which are the official names; built narrow on the meta device (no memory)."""
    with torch.device("meta"):
        return list(Prime(layers, dim=8, heads=2, ffn=8, head=head).state_dict())


def _prime_state(raw) -> dict:
    """The flat state_dict with wrappers and DataParallel prefixes removed; refuses files
    that are not PRIME at all (identify() calls every family's remap)."""
    sd = strip_prefix(unwrap(raw), "module.")
    if EMBED not in sd:
        hint = ("this looks like a transformers ESM file (esm.*); PRIME files name the encoder model.*"
                if any(k.startswith("esm.") for k in sd) else None)
        raise CheckpointError(f"no {EMBED}: not a PRIME checkpoint", hint)
    rows = tuple(sd[EMBED].shape)
    if len(rows) != 2 or rows[0] != EMBEDDING_ROWS:
        raise CheckpointError(f"{EMBED} is {list(rows)}: PRIME's token table has {EMBEDDING_ROWS} rows "
                              "(ESM-2's has 33): not a PRIME release file")
    return sd


def _check_layout(sd: dict, head: str, model_id: str) -> None:
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"model\.encoder\.layer\.(\d+)\.", k))}
    expected = official_keys(max(blocks) + 1 if blocks else 0, head)
    wanted = set(expected)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in wanted]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not have the {model_id} layout: "
                              + describe_mismatch(missing, unexpected, []))


def remap_lm(raw) -> tuple[dict, dict]:
    """prime.pt (the base model) -> (state_dict, {}); the keys are already ours."""
    sd = _prime_state(raw)
    if any(k.startswith("regression.") for k in sd):
        raise CheckpointError("this PRIME file has a regression head (regression.*): it is a fine-tuned "
                              "regressor (prime_ogt.pt / prime_tm.pt / prime_topt.pt), not the language model",
                              "use prime-ogt")
    decoder = sd.get("lm_head.decoder.weight")
    if decoder is None:
        raise CheckpointError("this PRIME file has no LM head (lm_head.decoder.weight)",
                              "the base model file prime.pt holds it")
    if decoder.shape[0] != LM_TOKENS:
        raise CheckpointError(f"lm_head.decoder.weight has {decoder.shape[0]} rows, PRIME's has {LM_TOKENS}")
    _check_layout(sd, "lm", "prime")
    return dict(sd), {}


def remap_ogt(raw) -> tuple[dict, dict]:
    """prime_ogt.pt (encoder + regression head, no lm_head) -> (state_dict, {})."""
    sd = _prime_state(raw)
    if not any(k.startswith("regression.") for k in sd):
        if any(k.startswith("lm_head.") for k in sd):
            raise CheckpointError("this is the PRIME base language model (lm_head.*, no regression head), "
                                  "not the OGT regressor", "use prime (zero-shot mutation scoring)")
        raise CheckpointError("this PRIME file has no regression head (regression.*)",
                              "the OGT file is prime_ogt.pt")
    _check_layout(sd, "ogt", "prime-ogt")
    return dict(sd), {}


_INPUTS = (TensorSpec("input_ids", "NL", dtype="int64", shape=(None, None), dynamic={0: "batch", 1: "length"},
                      description="cls, residue ids 4-24, eos; every row one whole sequence"),)
_PREPROCESS = {"alphabet": "esm2", "max_length": 4096, "embedding_rows": EMBEDDING_ROWS, "ambiguous": "refuse"}
_SOURCE = "https://github.com/ai4protein/Prime"
_ZERO_SHOT = {"repo": "ai4protein/Prime", "entry": "predict.py main -> prime/model.py ZeroShot; prime/utils.py "
              "scan_max_mutant (4096 window), score_mutant",
              "transform": "<cls> + sequence + <eos>, all-ones mask, one pass on the unmasked wild type, "
                           "log_softmax; score = lp[1 + i, mt] - lp[1 + i, wt]; 'wt' scores 0",
              "differences": "omedge refuses a wild-type mismatch (official: warning), sums the singles of a "
                             "multi-mutant (official: one substitution only), refuses B/U/Z/O (official: "
                             "IndexError past the 25-row embedding)"}
_OGT = {"repo": "ai4protein/Prime", "entry": "notebooks/predict_ogt.ipynb: SupervisedRegression (prime/model.py)",
        "transform": "<cls> + sequence + <eos>, one value per FASTA record"}

SPECS = [
    ModelSpec(
        id="prime", title="PRIME / TemPL protein language model (ESM-2-650M architecture)", kind="sequence",
        variants=("650M", "tiny"), default_variant="650M", inputs=_INPUTS,
        outputs=(TensorSpec("log_probs", "NLC", shape=(None, None, LM_TOKENS), dynamic={0: "batch", 1: "length"},
                            description="log-softmax over ESM-2's 33 tokens at every position"),),
        primary_output="log_probs", preprocess=dict(_PREPROCESS), licence="MIT", source=_SOURCE,
        build=build_lm, remap=remap_lm, parity={}, official=_ZERO_SHOT,
        notes="prime.pt (the README's prime_base.pt): zero-shot mutation scoring from one wild-type pass."),
    ModelSpec(
        id="prime-ogt", title="PRIME optimal growth temperature regressor", kind="sequence",
        variants=("650M", "tiny"), default_variant="650M", inputs=_INPUTS,
        outputs=(TensorSpec("ogt", "N", shape=(None,), dynamic={0: "batch"},
                            description="optimal growth temperature, degrees C"),),
        primary_output="ogt", preprocess=dict(_PREPROCESS), licence="MIT", source=_SOURCE,
        build=build_ogt, remap=remap_ogt, parity={}, official=_OGT,
        notes="prime_ogt.pt; prime_tm.pt / prime_topt.pt have the same layout but predict Tm / Topt."),
]
