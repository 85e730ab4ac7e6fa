"""Endo-FM: official checkpoint layouts load strictly; the divided space-time forward
matches an independent implementation (transformers.TimesformerModel)."""
import argparse

import numpy as np
import pytest
import torch

from omedge import models
from omedge.errors import CheckpointError, InputError
from omedge.exporters.onnx import export_onnx
from omedge.models import endofm
from tests.conftest import spec_io

SPEC = endofm.SPECS[0]
CLIP = (1, 3, 8, 224, 224)


def backbone_sd(seed=0, **options) -> dict:
    """Tiny backbone weights with every tensor random, temporal_fc and time_embed included
    (both start at zero in the original, which would hide ordering bugs)."""
    sd = models.build(SPEC, "tiny", seed=seed, **options).state_dict()
    gen = torch.Generator().manual_seed(seed + 100)
    return {k: torch.randn(v.shape, generator=gen) * 0.05 + (1.0 if "norm" in k and k.endswith(".weight") else 0.0)
            for k, v in sd.items()}


def dino_dict(teacher_sd, student_sd) -> dict:
    """`endo_fm.pth`: DINO training dict with a weight-normalised projection head."""
    def head(prefix):
        return {f"{prefix}head.mlp.0.weight": torch.randn(32, 64), f"{prefix}head.mlp.0.bias": torch.zeros(32),
                f"{prefix}head.last_layer.weight_g": torch.ones(256, 1),
                f"{prefix}head.last_layer.weight_v": torch.randn(256, 32)}
    teacher = {f"backbone.{k}": v for k, v in teacher_sd.items()} | head("")
    student = {f"module.backbone.{k}": v for k, v in student_sd.items()} | head("module.")
    return {"student": student, "teacher": teacher,
            "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "params": [0, 1]}]}, "epoch": 30,
            "args": argparse.Namespace(arch="vit_base", out_dim=256, momentum_teacher=0.996),
            "dino_loss": {"center": torch.zeros(1, 256)}}


def polypdiag_dict(backbone, linear_w, linear_b) -> dict:
    """`polypdiag.pth`: eval_finetune.py's save_dict (DDP-wrapped, hence module.)."""
    return {"epoch": 12, "state_dict": {"module.linear.weight": linear_w, "module.linear.bias": linear_b},
            "backbone_state_dict": {f"module.{k}": v for k, v in backbone.items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
            "scheduler": {"T_max": 20, "last_epoch": 11}, "best_f1": 0.9}


def test_dino_dict_loads_teacher_backbone_strictly(tmp_path):
    teacher, student = backbone_sd(seed=1), backbone_sd(seed=2)
    torch.save(dino_dict(teacher, student), tmp_path / "endo_fm.pth")
    model, variant, options = models.load(SPEC, tmp_path / "endo_fm.pth")
    assert (variant, options, model.head) == ("tiny", {}, None)
    for key in ("time_embed", "blocks.1.temporal_fc.weight", "norm.bias"):
        assert torch.equal(model.state_dict()[key], teacher[key])
    assert model(torch.zeros(CLIP))["embedding"].shape == (1, 64)


def test_polypdiag_dict_gets_linear_head(tmp_path):
    backbone = backbone_sd(seed=3)
    w, b = torch.randn(2, 64), torch.randn(2)
    torch.save(polypdiag_dict(backbone, w, b), tmp_path / "polypdiag.pth")
    model, _, options = models.load(SPEC, tmp_path / "polypdiag.pth")
    assert options == {"num_classes": 2}
    with torch.no_grad():
        out = model(torch.randn(2, *CLIP[1:]))
    assert out["logits"].shape == (2, 2)
    torch.testing.assert_close(out["logits"], out["embedding"] @ w.T + b)


def test_wrong_model_and_missing_keys_fail_clearly(tmp_path):
    from omedge.models import convmae
    torch.save({"model": models.build(convmae.SPECS[0], "tiny").state_dict()}, tmp_path / "convmae.pth")
    with pytest.raises(CheckpointError, match="no time_embed"):
        models.load(SPEC, tmp_path / "convmae.pth")
    sd = backbone_sd()
    del sd["blocks.0.temporal_fc.weight"]
    torch.save(dino_dict(sd, sd), tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="missing keys.*blocks.0.temporal_fc.weight"):
        models.load(SPEC, tmp_path / "partial.pth")


def test_wrong_frame_count_is_refused():
    model = models.build(SPEC, "tiny")
    with pytest.raises(InputError, match="8-frame clips, got 4"):
        model(torch.zeros(1, 3, 4, 224, 224))


def _hf_reference(sd, frames=8):
    """transformers' TimeSformer with our weights, via the MODELS.md rename table."""
    from transformers import TimesformerConfig, TimesformerModel
    config = TimesformerConfig(image_size=224, patch_size=16, num_channels=3, num_frames=frames, hidden_size=64,
                               num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                               hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
                               attention_type="divided_space_time", hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0, drop_path_rate=0)
    renames = [("cls_token", "embeddings.cls_token"), ("pos_embed", "embeddings.position_embeddings"),
               ("time_embed", "embeddings.time_embeddings"),
               ("patch_embed.proj", "embeddings.patch_embeddings.projection"), ("blocks.", "encoder.layer."),
               ("temporal_norm1", "temporal_layernorm"),
               ("temporal_attn.qkv", "temporal_attention.attention.qkv"),
               ("temporal_attn.proj", "temporal_attention.output.dense"), ("temporal_fc", "temporal_dense"),
               ("norm1", "layernorm_before"), ("attn.qkv", "attention.attention.qkv"),
               ("attn.proj", "attention.output.dense"), ("norm2", "layernorm_after"),
               ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"), ("norm.", "layernorm.")]

    def rename(key):
        for old, new in renames:
            if key.startswith(old) or f".{old}" in key:
                key = key.replace(old, new, 1)
        return key

    hf = TimesformerModel(config).eval()
    hf.load_state_dict({rename(k): v for k, v in sd.items()}, strict=True)
    return hf


def test_matches_transformers_timesformer():
    sd = backbone_sd(seed=4)
    ours = endofm.build("tiny").eval()
    ours.load_state_dict(sd, strict=True)
    hf = _hf_reference(sd)
    video = torch.randn(2, *CLIP[1:])
    with torch.no_grad():
        expected = hf(video.transpose(1, 2)).last_hidden_state[:, 0]  # HF takes (B, T, C, H, W)
        got = ours(video)["embedding"]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_four_frames_from_eight_frame_checkpoint(tmp_path):
    """num_frames=4 loads the 8-row time table strictly and uses rows 0,2,4,6, as the
    official (and HF) forward's nearest interpolation does."""
    sd = backbone_sd(seed=5)
    raw = dino_dict(sd, sd)
    weights, options = SPEC.remap(raw)
    assert options == {}
    model = SPEC.build("tiny", **options, num_frames=4).eval()
    model.load_state_dict(weights, strict=True)
    assert model.time_index.tolist() == [0, 2, 4, 6]

    hf = _hf_reference(sd, frames=8)
    hf.config.num_frames = 4  # layers read the clip length from the config; the table stays 8 rows
    video = torch.randn(1, 3, 4, 224, 224)
    with torch.no_grad():
        expected = hf(video.transpose(1, 2)).last_hidden_state[:, 0]
        got = model(video)["embedding"]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_onnx_export_matches_torch(tmp_path):
    import onnxruntime as ort
    sd = backbone_sd(seed=6)
    sd["head.weight"], sd["head.bias"] = torch.randn(2, 64), torch.randn(2)
    model = endofm.build("tiny", num_classes=2).eval()
    model.load_state_dict(sd, strict=True)

    video = torch.randn(CLIP)
    path = tmp_path / "endofm.onnx"
    export_onnx(model, video, path, *spec_io(SPEC, ["embedding", "logits"]))
    batch = torch.randn(2, *CLIP[1:])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {SPEC.inputs[0].name: batch.numpy()})
    with torch.no_grad():
        expected = model(batch)
    np.testing.assert_allclose(got[0], expected["embedding"].numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got[1], expected["logits"].numpy(), atol=1e-4, rtol=1e-4)


def test_full_size_parameter_count():
    with torch.device("meta"):
        model = SPEC.build("B")
    assert abs(sum(p.numel() for p in model.parameters()) - 121.3e6) / 121.3e6 < 0.01
    assert model.time_embed.shape == (1, 8, 768) and model.pos_embed.shape == (1, 197, 768)


def test_wrong_clip_size_is_refused():
    model = models.build(SPEC, "tiny")
    with pytest.raises(InputError, match=r"\(batch, 3, 8, 224, 224\) clips, got \(1, 3, 8, 112, 112\)"):
        model(torch.zeros(1, 3, 8, 112, 112))


def test_last_block_cls_only_equals_full_block():
    """The last block computes only what CLS needs; CLS must come out as from the full block."""
    model = endofm.build("tiny").eval()
    model.load_state_dict(backbone_sd(seed=7), strict=True)
    block, t, n = model.blocks[-1], model.num_frames, model.tokens
    cls, patches = torch.randn(2, 1, 64), torch.randn(2 * t, n, 64)
    with torch.no_grad():
        full_cls, full_patches = block(cls, patches, t, n)
        got_cls, got_patches = block(cls, patches, t, n, cls_only=True)
    assert got_patches is None and full_patches.shape == patches.shape
    torch.testing.assert_close(got_cls, full_cls, atol=1e-5, rtol=1e-5)


def test_exported_graph_is_static_apart_from_batch(tmp_path):
    """Issue #16: sizes read off the input became Shape -> Gather -> Concat chains (153 Shape
    nodes at full size) and a 6-D qkv reshape + permute kept OpenVINO from fusing the attention
    (INT8 1.6x slower). Every Reshape target is now a constant and no tensor passes rank 5."""
    import onnx
    model = endofm.build("tiny", num_classes=2).eval()
    path = tmp_path / "endofm.onnx"
    export_onnx(model, torch.randn(CLIP), path, *spec_io(SPEC, ["embedding", "logits"]))
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    reshapes = [n for n in graph.node if n.op_type == "Reshape"]
    assert reshapes and all(n.input[1] in constants for n in reshapes)
    assert sum(n.op_type == "Shape" for n in graph.node) <= 2  # the batch, for the CLS token's expand
    assert max(len(v.type.tensor_type.shape.dim) for v in graph.value_info) <= 5
