"""INT8 for ONNX with onnxruntime's quantizer.

Static: QDQ, per-channel s8 weights, u8 activations (s8 x s8 ran ~50x slower on these
CPUs), and the activation x activation MatMuls of attention (Q.K^T, attn.V) left in
float: their ranges change per input and quantizing them costs accuracy for no speed.

Activation ranges: the 99.999th percentile of each tensor's histogram, not its min/max.
On BROW with fan-in-scaled random weights and a few amplified residual channels (the
outliers trained ViTs have), 9 calibration tiles gave a held-out cosine of 0.986 with
MinMax and 0.992 with this percentile at ViT-B/16 (0.991 -> 0.997 at the tiny size);
without outliers both reach 0.999. NNCF's ONNX backend scored higher (0.998) but emits
s8 activations, which onnxruntime runs far slower on CPUs without VNNI.

Weights use 7 bits of the int8 range (-64..63). Without VNNI (AVX2, AVX-512 before VNNI)
onnxruntime multiplies u8 x s8 with vpmaddubsw, whose 16-bit pair sums saturate on full
8-bit weights: on a Zen 3 (AVX2) the BROW outlier model's 8-bit bundle scored cosine 0.965
where a VNNI CPU computes it exactly (>= 0.995). With 7 bits no pair can saturate, so every
x86 CPU computes what the export verified (0.992 on both).
"""
from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import onnx

from . import WEIGHTS_7BIT
from .diagnose import QUANTIZED_OPS

PERCENTILE = 99.999
DIAGNOSE_LAYERS = 5
CALIB_PASS_BYTES = 2 * 2 ** 30  # calibrated activations held at once (see calibrate)


def _activation_matmuls(model: onnx.ModelProto) -> list[str]:
    weights = {i.name for i in model.graph.initializer}
    produced_by_const = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul"
            and not any(i in weights or i in produced_by_const for i in n.input)]


def _output_layers(model: onnx.ModelProto) -> list[str]:
    """MatMul/Gemm nodes that produce a graph output (through a bias Add at most): the
    classifier head. A few-class head is cheap in float, and quantizing it cost Endo-FM's
    2-class logits most of their agreement (cosine 0.77 from 4 calibration clips)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    found = []
    for out in model.graph.output:
        node = producer.get(out.name)
        if node is not None and node.op_type == "Add":
            node = next((producer[i] for i in node.input if i in producer and producer[i].op_type == "MatMul"), None)
        if node is not None and node.op_type in ("MatMul", "Gemm"):
            found.append(node.name)
    return found


def _reader(samples: list[dict]):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(samples)

        def get_next(self):
            return next(self.items, None)

    return Reader()


def _calibrated_tensors(model: onnx.ModelProto, excluded: list[str]) -> set[str]:
    """The activations the quantizer reads ranges for: inputs and outputs of the nodes it
    quantizes. onnxruntime's calibrator would take those of every node of these op types,
    the excluded attention MatMuls too, whose score matrices (12 x 4096^2 floats, 0.8 GB
    for SAM's global attention) it keeps per sample for its histograms."""
    skip = set(excluded)
    weights = {i.name for i in model.graph.initializer}
    return {t for n in model.graph.node if n.op_type in QUANTIZED_OPS and n.name not in skip
            for t in (*n.input, *n.output) if t and t not in weights}


def calibrate(model_path: Path, calib: list[dict], excluded: list[str], method, work: Path):
    """Activation ranges (onnxruntime's TensorsData) and the samples per pass. Its histogram
    calibrators hold every calibrated tensor of every sample of a pass before they count
    them (SAM's 1024^2 encoder went past 18 GB on 12 images), so a pass takes as many
    samples as fit in CALIB_PASS_BYTES. Small models still take all in one pass: a pass's
    first histogram sets the bin width, so splitting moves the ranges slightly, and the
    gates were set on one pass."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import MinMaxCalibrater, PercentileCalibrater

    from ..exporters.onnx import uses_external_data
    wanted = _calibrated_tensors(onnx.load(str(model_path), load_external_data=False), excluded)
    base, options = ((PercentileCalibrater, {"symmetric": True, "num_bins": 2048, "percentile": PERCENTILE})
                     if method == CalibrationMethod.Percentile else (MinMaxCalibrater, {}))

    def select(self, model):
        tensors, infos = base.select_tensors_to_calibrate(self, model)
        return tensors & wanted, infos

    cls = type(f"Selected{base.__name__}", (base,), {"select_tensors_to_calibrate": select})
    calibrator = cls(str(model_path), list(QUANTIZED_OPS), augmented_model_path=str(work / "augmented.onnx"),
                     use_external_data_format=uses_external_data(model_path), **options)
    calibrator.augment_graph()
    calibrator.create_inference_session()
    # what one sample's calibrated outputs take, measured (shape inference leaves sizes unknown)
    per_sample = sum(o.nbytes for o in calibrator.infer_session.run(None, calib[0]))
    per_pass = min(len(calib), max(1, CALIB_PASS_BYTES // max(1, per_sample)))
    for start in range(0, len(calib), per_pass):
        calibrator.collect_data(_reader(calib[start:start + per_pass]))
    return calibrator.compute_data(), per_pass


def quantize_static(src: Path, dst: Path, calib: list[dict]) -> dict:
    """calib: feeds {input name: batch-1 array}, one per calibration sample."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as qs
    from onnxruntime.quantization.calibrate import save_tensors_data
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ..exporters.onnx import uses_external_data
    from .diagnose import layer_losses
    large = uses_external_data(src)  # > 2 GB: every intermediate keeps its weights beside it
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, save_as_external_data=large,
                          all_tensors_to_one_file=True, external_data_location="pre.onnx.data")
        graph = onnx.load(str(pre), load_external_data=False)
        heads = _output_layers(graph)
        excluded = _activation_matmuls(graph) + heads
        # onnxruntime's histogram calibrators stack samples, so inputs of varying length
        # (protein sequences) are calibrated by their min/max instead
        same_shape = len({tuple(a.shape) for feed in calib for a in feed.values()}) <= len(calib[0])
        method, method_name = ((CalibrationMethod.Percentile, f"percentile {PERCENTILE}") if same_shape
                               else (CalibrationMethod.MinMax, "minmax (calibration inputs of varying shape)"))
        ranges = Path(tmp) / "ranges.json"
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrator prints its ranges
            tensors_range, per_pass = calibrate(pre, calib, excluded, method, Path(tmp))
            save_tensors_data(tensors_range, ranges)
            qs(str(pre), str(dst), None, calibration_cache_path=str(ranges), quant_format=QuantFormat.QDQ,
               per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
               op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_exclude=excluded,
               calibrate_method=method, use_external_data_format=large, reduce_range=True)
        # per-layer loss on one calibration sample, named if the gate fails (not past 2 GB:
        # exposing outputs would rewrite the weights file)
        worst = [] if large else layer_losses(pre, dst, calib[0], DIAGNOSE_LAYERS)
    info = {"method": "onnxruntime static QDQ", "calibration_method": method_name,
            "activations": "uint8 per-tensor (range: " + (f"{PERCENTILE}th percentile of the calibration histogram)"
                                                          if same_shape else "min/max over the calibration inputs)"),
            **WEIGHTS_7BIT, "calibration_samples": len(calib),
            "calibration_passes": -(-len(calib) // per_pass),
            "float_nodes": f"{len(excluded) - len(heads)} activation x activation MatMuls"
                           + (f", the output layer(s) {', '.join(heads)}" if heads else "")}
    if worst:
        info["worst_layers"] = worst
        info["worst_layers_measured_on"] = "calibration sample 1: cosine (fp32 vs INT8) of each quantized node's input and output"
    return info


def quantize_dynamic(src: Path, dst: Path) -> dict:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as qd

    from ..exporters.onnx import uses_external_data
    qd(str(src), str(dst), per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
       op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=uses_external_data(src))
    return {"method": "onnxruntime dynamic", **WEIGHTS_7BIT,
            "activations": "uint8, range computed per batch at run time"}
