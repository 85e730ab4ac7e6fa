"""INT8 for ONNX with onnxruntime's quantizer.

Static: QDQ, per-channel s8 weights, u8 activations (s8 x s8 ran ~50x slower on these
CPUs), and the activation x activation MatMuls of attention (Q.K^T, attn.V) left in
float: their ranges change per input and quantizing them costs accuracy for no speed.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import onnx


def _activation_matmuls(model: onnx.ModelProto) -> list[str]:
    weights = {i.name for i in model.graph.initializer}
    produced_by_const = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul"
            and not any(i in weights or i in produced_by_const for i in n.input)]


def _reader(samples: list[dict]):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(samples)

        def get_next(self):
            return next(self.items, None)

    return Reader()


def quantize_static(src: Path, dst: Path, calib: list[dict]) -> dict:
    """calib: feeds {input name: batch-1 array}, one per calibration sample."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static as qs
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from ..exporters.onnx import uses_external_data
    large = uses_external_data(src)  # > 2 GB: every intermediate keeps its weights beside it
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, save_as_external_data=large,
                          all_tensors_to_one_file=True, external_data_location="pre.onnx.data")
        excluded = _activation_matmuls(onnx.load(str(pre), load_external_data=False))
        qs(str(pre), str(dst), _reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
           activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
           op_types_to_quantize=["MatMul", "Gemm", "Conv"], nodes_to_exclude=excluded,
           calibrate_method=CalibrationMethod.MinMax, use_external_data_format=large)
    return {"method": "onnxruntime static QDQ", "activations": "uint8 per-tensor (MinMax)",
            "weights": "int8 per-channel", "calibration_samples": int(len(calib)),
            "float_nodes": f"{len(excluded)} activation x activation MatMuls"}


def quantize_dynamic(src: Path, dst: Path) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic as qd
    from ..exporters.onnx import uses_external_data
    qd(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
       use_external_data_format=uses_external_data(src))
    return {"method": "onnxruntime dynamic", "weights": "int8 per-channel",
            "activations": "uint8, range computed per batch at run time"}
