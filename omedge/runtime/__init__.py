"""Run side: numpy + one backend. Never imports torch."""
from __future__ import annotations


def load(bundle, device: str = "auto", backend: str = "auto", threads: int | None = None,
         artifact: str | None = None, mode: str = "latency"):
    """Open a bundle (hashes checked first) on the best usable backend/device.

    mode: "latency" answers one request as fast as possible; "throughput" keeps
    several requests in flight (OpenVINO streams) for tile batches and streams."""
    from ..bundle import read_manifest
    if read_manifest(bundle)["model"]["task"] == "text-generation":
        from .llm import LLMPredictor  # GGUF on llama.cpp
        return LLMPredictor(bundle, device=device, threads=threads)
    from .predictor import Predictor
    return Predictor(bundle, device=device, backend=backend, threads=threads, artifact=artifact, mode=mode)
