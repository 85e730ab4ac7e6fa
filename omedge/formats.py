"""The one table of format x precision (stdlib only: both sides read it).

Each `Recipe` says how the artifact is built (a builder name the exporter resolves),
which backends run it and with which options, which gate class its parity check uses
and whether it needs calibration data. Nothing else in omedge knows these rules.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UsageError


@dataclass(frozen=True)
class Recipe:
    format: str
    precision: str
    builder: str                     # resolved by omedge.exporters.builders
    backends: tuple[str, ...]        # in the order `auto` tries them on a CPU
    runtime: dict = field(default_factory=dict)  # backend -> options stored in the manifest
    gate: str = "fp32"               # gate class: fp32 | fp16 | bf16 | int8 | gguf-*
    calibration: bool = False        # needs calibration inputs (static INT8)
    note: str = ""

    @property
    def name(self) -> str:
        return f"{self.format}-{self.precision.lower()}"


_ONNX_BACKENDS = ("onnxruntime", "openvino")
_ONNX_RUNTIME = {"onnxruntime": {}, "openvino": {"inference_precision": "f32"}}
_GGUF = ("llama.cpp",)

RECIPES: dict[tuple[str, str], Recipe] = {(r.format, r.precision): r for r in (
    Recipe("onnx", "fp32", "onnx_fp32", _ONNX_BACKENDS, _ONNX_RUNTIME, "fp32"),
    Recipe("onnx", "fp16", "onnx_fp16", _ONNX_BACKENDS, _ONNX_RUNTIME, "fp16"),
    Recipe("onnx", "int8", "onnx_int8_static", _ONNX_BACKENDS, _ONNX_RUNTIME, "int8", calibration=True),
    Recipe("onnx", "int8-dynamic", "onnx_int8_dynamic", _ONNX_BACKENDS, _ONNX_RUNTIME, "int8"),
    Recipe("openvino", "fp32", "openvino_ir", ("openvino",), {"openvino": {"inference_precision": "f32"}}, "fp32"),
    Recipe("openvino", "fp16", "openvino_ir", ("openvino",), {"openvino": {"inference_precision": "f16"}}, "fp16"),
    Recipe("openvino", "bf16", "openvino_ir", ("openvino",), {"openvino": {"inference_precision": "bf16"}}, "bf16",
           note="bf16 is an OpenVINO execution precision (native on AMX / AVX512-BF16 CPUs)"),
    Recipe("openvino", "int8", "openvino_int8_static", ("openvino",), {"openvino": {}}, "int8", calibration=True),
    Recipe("openvino", "int8-dynamic", "openvino_int8_weights", ("openvino",), {"openvino": {}}, "int8"),
    Recipe("gguf", "F16", "gguf", _GGUF, {"llama.cpp": {}}, "gguf-original"),
    Recipe("gguf", "Q8_0", "gguf", _GGUF, {"llama.cpp": {}}, "gguf-original"),
    *(Recipe("gguf", q, "gguf", _GGUF, {"llama.cpp": {}}, "gguf-dequantized")
      for q in ("Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_0")),
)}

TENSOR_FORMATS = ("onnx", "openvino")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int8-dynamic")
GGUF_TYPES = tuple(p for f, p in RECIPES if f == "gguf")
# The CLI's precision flags for GGUF exports.
GGUF_FOR_FLAG = {"fp32": "F16", "fp16": "F16", "int8": "Q8_0", "int4": "Q4_K_M"}


def recipe(fmt: str, precision: str) -> Recipe:
    """The recipe for (format, precision), or a UsageError saying what exists."""
    if (fmt, precision) in RECIPES:
        return RECIPES[(fmt, precision)]
    formats = sorted({f for f, _ in RECIPES})
    if fmt not in formats:
        raise UsageError(f"unknown format '{fmt}'", f"choose from {', '.join(formats)} (tensorrt: build the "
                         "engine on the target GPU from the ONNX file)")
    offered = [p for f, p in RECIPES if f == fmt]
    hint = f"{fmt} offers {', '.join(offered)}"
    if precision == "bf16" and fmt == "onnx":
        hint = "bf16 is an OpenVINO execution precision; use --format openvino --bf16, or --fp16 for ONNX"
    raise UsageError(f"{fmt} has no precision '{precision}'", hint)


def backends_for(fmt: str) -> tuple[str, ...]:
    """Every backend that runs some artifact of this format, in recipe order."""
    seen: list[str] = []
    for (f, _), r in RECIPES.items():
        if f == fmt:
            seen += [b for b in r.backends if b not in seen]
    return tuple(seen)


def runs_on(fmt: str, precision: str, backend: str) -> bool:
    r = RECIPES.get((fmt, precision))
    return r is not None and backend in r.backends
