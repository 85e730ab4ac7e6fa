"""ConvMAE's export graph (issue #16): the conv stages' channel LayerNorm is computed along
axis 1, so the exported graph has no Transposes there and OpenVINO runs those stages in
its channels-last layout with no copies; the function stays the official one."""
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from omedge import models
from omedge.exporters.onnx import export_onnx
from omedge.models import convmae
from tests.conftest import spec_io
from tests.models.test_convmae import official_forward, random_sd

SPEC = convmae.SPECS[0]
CONV_STAGES = ("patch_embed1", "patch_embed2", "blocks1.", "blocks2.")


@pytest.mark.parametrize("shape", [(2, 32, 56, 56), (1, 48, 7, 9)])
def test_channel_norm_is_the_official_permuted_layer_norm(shape):
    gen = torch.Generator().manual_seed(shape[1])
    norm = torch.nn.LayerNorm(shape[1])
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[1], generator=gen) * 0.3 + 1)
        norm.bias.copy_(torch.randn(shape[1], generator=gen) * 0.3)
    x = torch.randn(*shape, generator=gen) * 4 + 2  # off-centre, wide: the variance term matters
    official = F.layer_norm(x.permute(0, 2, 3, 1), (shape[1],), norm.weight, norm.bias, 1e-5).permute(0, 3, 1, 2)
    torch.testing.assert_close(convmae.channel_norm(norm, x), official, atol=2e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    model = convmae.build("tiny", num_classes=2).eval()
    sd = random_sd(seed=7, num_classes=2)
    model.load_state_dict(sd, strict=True)
    path = tmp_path_factory.mktemp("convmae") / "convmae.onnx"
    export_onnx(model, torch.randn(1, 3, 224, 224), path, *spec_io(SPEC, ["embedding", "logits"]))
    return path, sd


def test_exported_conv_stages_have_no_transposes(tiny_onnx):
    import onnx
    graph = onnx.load(str(tiny_onnx[0])).graph
    in_conv = [n for n in graph.node if any(s in n.name for s in CONV_STAGES)]
    assert sum(n.op_type == "Conv" for n in in_conv) == 2 * 5 + 2  # tiny: one 5-conv block per stage + 2 embeddings
    assert [n.name for n in in_conv if n.op_type == "Transpose"] == []


def test_openvino_runs_the_conv_stages_without_copies_and_matches(tiny_onnx):
    """Compiled for this CPU: no Transpose left in the conv stages, at most the one layout
    Reorder of the input, and the official forward's outputs."""
    import openvino as ov
    path, sd = tiny_onnx
    compiled = ov.Core().compile_model(ov.convert_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    ops = [(n.get_friendly_name(), n.get_rt_info()["layerType"].astype(str))
           for n in compiled.get_runtime_model().get_ops()]
    conv_stage = [(name, kind) for name, kind in ops if any(s in name for s in CONV_STAGES)]
    assert sum(kind == "Convolution" for _, kind in conv_stage) >= 2 * 5 + 2
    assert [name for name, kind in conv_stage if kind == "Transpose"] == []
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    got = compiled({SPEC.inputs[0].name: x.numpy()})
    emb, logits = official_forward(sd, x)
    np.testing.assert_allclose(got["embedding"], emb.numpy(), atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(got["logits"], logits.numpy(), atol=2e-4, rtol=1e-4)


def test_parameter_names_unchanged():
    """The official checkpoints' keys: the norms are still nn.LayerNorm modules."""
    sd = models.build(SPEC, "tiny").state_dict()
    assert {"blocks1.0.norm1.weight", "blocks1.0.norm1.bias", "patch_embed2.norm.weight", "blocks2.0.norm2.bias",
            "blocks1.0.attn.weight", "blocks1.0.conv1.weight"} <= set(sd)
    assert isinstance(convmae.build("tiny").blocks1[0].norm1, torch.nn.LayerNorm)
