"""The backend protocol. One module per library, and only that module imports it.

A tensor backend: `open(files, device, options)`, the declared `inputs`/`outputs` read
back from the session, `max_batch`, `run(dict) -> dict`, `describe()`. A text backend
(llama.cpp) adds tokenize / detokenize / logits / generate.
"""
from __future__ import annotations

import importlib
import importlib.util
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

BACKEND_MODULES = {"onnxruntime": "omedge.runtime.backends.ort", "openvino": "omedge.runtime.backends.ov",
                   "llama.cpp": "omedge.runtime.backends.llama"}
LIBRARIES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "llama.cpp": "llama_cpp"}
INSTALL_HINT = {"onnxruntime": "pip install omedge (onnxruntime is a core dependency)",
                "openvino": "pip install 'omedge[openvino]'",
                "llama.cpp": "pip install 'omedge[llm]' (see the README for the CPU-dispatch build)"}
TEXT_BACKENDS = ("llama.cpp",)


class Backend:
    name = "?"
    inputs: list[str]            # graph input names, read back from the session
    outputs: list[str]           # graph output names, read back from the session
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

    def logits(self, ids: list[int]) -> object:
        """(len(ids), vocab) float32 logits of one sequence, from a fresh context."""
        raise NotImplementedError

    def generate(self, ids: list[int], sampling: dict) -> Iterator[int]:
        raise NotImplementedError


def run_error(backend: str, e: Exception, bad_input: bool = False):
    """A library's failed run as a typed error: the input does not fit the graph
    (InputError), or the graph cannot run on this backend here (BackendUnavailableError)."""
    from ...errors import BackendUnavailableError, InputError
    text = str(e).strip()[:300]
    if bad_input:
        return InputError(f"{backend} refused the input: {text}",
                          "check the input's shape and type against the bundle's declared inputs")
    return BackendUnavailableError(f"{backend} failed running the graph: {text}",
                                   "run `omedge verify BUNDLE` on this machine; if it fails, re-export the "
                                   "bundle with this omedge and backend version")


def backend_class(name: str) -> type[Backend]:
    if name not in BACKEND_MODULES:
        from ...errors import UsageError
        raise UsageError(f"unknown backend '{name}'", f"choose from {', '.join(BACKEND_MODULES)}")
    return importlib.import_module(BACKEND_MODULES[name]).BACKEND


def probe(name: str) -> dict:
    """Whether `name` imports here and which devices it can use (reason when not).
    Absent (its package is not found) and broken (found, but its import or device query
    fails) are told apart: an export must not take a broken install for an optional
    extra that is missing. An interrupt is no answer at all: it propagates."""
    if not _found(LIBRARIES[name]):
        return {"installed": False, "reason": f"not installed ({LIBRARIES[name]})", "hint": INSTALL_HINT[name],
                "devices": {}}
    try:
        with _interrupts_noticed() as interrupted:
            cls = backend_class(name)
            importlib.import_module(LIBRARIES[name])
    except ImportError as e:  # found, but a module, shared library or symbol it needs is missing
        if interrupted:   # numpy / pybind11 module init turn a Ctrl-C into "ImportError: ... failed"
            raise KeyboardInterrupt from None
        return _broken(name, str(e))
    try:
        return cls.probe()
    except (RuntimeError, OSError) as e:
        return _broken(name, f"cannot list its devices: {e}")


@contextmanager
def _interrupts_noticed():
    """Yields a list that is non-empty once SIGINT arrived; the interrupt still raises as
    usual. Only in the main thread, where Python delivers signals."""
    seen: list = []
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield seen
        return

    def note(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, note)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _found(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # in sys.modules without a spec (None: import blocked)
        return False


def _broken(name: str, why: str) -> dict:
    return {"installed": False, "broken": True, "reason": f"installed but fails to load: {why[:300]}",
            "hint": f"reinstall it ({INSTALL_HINT[name]}, with --force-reinstall) or uninstall it", "devices": {}}
