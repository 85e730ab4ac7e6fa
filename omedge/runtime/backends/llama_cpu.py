"""Which CPU kernels a runtime-dispatch llama.cpp build runs here (part of the llama.cpp
backend: only it and llama.py import llama_cpp).

A build with GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS ships one CPU library per x86 level
(x64 ... haswell, skylakex, icelake, zen4, sapphirerapids) and registers none until one
is loaded. llama.cpp's own choice scores each against cpuid, which is not enough: on a
VM that advertises AMX, the sapphirerapids variant was measured to die with SIGILL on
the first matmul although the kernel grants the AMX permission. So each candidate, best
score first, is run once on the model in a child process; the first one that survives
is used and remembered per (build, CPU, model type) in the user's cache. A forced
variant (OMEDGE_GGML_CPU_VARIANT) is loaded as it is, for tests and for machines where
the user knows better."""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from ...errors import BackendUnavailableError

FORCE_VARIANT = "OMEDGE_GGML_CPU_VARIANT"
_loaded: list = []  # the variant this process loaded (a backend library loads once per process)

_CHILD = r"""
import ctypes, json, os, sys
from omedge.runtime.backends import llama_cpu as C
if sys.argv[1] == "order":
    out = []
    for v in C.cpu_variants():
        lib = ctypes.CDLL(str(C.variant_dir() / f"libggml-cpu-{v}.so"))
        score = getattr(lib, "ggml_backend_score", None)
        out.append((v, int(score()) if score else 0))
    print("RESULT " + json.dumps(sorted(out, key=lambda x: -x[1])))
else:
    from pathlib import Path
    from omedge.runtime.backends.llama import LlamaCppBackend
    llm = LlamaCppBackend({"model": Path(sys.argv[2])}, "cpu", {"n_ctx": 64, "threads": 1}).llm
    bos = llm.token_bos() if llm.token_bos() >= 0 else 0
    llm.eval([bos] * 8)   # a batch (prompt kernels), then one token (decode kernels)
    llm.eval([bos])
    print("RESULT ok")
"""


def variant_dir() -> Path | None:
    """Where the variants are: llama-cpp-python's wheel installs them in site-packages/bin
    (its CMake install rule); other layouts keep them beside libllama."""
    import llama_cpp
    pkg = Path(llama_cpp.__file__).parent
    for folder in (pkg / "lib", pkg.parent / "bin"):
        if any(folder.glob("libggml-cpu-*.so")):
            return folder
    return None


def cpu_variants() -> list[str]:
    """The CPU variants of a dispatch build; empty for a build with one static CPU backend."""
    folder = variant_dir()
    if folder is None:
        return []
    return sorted(p.name[len("libggml-cpu-"):-len(".so")] for p in folder.glob("libggml-cpu-*.so"))


def loaded_cpu_variant() -> str | None:
    """The variant library this process has mapped, read back from /proc/self/maps."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    return ",".join(sorted(set(re.findall(r"libggml-cpu-([A-Za-z0-9_]+)\.so", maps)))) or None


def _ggml_of_libllama():
    """The libggml copy libllama itself uses. A wheel cannot hold symlinks, so
    llama_cpp/lib has libggml.so and libggml.so.0 as two files, loaded as two libraries
    with two backend registries: libllama links the SONAME (libggml.so.0), and a backend
    registered through llama_cpp._ggml's libggml.so is one libllama never sees."""
    import llama_cpp
    sonames = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml.so.*"), key=lambda p: len(p.name))
    if sonames:
        return ctypes.CDLL(str(sonames[0]))
    from llama_cpp import _ggml
    return _ggml.libggml


def _load(variant: str) -> None:
    lib = _ggml_of_libllama()
    lib.ggml_backend_load.restype = ctypes.c_void_p
    lib.ggml_backend_load.argtypes = [ctypes.c_char_p]
    if not lib.ggml_backend_load(str(variant_dir() / f"libggml-cpu-{variant}.so").encode()):
        raise BackendUnavailableError(f"llama.cpp could not load its '{variant}' CPU variant on this CPU",
                                      f"unset {FORCE_VARIANT} to let omedge choose")


def load_cpu_backend(model: Path | None = None, probe: bool = True) -> str | None:
    """Load the CPU variant to use (once per process) and return its name; None for a
    static build. With `model`, the choice is verified on it in a child process first."""
    if _loaded:
        return _loaded[0]
    variants = cpu_variants()
    if not variants:
        return None
    forced = os.environ.get(FORCE_VARIANT)
    if forced and forced not in variants:
        raise BackendUnavailableError(f"{FORCE_VARIANT}={forced}: this llama.cpp build has no such CPU variant",
                                      f"it has: {', '.join(variants)}")
    if forced:
        choice = forced
    elif model is not None and probe:
        choice = choose(model)
    else:
        raise BackendUnavailableError("a dispatch build's CPU variant is chosen on a model",
                                      f"pass the GGUF, or set {FORCE_VARIANT}")
    _load(choice)
    _loaded.append(loaded_cpu_variant() or choice)
    return _loaded[0]


def in_use() -> str:
    """For describe() and `omedge devices`, without loading anything: the variant this
    process runs, or what a first load would try first."""
    if not cpu_variants():
        return "static build"
    if _loaded:
        return _loaded[0]
    best = ordered()
    return f"chosen at first load (best scored here: {best[0][0] if best else 'none'})"


def _child(args: list[str], variant: str | None = None, timeout: int = 300) -> str | None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(FORCE_VARIANT, None)
    if variant:
        env[FORCE_VARIANT] = variant
    try:
        r = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, env=env,
                           timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    return lines[-1][7:] if r.returncode == 0 and lines else None


def ordered() -> list[tuple[str, int]]:
    """Variants this CPU supports by llama.cpp's own score, best first (scored in a child)."""
    cache = _cache()
    key = _machine_key()
    if key not in cache.get("order", {}):
        got = _child(["order"])
        cache.setdefault("order", {})[key] = json.loads(got) if got else []
        _save(cache)
    return [(v, s) for v, s in cache["order"][key] if s > 0]


def choose(model: Path) -> str:
    """The best-scored variant that runs `model` here without dying, remembered."""
    cache, key = _cache(), f"{_machine_key()}|{Path(model).name}"
    known = cache.setdefault("runs", {}).get(key)
    if known:
        return known
    failed = []
    for variant, _ in ordered():
        if _child(["run", str(model)], variant) is not None:
            cache = _cache()
            cache.setdefault("runs", {})[key] = variant
            cache.setdefault("failed", {})[key] = failed
            _save(cache)
            return variant
        failed.append(variant)
    raise BackendUnavailableError(f"no CPU variant of this llama.cpp build runs here (tried {', '.join(failed)})",
                                  f"set {FORCE_VARIANT}=x64, or rebuild llama-cpp-python for this machine")


def failed_variants(model: Path) -> list[str]:
    """The variants that died on `model` here when it was chosen (e.g. sapphirerapids on a VM)."""
    return _cache().get("failed", {}).get(f"{_machine_key()}|{Path(model).name}", [])


def _machine_key() -> str:
    """This build (its variant libraries) on this CPU (model name and flags)."""
    h = hashlib.sha256()
    folder = variant_dir()
    for p in sorted(folder.glob("libggml-cpu-*.so")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        h.update("\n".join(x for x in info.splitlines() if x.startswith(("model name", "flags"))).encode())
    except OSError:
        pass
    return h.hexdigest()[:16]


def _cache_file() -> Path:
    root = os.environ.get("OMEDGE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(root) / "omedge" / "llama-cpu-variants.json"


def _cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _save(cache: dict) -> None:
    """Atomically; a cache that cannot be written only costs a probe next time."""
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass
