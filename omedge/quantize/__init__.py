"""Quantizers: onnxruntime's QDQ quantizer for ONNX, NNCF for OpenVINO IR."""
