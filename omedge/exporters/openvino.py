"""ONNX -> OpenVINO IR (.xml + .bin)."""
from __future__ import annotations

from pathlib import Path

from .. import offline

# From a model input through these to the first layer with weights: that layer reads the data itself
_PASS_THROUGH = {"Convert", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Add", "Subtract", "Multiply",
                 "Divide", "Pad", "Concat", "Gather", "Broadcast"}
# Layers with weights (one list for the bf16 marks here and NNCF's float-layer record)
WEIGHTED_OPS = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData",
                "MatMul")


def convert(onnx_path: Path):
    offline.quiet_openvino()  # also when called without export(): converting sends telemetry
    import openvino as ov
    from ..runtime.backends.ov import deform_conv_extension
    # the extension only names an op type: graphs without DeformConv convert as before
    return ov.convert_model(str(onnx_path), extension=[deform_conv_extension()])


def save_ir(model, xml_path: Path, compress_to_fp16: bool) -> list[Path]:
    """compress_to_fp16 (the fp16 / bf16 recipes): the layers that read the model's inputs
    are also marked to run in f32 (`input_layers`, `keep_f32`)."""
    offline.quiet_openvino()
    import openvino as ov
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    precise = input_layers(model) if compress_to_fp16 else []
    ov.save_model(model, str(xml_path), compress_to_fp16=compress_to_fp16)
    if precise:
        keep_f32(xml_path, precise)
    return [xml_path, xml_path.with_suffix(".bin")]


def keep_f32(xml_path: Path, names: list[str]) -> list[str]:
    """Mark `names` f32 in the IR. Where this CPU runs bf16, the IR is run once (zeros,
    every dynamic size 32) with bf16, and a layer the plugin cannot run in f32 between bf16
    neighbours is unmarked (OpenVINO 2026.4: STU-Net's 1x1 residual convolution on the
    input fails at the first inference, "object is not initialized"); any other failure
    drops every mark, leaving the plain bf16 IR. Without native bf16 the marks stay
    unchecked: such a machine cannot verify a bf16 artifact. Returns the names kept."""
    import re

    from ..runtime.backends.ov import native_bf16
    kept = list(names)
    original = xml_path.read_bytes()
    while kept:
        xml_path.write_bytes(original)
        mark_precise(xml_path, kept)
        if not native_bf16():
            break
        failure = _bf16_failure(xml_path)
        if failure is None:
            break
        bad = re.search(r"name '([^']+)'", failure)
        drop = bad.group(1) if bad and bad.group(1) in kept else None
        kept = [n for n in kept if drop is not None and n != drop and not _bias_of(n, drop)]
    if not kept:
        xml_path.write_bytes(original)
    return kept


def _bf16_failure(xml_path: Path) -> str | None:
    """The error of one bf16 inference of the IR on zeros, or None."""
    import numpy as np

    from ..runtime.backends.ov import core
    try:
        compiled = core().compile_model(core().read_model(str(xml_path)), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
        feeds = {}
        for port in compiled.inputs:
            shape = [d.get_length() if d.is_static else 32 for d in port.get_partial_shape()]
            feeds[port.get_any_name()] = np.zeros(shape, port.get_element_type().to_dtype())
        compiled.create_infer_request().infer(feeds)
    except Exception as e:  # noqa: BLE001 - any failure: the caller unmarks or drops the marks
        return str(e)
    return None


def _bias_of(name: str, conv: str) -> bool:
    """ONNX convolutions with a bias convert to `X/WithoutBiases` + the Add `X`."""
    return conv.endswith("/WithoutBiases") and name == conv[: -len("/WithoutBiases")]


def input_layers(model) -> list[str]:
    """The first layer with weights (and its bias Add) on every path from a model input.

    bf16 keeps 8 bits of mantissa: rounding a z-scored CT to it before STU-Net's first
    convolution flipped 3.4% of a 128^3 window's labels (1.7% with only that convolution in
    f32, which costs ~0.4% of the network's work; keeping the InstanceNorms or the head in
    f32 changed nothing). Deeper activations are features; the input is the measurement."""
    found: list[str] = []
    seen: set[str] = set()
    todo = [p.output(0) for p in model.get_parameters()]
    while todo:
        for target in todo.pop().get_target_inputs():
            node = target.get_node()
            name, kind = node.get_friendly_name(), node.get_type_name()
            if name in seen:
                continue
            seen.add(name)
            if kind in WEIGHTED_OPS and _has_weights(node):
                found.append(name)
                found += [a.get_friendly_name() for a in _bias_adds(node)]
            elif kind in _PASS_THROUGH:
                todo += list(node.outputs())
    return found


def _has_weights(node) -> bool:
    """The second operand is the model's own constant (SAM's cached image projections meet
    prompt-made matrices in MatMuls too: features, not the measurement, are rounded there)."""
    src = node.input_value(1).get_node()
    while src.get_type_name() in ("Convert", "Reshape", "Transpose", "Unsqueeze"):
        src = src.input_value(0).get_node()
    return src.get_type_name() == "Constant"


def _bias_adds(node) -> list:
    users = [t.get_node() for t in node.output(0).get_target_inputs()]
    users = [u for u in users if u.get_type_name() != "ShapeOf"]  # a dynamic bias reads the shape
    return [u for u in users if u.get_type_name() == "Add" and len(users) == 1]


def mark_precise(xml_path: Path, names: list[str]) -> None:
    """Give the named layers OpenVINO's `precise` attribute in the IR (what its own
    serializer writes for nodes kept out of fp16 compression): the CPU plugin then runs
    them in f32 under a bf16 / f16 inference precision. Python has no binding that sets it
    on a live model, so it is added to the saved XML."""
    import xml.etree.ElementTree as ET
    tree = ET.parse(xml_path)
    wanted = set(names)
    for layer in tree.getroot().iter("layer"):
        if layer.get("name") in wanted:
            info = layer.find("rt_info")
            if info is None:
                info = ET.SubElement(layer, "rt_info")
            if not any(a.get("name") == "precise" for a in info.iter("attribute")):
                ET.SubElement(info, "attribute", {"name": "precise", "version": "0"})
    tree.write(xml_path, encoding="utf-8", xml_declaration=True)
