"""What hardware is here: an inventory, nothing else (which backend runs where is
`omedge.runtime.plan`). Every probe is optional and local (files under /proc,
nvidia-ml-py or nvidia-smi, OpenVINO's device list); a failed probe says why."""
from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess

ISA_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI",
             "avx512_bf16": "AVX512-BF16", "amx_tile": "AMX", "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8"}


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    info = {"model": platform.processor() or platform.machine(), "arch": platform.machine(),
            "logical_cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity") else os.cpu_count(), "isa": [], "vendor": ""}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return info
    cores, flags = set(), set()
    phys = core = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name":
            info["model"] = value
        elif key == "vendor_id":
            info["vendor"] = value
        elif key == "flags":
            flags = set(value.split())
        elif key == "physical id":
            phys = value
        elif key == "core id":
            core = value
            cores.add((phys, core))
    info["physical_cores"] = len(cores) or info["logical_cores"]
    info["isa"] = [name for flag, name in ISA_FLAGS.items() if flag in flags]
    info["flags"] = sorted(flags & set(ISA_FLAGS))
    return info


@functools.lru_cache(maxsize=1)
def nvidia_gpus() -> list[dict]:
    """NVIDIA GPUs via nvidia-ml-py when installed, else nvidia-smi, else none."""
    try:
        import pynvml
        pynvml.nvmlInit()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            gpus.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                         "memory_mb": pynvml.nvmlDeviceGetMemoryInfo(h).total // 2**20,
                         "driver": str(pynvml.nvmlSystemGetDriverVersion())})
        return gpus
    except Exception:  # noqa: BLE001, S110 - no pynvml, no driver, no GPU: all mean "ask nvidia-smi"
        pass
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            gpus.append({"index": int(parts[0]), "name": parts[1], "memory_mb": int(float(parts[2])),
                         "driver": parts[3]})
    return gpus


def openvino_devices() -> list[dict]:
    from .. import offline
    offline.quiet_openvino()  # `import openvino` would otherwise start its telemetry
    try:
        import openvino
    except ImportError:
        return []
    try:
        core = openvino.Core()
        names = core.available_devices
    except RuntimeError as e:  # a plugin that fails to load: say so, do not crash `omedge devices`
        return [{"name": "?", "full_name": f"OpenVINO could not list its devices: {str(e)[:200]}"}]
    devices = []
    for name in names:
        try:
            full = core.get_property(name, "FULL_DEVICE_NAME")
        except RuntimeError:
            full = name
        devices.append({"name": name, "full_name": full})
    return devices


EXACT_INT8_ISA = ("AVX512-VNNI", "AVX-VNNI", "AMX-INT8")  # u8 x s8 dot products without 16-bit pair sums


def int8_dot_products() -> dict:
    """How this CPU's INT8 kernels (onnxruntime, oneDNN) sum u8 x s8 products. Without
    VNNI/AMX pairs are summed in 16 bits and saturate on full 8-bit weights, so INT8 is
    exact only with 7-bit weights (what omedge writes)."""
    info = cpu_info()
    exact = sorted(set(EXACT_INT8_ISA) & set(info["isa"]))
    if exact or info["arch"] not in ("x86_64", "AMD64"):
        return {"exact": True, "why": f"32-bit accumulation ({', '.join(exact) or info['arch']})"}
    return {"exact": False, "why": "no VNNI/AMX: u8 x s8 pairs are summed in 16 bits, which saturate on full "
                                   "8-bit weights; 7-bit INT8 weights (omedge's) are exact"}


def inventory() -> dict:
    return {"cpu": cpu_info(), "int8": int8_dot_products(), "nvidia_gpus": nvidia_gpus(),
            "openvino_devices": openvino_devices()}
