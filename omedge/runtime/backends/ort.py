"""onnxruntime backend: CPU here; CUDA / TensorRT / OpenVINO execution providers where the
installed onnxruntime build has them and the hardware is present."""
from __future__ import annotations

import numpy as np

from ... import offline
from ...errors import BackendUnavailableError
from . import Backend, run_error

offline.quiet_onnxruntime()  # before the import: its native library starts telemetry while loading
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _state

# onnxruntime raises its own exception types (Fail, InvalidArgument, ...), which share no base
ORT_ERRORS = tuple(v for v in vars(_state).values() if isinstance(v, type) and issubclass(v, Exception))

PROVIDERS = {  # omedge device -> execution provider (first choice)
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "gpu": "OpenVINOExecutionProvider",
    "npu": "OpenVINOExecutionProvider",
}
WHY_NOT = {
    "cuda": "this onnxruntime build has no CUDA provider (pip install onnxruntime-gpu, with CUDA 12 + cuDNN 9)",
    "gpu": "this onnxruntime build has no OpenVINO provider (pip install onnxruntime-openvino), "
           "or use backend=openvino",
    "npu": "this onnxruntime build has no OpenVINO provider (pip install onnxruntime-openvino), "
           "or use backend=openvino",
}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    @staticmethod
    def probe() -> dict:
        from ...devices import nvidia_gpus
        available = ort.get_available_providers()
        devices = {}
        for dev, provider in PROVIDERS.items():
            if provider not in available:
                devices[dev] = WHY_NOT[dev]
            elif dev == "cuda" and not nvidia_gpus():
                devices[dev] = "CUDA provider present but no NVIDIA GPU/driver found"
            else:
                devices[dev] = None
        return {"installed": True, "version": ort.__version__, "providers": available, "devices": devices}

    def __init__(self, files: dict, device: str, options: dict):
        probe = self.probe()["devices"]
        if probe.get(device):
            raise BackendUnavailableError(f"onnxruntime cannot use device '{device}': {probe[device]}")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if options.get("threads"):
            so.intra_op_num_threads = int(options["threads"])
        if options.get("memory_arena") is False:
            # the CPU arena keeps its high-water mark for the session's life, grown in powers
            # of two: 2.7 GB after two 128^3 STU-Net-S windows against 1.6 GB without it, and
            # 0.25 GB between runs instead of 2.7 (malloc returns large blocks at once)
            so.enable_cpu_mem_arena = False
        self._profile_dir = None
        if options.get("profile"):  # per-node kernel times, for `omedge bench --profile`
            import tempfile
            self._profile_dir = tempfile.mkdtemp(prefix="omedge-ort-profile-")
            so.enable_profiling = True
            so.profile_file_prefix = f"{self._profile_dir}/ort"
        provider = PROVIDERS[device]
        providers = [provider] if device == "cpu" else [
            (provider, {"device_type": device.upper()}) if provider.startswith("OpenVINO") else provider,
            "CPUExecutionProvider"]
        self.device = device
        try:
            self.session = ort.InferenceSession(str(files["model"]), sess_options=so, providers=providers)
        except (*ORT_ERRORS, RuntimeError, ValueError, OSError) as e:
            raise BackendUnavailableError(f"onnxruntime cannot open {files['model'].name}: {str(e)[:300]}",
                                          "re-export the bundle with this omedge and onnxruntime") from None
        used = self.session.get_providers()
        if used[0] != provider:  # onnxruntime drops a provider it cannot load, silently
            raise BackendUnavailableError(f"onnxruntime could not start {provider} (session runs {used})",
                                          WHY_NOT.get(device, ""))
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.max_batch = None

    def run(self, inputs: dict) -> dict:
        try:
            outs = self.session.run(self.outputs, {k: np.ascontiguousarray(v) for k, v in inputs.items()})
        except ORT_ERRORS as e:
            raise run_error("onnxruntime", e, isinstance(e, _state.InvalidArgument)) from None
        return dict(zip(self.outputs, outs))

    def profile(self, skip_runs: int = 1) -> list[dict]:
        """Kernel time per graph node over the runs so far, without the first `skip_runs`
        (warm-up), for a session opened with profile=True: [{node, op, exec, ms, calls}].
        Ends onnxruntime's profiling and removes its trace."""
        import json
        import shutil
        if self._profile_dir is None:
            return []
        trace = self.session.end_profiling()
        try:
            with open(trace) as f:
                events = json.load(f)
        finally:
            shutil.rmtree(self._profile_dir, ignore_errors=True)
            self._profile_dir = None
        runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
        after = runs[skip_runs - 1][1] if 0 < skip_runs <= len(runs) - 1 else -1
        rows: dict = {}
        for ev in events:
            name = ev.get("name", "")
            if ev.get("cat") != "Node" or not name.endswith("_kernel_time") or ev.get("ts", 0) < after:
                continue
            args = ev.get("args", {})
            row = rows.setdefault(name[:-len("_kernel_time")], {"op": args.get("op_name", "?"),
                                                                 "exec": args.get("provider", ""), "ms": 0.0,
                                                                 "calls": 0})
            row["ms"] += ev.get("dur", 0) / 1000.0
            row["calls"] += 1
        return [{"node": k, **v} for k, v in rows.items()]

    def describe(self) -> dict:
        so = self.session.get_session_options()
        return {"backend": "onnxruntime", "version": ort.__version__, "device": self.device,
                "providers": self.session.get_providers(), "threads": so.intra_op_num_threads or "auto",
                **({} if so.enable_cpu_mem_arena else {"memory_arena": False})}


BACKEND = OnnxRuntimeBackend
