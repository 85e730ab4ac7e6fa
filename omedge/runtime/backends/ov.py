"""OpenVINO backend: Intel CPU, iGPU and NPU. Runs IR (.xml/.bin) and ONNX files."""
from __future__ import annotations

import threading

import numpy as np

from ... import offline
from ...errors import BackendUnavailableError
from . import Backend, run_error

offline.quiet_openvino()  # before the import: `import openvino` loads its converter's telemetry
import openvino as ov

DEVICES = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU"}
WHY_NOT = {
    "gpu": "OpenVINO finds no Intel GPU (needs the Intel compute runtime / intel-opencl-icd driver)",
    "npu": "OpenVINO finds no Intel NPU (needs an Intel Core Ultra CPU and the NPU driver)",
    "cuda": "OpenVINO does not run on NVIDIA GPUs; use backend=onnxruntime with onnxruntime-gpu",
}
_core = None


def core() -> ov.Core:
    global _core
    if _core is None:
        _core = ov.Core()
    return _core


def precision_name(value) -> str:
    """OpenVINO returns element types as objects; normalise to 'f32', 'bf16', ..."""
    text = str(value)
    return {"<Type: 'float32'>": "f32", "<Type: 'bfloat16'>": "bf16", "<Type: 'float16'>": "f16"}.get(text, text)


class OpenVINOBackend(Backend):
    name = "openvino"

    @staticmethod
    def probe() -> dict:
        found = core().available_devices
        devices = {}
        for dev, ov_name in DEVICES.items():
            devices[dev] = None if any(d.split(".")[0] == ov_name for d in found) else WHY_NOT[dev]
        devices["cuda"] = WHY_NOT["cuda"]
        return {"installed": True, "version": ov.get_version(), "ov_devices": found, "devices": devices}

    def __init__(self, files: dict, device: str, options: dict):
        reason = self.probe()["devices"].get(device, f"unknown device '{device}'")
        if reason:
            raise BackendUnavailableError(f"openvino cannot use device '{device}': {reason}")
        try:
            model = core().read_model(str(files["model"]))
        except RuntimeError as e:
            raise BackendUnavailableError(f"openvino cannot read {files['model'].name}: {str(e)[:300]}",
                                          "re-export the bundle with this omedge and openvino") from None
        self.max_batch = None
        if device == "npu":  # the NPU compiler needs static shapes
            model.reshape({model.inputs[0].any_name: [1, *list(model.inputs[0].get_partial_shape())[1:]]})
            self.max_batch = 1
        self.mode = options.get("mode", "latency")
        config = {"PERFORMANCE_HINT": self.mode.upper()}
        hint = options.get("inference_precision")
        if hint == "bf16" and device == "cpu" and not options.get("allow_emulated_bf16") \
                and "BF16" not in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise BackendUnavailableError(
                "this CPU has no native bf16 (AVX512-BF16 or AMX); OpenVINO would emulate it about 100x slower",
                "use an fp32 or int8 artifact on this machine (omedge export ... --int8)")
        if hint:
            config["INFERENCE_PRECISION_HINT"] = hint
        if options.get("threads") and device == "cpu":
            config["INFERENCE_NUM_THREADS"] = int(options["threads"])
        self.device = device
        try:
            self.compiled = core().compile_model(model, DEVICES[device], config)
        except RuntimeError as e:
            raise BackendUnavailableError(f"openvino cannot compile {files['model'].name} for {device}: "
                                          f"{str(e).strip()[:300]}",
                                          "re-export the bundle with this omedge and openvino") from None
        self.inputs = [i.any_name for i in self.compiled.inputs]
        self.outputs = [o.any_name for o in self.compiled.outputs]
        self._local = threading.local()

    def run(self, inputs: dict) -> dict:
        request = getattr(self._local, "request", None)
        if request is None:  # one infer request per thread: concurrent predict is safe
            request = self._local.request = self.compiled.create_infer_request()
        try:
            request.infer({k: np.ascontiguousarray(v) for k, v in inputs.items()})
        except RuntimeError as e:  # OpenVINO reports a bad input and a failed kernel alike
            raise run_error("openvino", e, bad_input=not self._fits(inputs)) from None
        return {name: request.get_tensor(out).data.copy()
                for name, out in zip(self.outputs, self.compiled.outputs)}

    def _fits(self, inputs: dict) -> bool:
        """Whether every array has a shape the compiled graph accepts."""
        ports = {p.any_name: p for p in self.compiled.inputs}
        return all(k in ports and ports[k].get_partial_shape().compatible(ov.PartialShape(list(np.shape(v))))
                   for k, v in inputs.items())

    def run_many(self, chunks: list[dict]) -> list[dict]:
        if self.mode != "throughput" or len(chunks) == 1:
            return [self.run(c) for c in chunks]
        # one thread per stream, each with its own infer request (OpenVINO releases the
        # GIL while inferring); the pool is joined before returning
        from concurrent.futures import ThreadPoolExecutor
        streams = int(self.compiled.get_property("NUM_STREAMS"))
        with ThreadPoolExecutor(max_workers=max(1, streams)) as pool:
            return list(pool.map(self.run, chunks))

    def describe(self) -> dict:
        info = {"backend": "openvino", "version": ov.get_version(), "device": self.device, "mode": self.mode,
                "execution_devices": list(self.compiled.get_property("EXECUTION_DEVICES"))}
        try:
            info["inference_precision"] = precision_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        except RuntimeError:
            pass
        if self.device == "cpu":
            info["threads"] = self.compiled.get_property("INFERENCE_NUM_THREADS")
        info["streams"] = int(self.compiled.get_property("NUM_STREAMS"))
        return info


BACKEND = OpenVINOBackend
