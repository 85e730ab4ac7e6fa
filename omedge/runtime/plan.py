"""Which (artifact, backend, device) a bundle runs on here, in order, and why every
other combination was skipped. Only artifacts verified on that very backend qualify."""
from __future__ import annotations

from ..devices import cpu_info, int8_dot_products
from ..formats import backends_for
from ..manifest import Artifact
from .backends import INSTALL_HINT, probe

AUTO_ORDER = ("cuda", "gpu", "cpu")  # npu only when asked for: batch 1, long first compile


def backends_for_device(device: str) -> tuple[str, ...]:
    if device == "cuda":
        return ("onnxruntime", "llama.cpp")
    if device in ("gpu", "npu"):
        return ("openvino", "onnxruntime")
    intel = cpu_info().get("vendor") == "GenuineIntel"
    return (("openvino", "onnxruntime") if intel else ("onnxruntime", "openvino")) + ("llama.cpp",)


def backend_report() -> dict:
    """Every backend: installed or not, its devices and the reasons it cannot use others."""
    return {name: probe(name) for name in INSTALL_HINT}


def _usable(artifacts: list[Artifact], backend: str) -> list[Artifact]:
    usable = [a for a in artifacts if backend in backends_for(a.format)]
    usable.sort(key=lambda a: a.format != backend)  # a backend's own format first (IR for openvino)
    return usable


def plan(artifacts: list[Artifact], device: str = "auto", backend: str = "auto"):
    """Returns (candidates, skipped): [(artifact, backend, device)] in the order to try,
    and one human-readable line for each combination that cannot run here."""
    devices = AUTO_ORDER if device == "auto" else (device,)
    candidates, skipped, probes = [], [], {}
    for dev in devices:
        names = backends_for_device(dev)
        if backend != "auto":
            names = tuple(n for n in names if n == backend) or (backend,)
        for name in names:
            usable = _usable(artifacts, name)
            if not usable:
                if backend != "auto":  # only worth saying when this backend was asked for
                    formats = ", ".join(sorted({a.format for a in artifacts}))
                    skipped.append(f"{name} on {dev}: the bundle has no format it runs ({formats})")
                continue
            p = probes.setdefault(name, probe(name))
            if not p["installed"]:
                skipped.append(f"{name} on {dev}: {p['reason']} -> {p['hint']}")
                continue
            reason = p["devices"].get(dev, f"{name} does not support device '{dev}'")
            if reason:
                skipped.append(f"{name} on {dev}: {reason}")
                continue
            for a in usable:
                if dev == "cpu" and saturates_here(a):
                    skipped.append(f"{name} on {dev} ({a.name}): {SATURATION}")
                elif a.passed_on(name):
                    candidates.append((a, name, dev))
                else:
                    skipped.append(f"{name} on {dev} ({a.name}): not verified on {name} at export "
                                   "(failed or absent parity record), not used")
    return candidates, skipped


SATURATION = ("its INT8 weights use the full 8-bit range, and this CPU has no VNNI: its u8 x s8 kernels sum "
              "pairs in 16 bits, which saturate on such weights, so its answers would differ from the verified "
              "ones (seen: cosine 0.965 for 0.995) -> re-export the bundle with this omedge (7-bit weights, "
              "exact on every x86 CPU)")


def saturates_here(artifact: Artifact) -> bool:
    """An INT8 artifact with quantized activations and full-range weights (bundles from
    before the 7-bit rule) on a CPU whose int8 dot products saturate: not used."""
    q = artifact.quantization or {}
    if not q or q.get("activations", "float") == "float" or q.get("weight_range") == "7-bit":
        return False
    return not int8_dot_products()["exact"]
