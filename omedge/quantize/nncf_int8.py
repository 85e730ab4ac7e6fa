"""INT8 for OpenVINO IR with NNCF post-training quantization, plain or accuracy-aware."""
from __future__ import annotations

import logging
import os
import re
import time

from . import WEIGHTS_7BIT

SMOOTHQUANT_MIN = 32  # calibration samples from which SmoothQuant's fitted scales generalise
BUDGET_ENV = "OMEDGE_INT8_BUDGET_S"  # overrides a metric's time budget for accuracy control (seconds)


class AccuracyBudgetExceeded(Exception):
    """Raised from the validation function to stop NNCF's loop when the time budget is spent."""


def output_layers(ov_model) -> list[str]:
    """MatMuls that produce a model output (through a bias Add at most): the classifier
    head, kept in float as onnx_int8 keeps it (a few-class head costs nothing in float)."""
    names = []
    for result in ov_model.get_results():
        node = result.input_value(0).get_node()
        if node.get_type_name() == "Add":
            node = next((v.get_node() for v in node.input_values() if v.get_node().get_type_name() == "MatMul"), None)
        if node is not None and node.get_type_name() == "MatMul":
            names.append(node.get_friendly_name())
    return names


def float_layers(ov_model) -> list[str]:
    """Convolutions / MatMuls whose activation input is not fake-quantized: the layers that
    run in float in the INT8 IR (read from the graph, so the record is what was saved)."""
    from ..exporters.openvino import WEIGHTED_OPS
    return [n.get_friendly_name() for n in ov_model.get_ordered_ops() if n.get_type_name() in WEIGHTED_OPS
            and n.input_value(0).get_node().get_type_name() != "FakeQuantize"]


def quantize_static(ov_model, calib: list[dict], metric=None) -> tuple[object, dict]:
    """calib: feeds {input name: batch-1 array}, one per calibration sample. metric: the
    kind's quantization metric (Kind.quantization_metric); with one, NNCF's accuracy-aware
    quantization keeps the layers that cost the most of it in float.

    NNCF's transformer defaults include SmoothQuant, whose per-layer scales are fitted on
    the calibration set. From a user-sized folder they overfit: fitted on 4 Endo-FM clips
    they gave a held-out cosine of 0.92 (0.9994 without), while the calibration samples
    themselves still agreed to 0.9998. So SmoothQuant runs only from SMOOTHQUANT_MIN samples.
    model_type=TRANSFORMER for conv nets too: on STU-Net-B it lost less Dice (0.89) than
    NNCF's CNN defaults (0.78), as it leaves the residual adds in float.

    Weights of every layer use half the int8 range (NNCF's overflow fix; its default fixes
    the first layer only): on CPUs without VNNI, oneDNN's u8 x s8 pair sums saturate on
    full-range weights. BROW with outlier activations on a Zen 3 (AVX2): cosine 0.983 with
    the default, 0.998 with every layer fixed, which is also what a VNNI CPU computes."""
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        OverflowFix,
    )
    heads = output_layers(ov_model)
    smooth = len(calib) >= SMOOTHQUANT_MIN
    advanced = {"overflow_fix": OverflowFix.ENABLE}
    if not smooth:
        advanced["smooth_quant_alphas"] = AdvancedSmoothQuantParameters(matmul=-1)

    def run(**more):
        params = {**advanced, **more}
        common = dict(model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib),
                      ignored_scope=nncf.IgnoredScope(names=heads, validate=False) if heads else None)
        dataset = nncf.Dataset([dict(feed) for feed in calib])
        if metric is None:
            return nncf.quantize(ov_model, dataset, **common,
                                 advanced_parameters=AdvancedQuantizationParameters(**params))
        return _accuracy_aware(ov_model, dataset, calib, metric, AdvancedQuantizationParameters(**params), common)
    bias = "fast bias correction"
    try:
        q = run()
    except (ValueError, RuntimeError) as e:
        # NNCF 3.x's bias correction fails on some graphs (GLIP's fused scalar biases: "cannot
        # reshape array of size 256 into shape (1,1)"): quantize again without it, and say so
        q = run(disable_bias_correction=True)
        bias = f"no bias correction (NNCF's failed on this graph: {str(e)[:120]})"
    method = (f"NNCF defaults for transformers: SmoothQuant, min/max ranges, {bias}" if smooth else
              f"NNCF for transformers without SmoothQuant (under {SMOOTHQUANT_MIN} samples): min/max ranges, "
              f"{bias}")
    info = {"method": "NNCF post-training quantization (model_type=TRANSFORMER)", "calibration_method": method,
            **WEIGHTS_7BIT, "activations": "int8 per-tensor",
            "calibration_samples": len(calib), "nncf": nncf.__version__}
    if heads:
        info["float_nodes"] = f"the output layer(s) {', '.join(heads)}"
    if metric is not None:
        q, control = q
        info["method"] = "NNCF accuracy-aware post-training quantization (model_type=TRANSFORMER)"
        info["float_layers"] = float_layers(q)
        info["accuracy_control"] = control
    return q, info


def _accuracy_aware(ov_model, dataset, calib, metric, advanced, common) -> tuple[object, dict]:
    """nncf.quantize_with_accuracy_control against `metric` on the first metric.items
    calibration windows, labelled by the float model itself (NNCF validates it first).
    Returns (model, record): the metric of float, plain INT8 and the result (the result
    measured as the bundle runs it), the iterations, and whether the target was reached."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters
    shape = [d.get_length() if d.is_static else None for d in ov_model.inputs[0].get_partial_shape()]
    feeds = metric.validation_feeds(calib, shape)
    items = list(range(len(feeds)))
    refs, values, first = {}, [], []
    budget = float(os.environ.get(BUDGET_ENV) or metric.budget_s)
    start = time.monotonic()

    def validate(compiled, data):
        if time.monotonic() - start > budget:
            raise AccuracyBudgetExceeded
        data = list(data)
        outs = [compiled(feeds[i])[metric.output] for i in data]
        first[:] = first or [compiled]
        if compiled is first[0]:  # NNCF validates the float model first (a probe, then every item): the labels
            refs.update({i: metric.reference(o) for i, o in zip(data, outs) if i not in refs})
        value, per_item = metric.score([refs[i] for i in data], outs)
        if len(data) == len(items):  # a whole evaluation, not the probe or a ranking subset
            values.append(value)
        return value, per_item
    restorer = AdvancedAccuracyRestorerParameters(max_num_iterations=metric.max_iterations,
                                                  ranking_subset_size=min(metric.ranking_items, len(items)),
                                                  num_ranking_workers=1)
    with _CountReverts() as reverts:
        try:
            q = nncf.quantize_with_accuracy_control(
                ov_model, dataset, nncf.Dataset(items), validate, max_drop=metric.max_drop,
                drop_type=nncf.DropType.ABSOLUTE, advanced_quantization_parameters=advanced,
                advanced_accuracy_restorer_parameters=restorer, **common)
        except AccuracyBudgetExceeded:
            from ..errors import ExportError
            raise ExportError(
                f"INT8 accuracy control ran past its {budget:.0f} s budget after {reverts.count} reverted group(s) "
                f"(metric: float {_at(values, 0)}, plain INT8 {_at(values, 1)}, target {1 - metric.max_drop:.3f})",
                f"set {BUDGET_ENV}=SECONDS to allow longer, or export --bf16 / --fp16 (no calibration) "
                "or --int8-dynamic (weights only)") from None
    after, after_f32 = (_score(q, feeds, refs, metric, config) for config in ({}, {"INFERENCE_PRECISION_HINT": "f32"}))
    target = 1.0 - metric.max_drop
    return q, {"metric": metric.name, "max_drop": metric.max_drop, "target": round(target, 6),
               "validation_input": list(next(iter(feeds[0].values())).shape) if feeds else None,
               "float": _at(values, 0), "before": _at(values, 1), "after": after, "after_f32": after_f32,
               "reached": after >= target,
               "iterations": reverts.count, "evaluations": len(values), "validation_windows": len(items),
               "seconds": round(time.monotonic() - start, 1), "budget_s": budget}


def _score(ov_model, feeds, refs, metric, config: dict) -> float:
    """The metric of the returned model. NNCF measures with float layers in f32; the
    bundle runs with OpenVINO's default, bf16 on AMX / AVX512-BF16 CPUs: both are recorded,
    `after` as the bundle runs."""
    import openvino as ov
    compiled = ov.Core().compile_model(ov_model, "CPU", config)
    value = metric.score([refs[i] for i in range(len(feeds))], [compiled(f)[metric.output] for f in feeds])[0]
    return round(float(value), 6)


def _at(values: list, i: int):
    return round(float(values[i]), 6) if len(values) > i else None


class _CountReverts(logging.Handler):
    """Counts NNCF's "Reverted N operations" log lines: one per accuracy-control iteration
    (NNCF returns no report)."""
    PATTERN = re.compile(r"Reverted \d+ operations")

    def __init__(self):
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record):
        self.count += bool(self.PATTERN.search(record.getMessage()))

    def __enter__(self):
        log = logging.getLogger("nncf")
        self._level = log.level
        log.addHandler(self)
        log.setLevel(min(log.level or logging.INFO, logging.INFO))
        return self

    def __exit__(self, *exc):
        log = logging.getLogger("nncf")
        log.removeHandler(self)
        log.setLevel(self._level)


def compress_weights(ov_model) -> tuple[object, dict]:
    import nncf
    q = nncf.compress_weights(ov_model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    return q, {"method": "NNCF weight compression", "weights": "int8 asymmetric per-channel",
               "activations": "float", "nncf": nncf.__version__}
