"""bf16 / fp16 OpenVINO IR: the layers that read the model's inputs stay f32 (the data's
precision), marked in the IR with OpenVINO's own `precise` attribute, and checked to run."""
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

import omedge.models as models
from omedge.exporters import openvino as ox
from omedge.exporters.onnx import export_onnx
from omedge.runtime.backends.ov import native_bf16


@pytest.fixture(scope="module")
def stunet_ir(tmp_path_factory):
    """A tiny STU-Net as converted for the IR recipes, and a 32^3 window."""
    spec = models.get_spec("stu-net")
    torch.manual_seed(0)
    model = models.build(spec, "tiny", num_classes=4).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    path = tmp_path_factory.mktemp("precise") / "model.onnx"
    export_onnx(model, (x,), path, [t.to_dict() for t in spec.inputs], [t.to_dict() for t in spec.outputs])
    return path, x.numpy()


def _precise(xml_path) -> set[str]:
    return {layer.get("name") for layer in ET.parse(xml_path).getroot().iter("layer")
            if any(a.get("name") == "precise" for a in layer.iter("attribute"))}


def test_input_layers_are_the_first_weighted_layers_on_the_input(stunet_ir):
    names = ox.input_layers(ox.convert(stunet_ir[0]))
    stem = [n for n in names if "conv_blocks_context.0.0/conv1/" in n]
    assert stem and any(n.endswith("/WithoutBiases") for n in stem)  # the convolution and its bias Add
    assert all("conv_blocks_context.0/" in n for n in names), names  # nothing past the first block


def test_fp32_ir_has_no_marks_and_bf16_ir_marks_the_stem(stunet_ir, tmp_path):
    model = ox.convert(stunet_ir[0])
    ox.save_ir(model, tmp_path / "fp32.xml", compress_to_fp16=False)
    assert not _precise(tmp_path / "fp32.xml")
    ox.save_ir(ox.convert(stunet_ir[0]), tmp_path / "bf16.xml", compress_to_fp16=True)
    marked = _precise(tmp_path / "bf16.xml")
    assert marked <= set(ox.input_layers(model))
    assert any("conv_blocks_context.0.0/conv1/Conv/WithoutBiases" in n for n in marked)


@pytest.mark.skipif(not native_bf16(), reason="unverified here: this CPU has no native bf16 (AMX / AVX512-BF16)")
def test_bf16_ir_runs_the_stem_in_f32_and_the_rest_in_bf16(stunet_ir, tmp_path):
    from omedge.runtime.backends.ov import core
    ox.save_ir(ox.convert(stunet_ir[0]), tmp_path / "bf16.xml", compress_to_fp16=True)
    compiled = core().compile_model(core().read_model(str(tmp_path / "bf16.xml")), "CPU",
                                    {"INFERENCE_PRECISION_HINT": "bf16"})
    out = compiled.create_infer_request().infer({0: stunet_ir[1]})[0]  # every kept mark runs
    assert np.isfinite(out).all()
    convs = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == "Convolution":
            convs[op.get_friendly_name()] = info["runtimePrecision"].astype(str)
    stem = [p for n, p in convs.items() if "conv_blocks_context.0.0/conv1/" in n]
    assert stem and all(p != "bf16" for p in stem), convs
    assert sum(p == "bf16" for p in convs.values()) >= len(convs) - 2, convs
