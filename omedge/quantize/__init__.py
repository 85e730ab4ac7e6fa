"""Quantizers: onnxruntime's QDQ quantizer for ONNX, NNCF for OpenVINO IR."""

# Every INT8 recipe writes 7-bit weights: exact on CPUs without VNNI (onnx_int8's docstring says why)
WEIGHTS_7BIT = {"weights": "int8 per-channel, 7-bit range (exact on CPUs without VNNI)", "weight_range": "7-bit"}
