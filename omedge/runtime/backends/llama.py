"""llama.cpp backend (llama-cpp-python) for GGUF bundles: CPU threads, and GPU offload
when the installed build has it and a GPU is present."""
from __future__ import annotations

import ctypes
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ...errors import BackendUnavailableError, InputError
from . import TextBackend
from .llama_cpu import cpu_variants, in_use, load_cpu_backend

DISPATCH_ARGS = "-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON"
INSTALL = f"pip install 'omedge[llm]' with CMAKE_ARGS=\"{DISPATCH_ARGS}\" (see README)"
PENALTY_LAST_N = 64  # llama.cpp's own default window for the repetition penalty


def default_threads() -> tuple[int, int]:
    """(decode, prompt) threads. Decoding is memory-bound: two SMT siblings on one core
    add no bandwidth, and each token's barrier waits for the slower one, so one thread
    per physical core of this process's CPUs, as llama.cpp's own tools default to (one
    per logical CPU made omedge decode slower than llama-cpp-python's default on SMT
    machines). Prompt processing is compute-bound and uses every CPU it may."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            return len(cpus), len(cpus)
    return max(1, len(cores)), len(cpus)


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
        decode_threads, batch_threads = default_threads()
        self.threads = options.get("threads") or decode_threads
        self.batch_threads = options.get("threads") or batch_threads
        try:
            # a vocab-only model has no trained context: give it a small one to open
            n_ctx = options.get("n_ctx") or (64 if options.get("vocab_only") else 0)
            self.llm = llama_cpp.Llama(model_path=str(files["model"]), n_ctx=n_ctx,
                                       n_threads=self.threads, n_threads_batch=self.batch_threads,
                                       n_gpu_layers=self.n_gpu_layers,
                                       logits_all=bool(options.get("logits_all")),
                                       vocab_only=bool(options.get("vocab_only")), verbose=False)
        except (ValueError, RuntimeError) as e:
            raise BackendUnavailableError(f"llama.cpp cannot open {files['model'].name}: {e}",
                                          "re-export the bundle with this omedge") from None
        self.max_batch = None
        self.inputs, self.outputs = ["input_ids"], ["logits"]
        self._pieces: dict[int, bytes] = {}
        self.stats: dict = {}

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)

    def detokenize(self, ids: list[int]) -> bytes:
        """Bytes of the tokens' pieces (a byte-level BPE piece may be half a UTF-8
        character: the caller decodes incrementally). Cached per token id: the stream
        asks for one token at a time."""
        out = b"".join(self._piece(int(t)) for t in ids)
        if ids and ids[0] == self.llm.token_bos() and out[:1] == b" ":  # as llama-cpp-python: BOS eats a space
            out = out[1:]
        return out

    def _piece(self, tok: int) -> bytes:
        piece = self._pieces.get(tok)
        if piece is None:
            import llama_cpp
            vocab, size = self.llm._model.vocab, 64
            while True:  # a piece longer than the buffer returns minus the size it needs
                buf = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_token_to_piece(vocab, tok, buf, size, 0, False)
                if n >= 0:
                    break
                size = -n
            piece = self._pieces[tok] = buf.raw[:n]
        return piece

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

    def _sampler(self, sampling: dict, prompt: list[int]):
        """None for plain greedy decoding (argmax over the last logits, as an eval loop
        does); else one llama.cpp C sampler chain for the whole answer, in transformers'
        order: repetition penalty, temperature, top-k, top-p, then a seeded draw."""
        import llama_cpp as lib
        temp, top_k = float(sampling.get("temperature", 0.8)), int(sampling.get("top_k", 40))
        top_p, penalty = float(sampling.get("top_p", 0.95)), float(sampling.get("repeat_penalty", 1.0))
        greedy = temp <= 0 or top_k == 1
        if greedy and penalty == 1.0:
            return None
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if penalty != 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_penalties(
                self.llm.n_vocab(), PENALTY_LAST_N, penalty, 0.0, 0.0))
            for t in prompt[-PENALTY_LAST_N:]:  # the prompt counts as already said
                lib.llama_sampler_accept(chain, t)
        if greedy:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        seed = sampling.get("seed")
        for s in (lib.llama_sampler_init_temp(temp), lib.llama_sampler_init_top_k(top_k) if top_k > 0 else None,
                  lib.llama_sampler_init_top_p(top_p, 1) if top_p < 1 else None,
                  lib.llama_sampler_init_dist(lib.LLAMA_DEFAULT_SEED if seed is None else int(seed) & 0xFFFFFFFF)):
            if s is not None:
                lib.llama_sampler_chain_add(chain, s)
        return chain

    def generate(self, ids: list[int], sampling: dict) -> Iterator[int]:
        """Sampled token ids after `ids`; the caller closes the generator to stop. The
        loop is llama.cpp's: one decode of one token, then an argmax or the C sampler
        chain, nothing per token in Python that an eval loop does not do (no logit
        copies, no sampler rebuilt per token). `stats` gets prompt size and timings."""
        import llama_cpp as lib
        ctx, n_vocab, chain = self.llm.ctx, self.llm.n_vocab(), self._sampler(sampling, ids)
        one = (lib.llama_token * 1)()
        batch = lib.llama_batch_get_one(one, 1)  # positions follow on from the KV cache
        stats = self.stats = {"prompt_tokens": len(ids), "tokens": 0}
        try:
            t = time.perf_counter()
            self.llm.reset()
            self.llm.eval(list(ids))
            stats["prefill_s"] = time.perf_counter() - t
            while True:
                if chain is None:
                    tok = int(np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).argmax())
                else:
                    tok = lib.llama_sampler_sample(chain, ctx, -1)
                stats["tokens"] += 1
                if stats["tokens"] == 1:
                    stats["first_token_at"] = time.perf_counter()
                yield tok
                one[0] = tok
                if lib.llama_decode(ctx, batch) != 0:
                    raise InputError(f"llama.cpp could not decode token {len(ids) + stats['tokens']} of a "
                                     f"{self.llm.n_ctx()}-token context", "lower max_tokens or shorten the prompt")
        finally:
            if chain is not None:
                lib.llama_sampler_free(chain)

    def describe(self) -> dict:
        import llama_cpp
        return {"backend": "llama.cpp", "version": llama_cpp.__version__, "device": self.device,
                "cpu_variant": cpu_variant_in_use(), "kernel_isa": kernel_isa(),
                "n_gpu_layers": self.n_gpu_layers, "threads": self.threads,
                "prompt_threads": self.batch_threads, "n_ctx": self.llm.n_ctx(),
                "gpu_offload_in_build": bool(llama_cpp.llama_supports_gpu_offload())}


BACKEND = LlamaCppBackend
