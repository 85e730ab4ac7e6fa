"""llama.cpp backend (llama-cpp-python) for GGUF bundles: CPU threads, and GPU offload
when the installed build has it and a GPU is present."""
from __future__ import annotations

import os
import re
from collections.abc import Iterator

import numpy as np

from ...errors import BackendUnavailableError
from . import TextBackend
from .llama_cpu import cpu_variants, in_use, load_cpu_backend

DISPATCH_ARGS = "-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON"
INSTALL = f"pip install 'omedge[llm]' with CMAKE_ARGS=\"{DISPATCH_ARGS}\" (see README)"


def system_info() -> str:
    import llama_cpp
    info = llama_cpp.llama_print_system_info()
    return info.decode() if isinstance(info, bytes) else str(info)


def kernel_isa() -> str:
    """The widest instruction sets of the loaded CPU kernels, from llama.cpp's own system
    info (e.g. 'AVX2+AVX+SSE3' for a GGML_NATIVE=OFF static build)."""
    order = ("AMX_INT8", "AVX512_BF16", "AVX512_VNNI", "AVX512", "AVX_VNNI", "AVX2", "AVX", "SSE3")
    have = [f for f in order if re.search(rf"\b{f} = 1", system_info())]
    return "+".join(have[:3]) or "baseline"


def cpu_variant_in_use() -> str:
    """The dispatch variant in use (or what a first load tries), or the static build's ISA."""
    name = in_use()
    return f"static build ({kernel_isa()})" if name == "static build" else name


def amx_risk() -> str | None:
    """A build compiled natively on a CPU that advertises AMX dies with SIGILL on the
    first quantized matmul in VMs that do not enable AMX; say so before it happens. A
    dispatch build checks the CPU itself when it loads a variant."""
    if cpu_variants():
        return None
    info = system_info()
    if "AMX_INT8 = 1" in info or "AMX = 1" in info:
        return ("this llama.cpp build uses AMX instructions (a native build); where the OS/VM does not enable "
                f"AMX it crashes with SIGILL. Rebuild: CMAKE_ARGS=\"{DISPATCH_ARGS}\" pip install --force-reinstall "
                "--no-cache-dir llama-cpp-python")
    return None


def isa_gap() -> str | None:
    """A static build compiled for less than this CPU has (AVX2 kernels on AVX-512):
    prompt processing runs about 30% slower than it could; say how to fix it."""
    from ...devices import cpu_info
    if cpu_variants() or "AVX512" in kernel_isa() or "AVX-512" not in cpu_info().get("isa", []):
        return None
    return (f"this llama.cpp build has {kernel_isa()} kernels only, on a CPU with AVX-512: rebuild it with runtime "
            f"CPU dispatch: CMAKE_ARGS=\"{DISPATCH_ARGS}\" pip install --force-reinstall --no-cache-dir "
            "llama-cpp-python")


class LlamaCppBackend(TextBackend):
    """The only place that constructs `llama_cpp.Llama`."""
    name = "llama.cpp"

    @staticmethod
    def probe() -> dict:
        import llama_cpp

        from ...devices import nvidia_gpus
        offload = bool(llama_cpp.llama_supports_gpu_offload())
        cuda = None
        if not offload:
            cuda = "this llama-cpp-python build has no GPU offload (rebuild with CMAKE_ARGS=\"-DGGML_CUDA=on\")"
        elif not nvidia_gpus():
            cuda = "GPU offload built in, but no NVIDIA GPU/driver found"
        variants = cpu_variants()
        return {"installed": True, "version": llama_cpp.__version__, "gpu_offload": offload,
                "cpu_dispatch": variants or None, "cpu_variant": cpu_variant_in_use(), "kernel_isa": kernel_isa(),
                "devices": {"cpu": None, "cuda": cuda,
                            "gpu": "llama.cpp bundles run on cpu or cuda here", "npu": "not supported by llama.cpp"},
                "warning": amx_risk() or isa_gap()}

    def __init__(self, files: dict, device: str, options: dict):
        try:
            import llama_cpp
        except ImportError as e:
            raise BackendUnavailableError(f"llama-cpp-python cannot be imported: {e}", INSTALL) from e
        reason = self.probe()["devices"].get(device, f"unknown device {device}")
        if device == "cpu":  # a dispatch build: the CPU variant verified on this model here
            load_cpu_backend(files["model"])
        if reason:
            raise BackendUnavailableError(f"llama.cpp cannot use device '{device}': {reason}")
        self.device = device
        self.n_gpu_layers = -1 if device == "cuda" else 0
        self.threads = options.get("threads") or max(1, len(os.sched_getaffinity(0)))
        try:
            # a vocab-only model has no trained context: give it a small one to open
            n_ctx = options.get("n_ctx") or (64 if options.get("vocab_only") else 0)
            self.llm = llama_cpp.Llama(model_path=str(files["model"]), n_ctx=n_ctx,
                                       n_threads=self.threads, n_gpu_layers=self.n_gpu_layers,
                                       logits_all=bool(options.get("logits_all")),
                                       vocab_only=bool(options.get("vocab_only")), verbose=False)
        except (ValueError, RuntimeError) as e:
            raise BackendUnavailableError(f"llama.cpp cannot open {files['model'].name}: {e}",
                                          "re-export the bundle with this omedge") from None
        self.max_batch = None
        self.inputs, self.outputs = ["input_ids"], ["logits"]

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)

    def detokenize(self, ids: list[int]) -> bytes:
        return self.llm.detokenize(ids)

    def eos(self) -> int:
        return self.llm.token_eos()

    def n_ctx(self) -> int:
        return self.llm.n_ctx()

    def logits(self, ids: list[int]) -> np.ndarray:
        """Needs options logits_all=True at open."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def run(self, inputs: dict) -> dict:
        return {"logits": self.logits([int(i) for i in np.asarray(inputs["input_ids"]).reshape(-1)])[None]}

    def generate(self, ids: list[int], sampling: dict) -> Iterator[int]:
        """Sampled token ids after `ids`; the caller closes the generator to stop."""
        return self.llm.generate(ids, top_k=sampling.get("top_k", 40), top_p=sampling.get("top_p", 0.95),
                                 temp=sampling.get("temperature", 0.8), reset=True)

    def describe(self) -> dict:
        import llama_cpp
        return {"backend": "llama.cpp", "version": llama_cpp.__version__, "device": self.device,
                "cpu_variant": cpu_variant_in_use(), "kernel_isa": kernel_isa(),
                "n_gpu_layers": self.n_gpu_layers, "threads": self.threads, "n_ctx": self.llm.n_ctx(),
                "gpu_offload_in_build": bool(llama_cpp.llama_supports_gpu_offload())}


BACKEND = LlamaCppBackend
