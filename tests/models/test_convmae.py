"""DeblurringMIM ConvMAE-B: official checkpoint layouts load strictly; the forward matches
a functional re-statement of the official ConvViT code; ONNX export is faithful."""
import argparse

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import omedge.models as models
from omedge.errors import CheckpointError
from omedge.exporters.onnx import export_onnx
from omedge.models import convmae, deblurring
from tests.conftest import spec_io  # noqa: E402

SPEC = convmae.SPECS[0]


def random_sd(seed=0, **options) -> dict:
    """Tiny ConvViT weights, all random (norm weights around 1)."""
    sd = models.build(SPEC, "tiny", seed=seed, **options).state_dict()
    gen = torch.Generator().manual_seed(seed + 100)
    return {k: torch.randn(v.shape, generator=gen) * 0.1 + (1.0 if "norm" in k and k.endswith(".weight") else 0.0)
            for k, v in sd.items()}


def pretraining_dict(encoder_sd: dict) -> dict:
    """ConvMAE `checkpoint-799.pth`: MaskedAutoencoderConvViT (encoder, multi-scale
    stage*_output_decode convs, decoder), optimizer, epoch, scaler, args."""
    sd = dict(encoder_sd)
    dims = (32, 48, 64)
    sd["stage1_output_decode.weight"] = torch.randn(dims[2], dims[0], 4, 4)
    sd["stage1_output_decode.bias"] = torch.zeros(dims[2])
    sd["stage2_output_decode.weight"] = torch.randn(dims[2], dims[1], 2, 2)
    sd["stage2_output_decode.bias"] = torch.zeros(dims[2])
    sd["mask_token"] = torch.zeros(1, 1, 32)
    sd["decoder_embed.weight"] = torch.randn(32, dims[2])
    sd["decoder_pos_embed"] = torch.zeros(1, 196, 32)
    sd["decoder_blocks.0.attn.qkv.weight"] = torch.randn(96, 32)
    sd["decoder_norm.weight"] = torch.ones(32)
    sd["decoder_pred.weight"] = torch.randn(16 * 16 * 3, 32)
    return {"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
            "epoch": 799, "scaler": {"scale": 65536.0, "growth_factor": 2.0},
            "args": argparse.Namespace(model="convmae_convvit_base_patch16", mask_ratio=0.75, blr=1.5e-4)}


def test_pretraining_dict_loads_encoder_strictly(tmp_path):
    enc = random_sd(seed=1)
    torch.save(pretraining_dict(enc), tmp_path / "checkpoint-799.pth")
    model, variant, options = models.load(SPEC, tmp_path / "checkpoint-799.pth")
    assert (variant, options, model.head) == ("tiny", {}, None)
    assert hasattr(model, "norm") and not hasattr(model, "fc_norm")
    assert torch.equal(model.state_dict()["blocks1.0.attn.weight"], enc["blocks1.0.attn.weight"])
    assert model(torch.zeros(2, 3, 224, 224))["embedding"].shape == (2, 64)


def test_finetuned_classifier_gets_its_head(tmp_path):
    torch.save({"model": random_sd(seed=2, num_classes=2)}, tmp_path / "finetuned.pth")
    model, _, options = models.load(SPEC, tmp_path / "finetuned.pth")
    assert options == {"num_classes": 2} and not hasattr(model, "norm")
    out = model(torch.zeros(2, 3, 224, 224))
    assert out["logits"].shape == (2, 2) and out["embedding"].shape == (2, 64)


def test_wrong_model_and_missing_keys_fail_clearly(tmp_path):
    mae = models.build(deblurring.SPECS[0], "tiny").state_dict()
    torch.save({"model": mae}, tmp_path / "mae.pth")
    with pytest.raises(CheckpointError, match="not a ConvMAE"):
        models.load(SPEC, tmp_path / "mae.pth")
    sd = random_sd()
    del sd["blocks2.0.conv1.weight"]
    torch.save(pretraining_dict(sd), tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="missing keys.*blocks2.0.conv1.weight"):
        models.load(SPEC, tmp_path / "partial.pth", variant="tiny")


def test_head_without_fc_norm_is_refused(tmp_path):
    sd = random_sd(seed=3)
    sd["head.weight"], sd["head.bias"] = torch.randn(2, 64), torch.zeros(2)
    torch.save({"model": sd}, tmp_path / "cls_token_head.pth")
    with pytest.raises(CheckpointError, match="no fc_norm"):
        models.load(SPEC, tmp_path / "cls_token_head.pth")


def official_forward(sd, x, heads=2):
    """The official ConvViT forward written with torch.nn.functional on the raw state
    dict: PatchEmbed / CBlock LayerNorms use torch's default eps 1e-5 (their
    nn.LayerNorm(dim) ignores norm_layer), ViT-stage norms eps 1e-6."""
    def ln_channels(p, x, eps=1e-5):
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], sd[p + ".weight"], sd[p + ".bias"],
                            eps).permute(0, 3, 1, 2)

    def conv(p, x, stride=1, padding=0, groups=1):
        return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], stride, padding, 1, groups)

    def lin(p, x):
        return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])

    def stage(i, x, patch):
        x = F.gelu(ln_channels(f"patch_embed{i}.norm", conv(f"patch_embed{i}.proj", x, stride=patch)))
        j = 0
        while f"blocks{i}.{j}.conv1.weight" in sd:
            b = f"blocks{i}.{j}"
            x = x + conv(f"{b}.conv2", conv(f"{b}.attn", conv(f"{b}.conv1", ln_channels(f"{b}.norm1", x)),
                                            padding=2, groups=x.shape[1]))
            x = x + conv(f"{b}.mlp.fc2", F.gelu(conv(f"{b}.mlp.fc1", ln_channels(f"{b}.norm2", x))))
            j += 1
        return x

    x = stage(2, stage(1, x, 4), 2)
    x = F.gelu(ln_channels("patch_embed3.norm", conv("patch_embed3.proj", x, stride=2)))
    x = lin("patch_embed4", x.flatten(2).transpose(1, 2)) + sd["pos_embed"]
    d = x.shape[-1]
    j = 0
    while f"blocks3.{j}.norm1.weight" in sd:
        b = f"blocks3.{j}"
        h = F.layer_norm(x, (d,), sd[f"{b}.norm1.weight"], sd[f"{b}.norm1.bias"], 1e-6)
        q, k, v = lin(f"{b}.attn.qkv", h).unflatten(-1, (3, heads, d // heads)).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + lin(f"{b}.attn.proj", a)
        h = F.layer_norm(x, (d,), sd[f"{b}.norm2.weight"], sd[f"{b}.norm2.bias"], 1e-6)
        x = x + lin(f"{b}.mlp.fc2", F.gelu(lin(f"{b}.mlp.fc1", h)))
        j += 1
    if "fc_norm.weight" in sd:  # models_convvit.ConvViT(global_pool=True)
        pooled = F.layer_norm(x.mean(1), (d,), sd["fc_norm.weight"], sd["fc_norm.bias"], 1e-6)
        return pooled, lin("head", pooled)
    return F.layer_norm(x, (d,), sd["norm.weight"], sd["norm.bias"], 1e-6).mean(1), None


@pytest.mark.parametrize("num_classes", [0, 2])
def test_matches_functional_official_forward(num_classes):
    sd = random_sd(seed=4, num_classes=num_classes)
    model = convmae.build("tiny", num_classes=num_classes).eval()
    model.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = model(x)
        emb, logits = official_forward(sd, x)
    torch.testing.assert_close(out["embedding"], emb, atol=1e-4, rtol=1e-4)
    if num_classes:
        torch.testing.assert_close(out["logits"], logits, atol=1e-4, rtol=1e-4)


def test_onnx_export_matches_torch(tmp_path):
    import onnxruntime as ort
    model = convmae.build("tiny", num_classes=2).eval()
    model.load_state_dict(random_sd(seed=5, num_classes=2), strict=True)

    path = tmp_path / "convmae.onnx"
    export_onnx(model, torch.randn(1, 3, 224, 224), path, *spec_io(SPEC, ["embedding", "logits"]))
    x = torch.randn(3, 3, 224, 224)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {SPEC.inputs[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    np.testing.assert_allclose(got[0], expected["embedding"].numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got[1], expected["logits"].numpy(), atol=1e-4, rtol=1e-4)


def test_spec_shares_deblurring_preprocessing():
    assert SPEC.preprocess == deblurring.SPECS[0].preprocess
    assert SPEC.preprocess["blur"]["sigma"] == 1.1 and SPEC.labels == ["class_0", "class_1"]


def test_full_size_parameter_count_and_shapes():
    with torch.device("meta"):
        model = SPEC.build("B")
    assert abs(sum(p.numel() for p in model.parameters()) - 84.6e6) / 84.6e6 < 0.01
    sd = model.state_dict()
    assert sd["pos_embed"].shape == (1, 196, 768) and sd["patch_embed1.proj.weight"].shape == (256, 3, 4, 4)
    assert sd["blocks2.1.attn.weight"].shape == (384, 1, 5, 5) and "blocks3.10.mlp.fc2.weight" in sd
