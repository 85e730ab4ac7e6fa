"""The backend protocol. One module per library, and only that module imports it.

A tensor backend: `open(files, device, options)`, the declared `inputs`/`outputs` read
back from the session, `max_batch`, `run(dict) -> dict`, `describe()`. A text backend
(llama.cpp) adds tokenize / detokenize / logits / generate.
"""
from __future__ import annotations

import importlib
from typing import Iterator

BACKEND_MODULES = {"onnxruntime": "omedge.runtime.backends.ort", "openvino": "omedge.runtime.backends.ov",
                   "llama.cpp": "omedge.runtime.backends.llama"}
LIBRARIES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "llama.cpp": "llama_cpp"}
INSTALL_HINT = {"onnxruntime": "pip install omedge (onnxruntime is a core dependency)",
                "openvino": "pip install 'omedge[openvino]'",
                "llama.cpp": "pip install 'omedge[llm]' (see the README for the CPU-dispatch build)"}
TEXT_BACKENDS = ("llama.cpp",)


class Backend:
    name = "?"
    inputs: list[str] = []       # graph input names, read back from the session
    outputs: list[str] = []      # graph output names, read back from the session
    max_batch: int | None = None  # None: any batch size

    @staticmethod
    def probe() -> dict:
        """{'installed': True, 'version': str, 'devices': {device: reason-or-None}}"""
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


class TextBackend(Backend):
    """A GGUF language model: token ids in, logits or sampled tokens out."""

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        raise NotImplementedError

    def detokenize(self, ids: list[int]) -> bytes:
        raise NotImplementedError

    def eos(self) -> int:
        raise NotImplementedError

    def logits(self, ids: list[int]) -> "object":
        """(len(ids), vocab) float32 logits of one sequence, from a fresh context."""
        raise NotImplementedError

    def generate(self, ids: list[int], sampling: dict) -> Iterator[int]:
        raise NotImplementedError


def backend_class(name: str) -> type[Backend]:
    if name not in BACKEND_MODULES:
        from ...errors import UsageError
        raise UsageError(f"unknown backend '{name}'", f"choose from {', '.join(BACKEND_MODULES)}")
    return importlib.import_module(BACKEND_MODULES[name]).BACKEND


def probe(name: str) -> dict:
    """Whether `name` imports here and which devices it can use (reason when not).
    Only ImportError means "not installed": an interrupt or a crash propagates."""
    try:
        cls = backend_class(name)
        importlib.import_module(LIBRARIES[name])
    except ImportError as e:
        return {"installed": False, "reason": f"not installed ({e.name or e})", "hint": INSTALL_HINT[name],
                "devices": {}}
    return cls.probe()
