"""The backend interface: open(files, device, options); run(arrays) -> arrays;
describe() -> what really runs. Everything else lives once in the Predictor."""
from __future__ import annotations

import importlib

# format -> backends able to run it, in the order `auto` tries them on a CPU
FORMAT_BACKENDS = {"onnx": ("onnxruntime", "openvino"), "openvino": ("openvino",), "gguf": ("llama.cpp",)}
BACKEND_MODULES = {"onnxruntime": "omedge.runtime.ort", "openvino": "omedge.runtime.ov",
                   "llama.cpp": "omedge.runtime.llama"}
INSTALL_HINT = {"onnxruntime": "pip install omedge (onnxruntime is a core dependency)",
                "openvino": "pip install 'omedge[openvino]'",
                "llama.cpp": "pip install 'omedge[llm]' (build with CMAKE_ARGS=\"-DGGML_NATIVE=OFF\")"}


class Backend:
    name = "?"
    devices: tuple[str, ...] = ()   # omedge device names this backend can target

    @staticmethod
    def probe() -> dict:
        """{'installed': bool, 'version': str, 'devices': {device: reason-or-None}}"""
        raise NotImplementedError

    def __init__(self, files: dict, device: str, options: dict):
        raise NotImplementedError

    def run(self, inputs: dict) -> dict:
        raise NotImplementedError

    def run_many(self, chunks: list[dict]) -> list[dict]:
        """Several requests; a backend that can keep them in flight together overrides this."""
        return [self.run(c) for c in chunks]

    def describe(self) -> dict:
        raise NotImplementedError


def backend_class(name: str) -> type[Backend]:
    return importlib.import_module(BACKEND_MODULES[name]).BACKEND


def probe(name: str) -> dict:
    """Whether `name` imports here and which devices it can use (reason when not)."""
    try:
        cls = backend_class(name)
        if name == "llama.cpp":
            import llama_cpp  # noqa: F401  (the backend module imports it lazily)
    except ImportError as e:
        return {"installed": False, "reason": f"not installed ({e.name or e})", "hint": INSTALL_HINT[name],
                "devices": {}}
    return cls.probe()
