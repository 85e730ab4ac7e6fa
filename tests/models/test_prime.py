"""PRIME / TemPL: official-layout files load strictly, the architecture equals
transformers' EsmForMaskedLM, the OGT head pools as the official code does, and the
ONNX export keeps batch and length dynamic."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from omedge.errors import CheckpointError
from omedge.models import prime

TINY = prime.SIZES["tiny"]


def official_shapes(layers, dim, heads, ffn, head="lm") -> dict:
    """Key -> shape in the order of the released file (lm_head.bias first)."""
    shapes = {}
    if head == "lm":
        shapes["lm_head.bias"] = (33,)
    shapes["model.embeddings.word_embeddings.weight"] = (25, dim)
    per_layer = {"attention.self.query.weight": (dim, dim), "attention.self.query.bias": (dim,),
                 "attention.self.key.weight": (dim, dim), "attention.self.key.bias": (dim,),
                 "attention.self.value.weight": (dim, dim), "attention.self.value.bias": (dim,),
                 "attention.self.rotary_embeddings.inv_freq": (dim // heads // 2,),
                 "attention.output.dense.weight": (dim, dim), "attention.output.dense.bias": (dim,),
                 "attention.LayerNorm.weight": (dim,), "attention.LayerNorm.bias": (dim,),
                 "intermediate.dense.weight": (ffn, dim), "intermediate.dense.bias": (ffn,),
                 "output.dense.weight": (dim, ffn), "output.dense.bias": (dim,),
                 "LayerNorm.weight": (dim,), "LayerNorm.bias": (dim,)}
    for i in range(layers):
        shapes.update({f"model.encoder.layer.{i}.{k}": s for k, s in per_layer.items()})
    shapes["model.encoder.emb_layer_norm_after.weight"] = (dim,)
    shapes["model.encoder.emb_layer_norm_after.bias"] = (dim,)
    if head == "lm":
        shapes.update({"lm_head.dense.weight": (dim, dim), "lm_head.dense.bias": (dim,),
                       "lm_head.layer_norm.weight": (dim,), "lm_head.layer_norm.bias": (dim,),
                       "lm_head.decoder.weight": (33, dim)})
    else:
        shapes.update({"regression.attention1d.layer.weight": (1, dim, 1), "regression.attention1d.layer.bias": (1,),
                       "regression.linear.weight": (dim, dim), "regression.linear.bias": (dim,),
                       "regression.final.weight": (1, dim), "regression.final.bias": (1,)})
    return shapes


def synth_official(head="lm", seed=0, layers=TINY["layers"], dim=TINY["dim"], heads=TINY["heads"],
                   ffn=TINY["ffn"]) -> dict:
    """float32 tensors in the official layout: fan-in-scaled weights, LayerNorm gains near
    1, small biases, and the real rotary inverse frequencies."""
    g = torch.Generator().manual_seed(seed)
    head_dim = dim // heads
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    sd = {}
    for key, shape in official_shapes(layers, dim, heads, ffn, head).items():
        if key.endswith("inv_freq"):
            t = inv_freq.clone()
        elif key.endswith("word_embeddings.weight"):
            t = torch.randn(shape, generator=g) * 0.5
        elif ("LayerNorm" in key or "layer_norm" in key) and key.endswith("weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("bias"):
            t = 0.05 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        sd[key] = t.to(torch.float32).contiguous()
    return sd


def random_protein(n, length, seed=0):
    """cls, `length` residues (ids 4-23), eos."""
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(4, 24, (n, length), generator=g)
    return torch.cat([torch.zeros(n, 1, dtype=torch.long), body, torch.full((n, 1), 2)], dim=1)


def saved_and_loaded(sd, path):
    torch.save(sd, path)
    return torch.load(path, map_location="cpu", weights_only=True)


def loaded(head, sd):
    remap = prime.remap_lm if head == "lm" else prime.remap_ogt
    state, options = remap(sd)
    model = prime.build("tiny", head=head)
    model.load_state_dict(state, strict=True)
    return model.eval(), options


def test_official_layout_loads_strictly(tmp_path):
    official = synth_official()
    assert len(official) == 17 * TINY["layers"] + 9
    assert next(iter(official)) == "lm_head.bias"
    raw = saved_and_loaded(official, tmp_path / "prime.pt")
    model, options = loaded("lm", raw)
    assert options == {}
    ours = model.state_dict()
    assert sorted(ours) == sorted(raw)
    assert all(torch.equal(ours[k], raw[k]) for k in raw)
    # the rotary buffers are persistent and hold the file's values
    assert torch.equal(model.model.encoder.layer[1].attention.self.rotary_embeddings.inv_freq,
                       raw["model.encoder.layer.1.attention.self.rotary_embeddings.inv_freq"])
    # a training wrapper with DataParallel prefixes is the same file
    wrapped, _ = prime.remap_lm({"state_dict": {"module." + k: v for k, v in raw.items()}})
    assert list(wrapped) == list(raw)
    assert len(prime.official_keys(33, "lm")) == len(prime.official_keys(33, "ogt")) == 570


def test_lm_remap_refuses_other_files():
    official = synth_official()
    with pytest.raises(CheckpointError, match=r"\[33, 64\].*has 25 rows"):  # an ESM-2 sized token table
        prime.remap_lm({**official, prime.EMBED: torch.zeros(33, TINY["dim"])})
    with pytest.raises(CheckpointError, match="decoder.weight has 25 rows"):
        prime.remap_lm({**official, "lm_head.decoder.weight": torch.zeros(25, TINY["dim"])})
    missing = {k: v for k, v in official.items() if not k.endswith("layer.1.attention.self.rotary_embeddings.inv_freq")}
    with pytest.raises(CheckpointError, match="missing keys.*layer.1.attention.self.rotary_embeddings.inv_freq"):
        prime.remap_lm(missing)
    esm = {"esm." + k[len("model."):]: v for k, v in official.items() if k.startswith("model.")}
    with pytest.raises(CheckpointError, match="transformers ESM"):
        prime.remap_lm(esm)


def hf_esm_from(sd, layers, dim, heads, ffn):
    """transformers' EsmForMaskedLM with our weights: esm. for model., the token table
    padded to 33 rows, the decoder untied."""
    from transformers import EsmConfig, EsmForMaskedLM
    config = EsmConfig(vocab_size=33, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=ffn, hidden_act="gelu", hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, max_position_embeddings=1026, layer_norm_eps=1e-5,
                       position_embedding_type="rotary", emb_layer_norm_before=False, token_dropout=True,
                       mask_token_id=32, pad_token_id=1, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    hf = EsmForMaskedLM(config).eval()
    hf_sd = {("esm." + k[len("model."):] if k.startswith("model.") else k): v.clone() for k, v in sd.items()}
    embed = hf_sd["esm.embeddings.word_embeddings.weight"]
    hf_sd["esm.embeddings.word_embeddings.weight"] = torch.cat([embed, torch.randn(8, dim)])
    result = hf.load_state_dict(hf_sd, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(k.startswith("esm.contact_head.") for k in result.missing_keys), result.missing_keys
    assert torch.equal(hf.lm_head.decoder.weight, sd["lm_head.decoder.weight"])  # untied, ours
    return hf


def test_equals_transformers_esm_masked_lm():
    official = synth_official(seed=1)
    model, _ = loaded("lm", official)
    hf = hf_esm_from(official, **TINY)
    ids = random_protein(2, 29, seed=3)
    with torch.no_grad():
        ours = model(ids)["log_probs"]
        ref = torch.log_softmax(hf(input_ids=ids).logits, dim=-1)
    assert ours.shape == (2, 31, 33)
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-4, diff
    # not trivially equal: positions and tokens change the prediction
    assert (ours[0, 5] - ours[0, 6]).abs().max() > 1e-2


@pytest.mark.slow
def test_full_size_keys_and_parameter_count():
    with torch.device("meta"):
        model = prime.build("650M")
    sd = model.state_dict()
    expected = official_shapes(**prime.SIZES["650M"])
    assert len(sd) == len(expected) == 570
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    n = sum(p.numel() for p in model.parameters())
    print(f"PRIME 650M parameters: {n:,}")
    assert 650e6 < n < 652e6


def test_ogt_head(tmp_path):
    official = synth_official("ogt", seed=2)
    assert len(official) == 17 * TINY["layers"] + 9
    raw = saved_and_loaded(official, tmp_path / "prime_ogt.pt")
    model, _ = loaded("ogt", raw)
    ids = random_protein(3, 17, seed=4)
    with torch.no_grad():
        out = model(ids)["ogt"]
        h = model.model(ids)
    assert out.shape == (3,) and out.dtype == torch.float32
    # the official head, written out: softmax over ALL positions (cls and eos too)
    w = raw["regression.attention1d.layer.weight"][0, :, 0]
    scores = h @ w + raw["regression.attention1d.layer.bias"]
    pooled = (scores.softmax(dim=1)[..., None] * h).sum(dim=1)
    hidden = torch.tanh(pooled @ raw["regression.linear.weight"].T + raw["regression.linear.bias"])
    expected = hidden @ raw["regression.final.weight"][0] + raw["regression.final.bias"]
    assert torch.allclose(out, expected, atol=1e-5), (out, expected)
    assert out.std() > 1e-4   # different sequences, different temperatures


def test_wrong_head_files_are_named():
    lm, ogt = synth_official("lm"), synth_official("ogt")
    with pytest.raises(CheckpointError, match="regression head") as err:
        prime.remap_lm(ogt)
    assert "prime-ogt" in str(err.value)
    with pytest.raises(CheckpointError, match="base language model") as err:
        prime.remap_ogt(lm)
    assert "use prime " in str(err.value)
    with pytest.raises(CheckpointError, match="unexpected keys.*lm_head"):
        prime.remap_ogt({**ogt, "lm_head.decoder.weight": torch.zeros(33, TINY["dim"])})
    with pytest.raises(CheckpointError, match="not a PRIME checkpoint"):
        prime.remap_ogt({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)})


def test_specs_match_the_modules():
    specs = {s.id: s for s in prime.SPECS}
    assert set(specs) == {"prime", "prime-ogt"}
    for spec, head in ((specs["prime"], "lm"), (specs["prime-ogt"], "ogt")):
        assert spec.kind == "sequence" and spec.default_variant in spec.variants
        model = spec.build("tiny").eval()
        sd, _ = spec.remap(synth_official(head))
        model.load_state_dict(sd, strict=True)
        with torch.no_grad():
            out = model(random_protein(1, 5))
        assert list(out) == [o.name for o in spec.outputs] == [spec.primary_output]
        for o in spec.outputs:
            assert out[o.name].dim() == len(o.shape)


@pytest.mark.parametrize("head", ["lm", "ogt"])
def test_onnx_export_dynamic_length(tmp_path, head):
    ort = pytest.importorskip("onnxruntime")
    spec = {"lm": prime.SPECS[0], "ogt": prime.SPECS[1]}[head]
    model, _ = loaded(head, synth_official(head, seed=5))
    names = [t.name for t in spec.inputs + spec.outputs]
    path = tmp_path / f"prime-{head}.onnx"
    torch.onnx.export(model, (random_protein(2, 14),), str(path), input_names=[spec.inputs[0].name],
                      output_names=[o.name for o in spec.outputs], opset_version=17, dynamo=False,
                      dynamic_axes={t.name: t.dynamic for t in spec.inputs + spec.outputs})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] + [o.name for o in session.get_outputs()] == names
    ov = _openvino_model(path)
    for n, length in ((1, 8), (3, 35)):   # 10 and 37 tokens with cls and eos
        ids = random_protein(n, length, seed=length)
        with torch.no_grad():
            ref = model(ids)[spec.primary_output].numpy()
        got = session.run(None, {"input_ids": ids.numpy()})[0]
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()
        if ov is not None:
            got_ov = ov(ids.numpy())[0]
            assert np.abs(got_ov - ref).max() < 1e-4, np.abs(got_ov - ref).max()


def _openvino_model(path):
    """OpenVINO's CPU plugin on the same graph (skipped where openvino is absent). f32 is
    asked for explicitly: on CPUs with AMX/AVX512-BF16 the plugin's default is bf16."""
    try:
        import openvino as ov
    except ImportError:
        return None
    core = ov.Core()
    return core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
