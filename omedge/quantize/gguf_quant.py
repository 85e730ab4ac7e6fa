"""GGUF quantization through llama.cpp's own quantizer (llama_cpp.llama_model_quantize)."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from ..errors import BackendUnavailableError, ExportError

QUANTS = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
BITS_PER_WEIGHT = {"F16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69, "Q4_K_M": 4.85, "Q4_0": 4.5}


def llama_cpp():
    try:
        import llama_cpp as lc
    except ImportError as e:
        raise BackendUnavailableError(
            "llama-cpp-python is not installed",
            "pip install 'omedge[llm]' (on CPUs with AMX build it with CMAKE_ARGS=\"-DGGML_NATIVE=OFF\")") from e
    return lc


def quantize(src: Path, dst: Path, quant: str, threads: int | None = None) -> dict:
    if quant not in QUANTS:
        raise ExportError(f"unknown GGUF quantization '{quant}'", f"choose from {', '.join(QUANTS)}")
    lc = llama_cpp()
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{quant}")
    params.nthread = threads or os.cpu_count() or 1
    rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise ExportError(f"llama.cpp's quantizer failed for {quant} (code {rc})")
    return {"method": "llama.cpp llama_model_quantize", "type": quant, "from": "F16",
            "llama_cpp_python": lc.__version__}
