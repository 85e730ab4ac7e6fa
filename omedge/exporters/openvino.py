"""ONNX -> OpenVINO IR (.xml + .bin)."""
from __future__ import annotations

from pathlib import Path

from .. import offline


def convert(onnx_path: Path):
    offline.quiet_openvino()  # also when called without export(): converting sends telemetry
    import openvino as ov
    from ..runtime.backends.ov import deform_conv_extension
    # the extension only names an op type: graphs without DeformConv convert as before
    return ov.convert_model(str(onnx_path), extension=[deform_conv_extension()])


def save_ir(model, xml_path: Path, compress_to_fp16: bool) -> list[Path]:
    offline.quiet_openvino()
    import openvino as ov
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml_path), compress_to_fp16=compress_to_fp16)
    return [xml_path, xml_path.with_suffix(".bin")]
