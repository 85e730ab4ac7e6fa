"""OpenVINO backend: Intel CPU, iGPU and NPU. Runs IR (.xml/.bin) and ONNX files."""
from __future__ import annotations

import itertools
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
    """One Core per process; it reads ONNX files with DeformConv too (MIU-VL's onnx artifacts)."""
    global _core
    if _core is None:
        _core = ov.Core()
        _core.add_extension(deform_conv_extension())
    return _core


def deform_conv_extension():
    """OpenVINO's ONNX frontend has no converter for DeformConv-19 (GLIP's DCNv2): map it to
    DeformableConvolution-8 with its mask. bilinear_interpolation_pad=True is the ONNX /
    torchvision rule (a tap up to one pixel outside reads zero-padded corners; False would
    clamp it to the border); the bias input becomes a broadcast Add."""
    import numpy as np
    import openvino.opset8 as ops
    from openvino.frontend.onnx import ConversionExtension

    def to_ov(node):
        n_in = node.get_input_size()
        x, w, offset = node.get_input(0), node.get_input(1), node.get_input(2)
        bias = node.get_input(3) if n_in > 3 else None
        mask = node.get_input(4) if n_in > 4 else None
        pads = list(node.get_attribute("pads", [0, 0, 0, 0]))
        out = ops.deformable_convolution(
            x, offset, w, strides=list(node.get_attribute("strides", [1, 1])), pads_begin=pads[:2],
            pads_end=pads[2:], dilations=list(node.get_attribute("dilations", [1, 1])), mask=mask,
            group=int(node.get_attribute("group", 1)), deformable_group=int(node.get_attribute("offset_group", 1)),
            bilinear_interpolation_pad=True)
        if bias is not None:
            out = ops.add(out, ops.unsqueeze(bias, ops.constant(np.array([0, 2, 3], dtype=np.int64))))
        return [out.output(0)]

    return ConversionExtension("DeformConv", to_ov)


def port_name(port) -> str:
    """The graph's own name of a tensor: OpenVINO merges the names of nodes it folds into the
    tensor (a no-op Pad after an input), and `any_name` may return an internal '/a/b' one."""
    names = sorted(port.get_names())
    plain = [n for n in names if not n.startswith("/")]
    return plain[0] if len(plain) == 1 else port.any_name


def precision_name(value) -> str:
    """OpenVINO returns element types as objects; normalise to 'f32', 'bf16', ..."""
    text = str(value)
    return {"<Type: 'float32'>": "f32", "<Type: 'bfloat16'>": "bf16", "<Type: 'float16'>": "f16"}.get(text, text)


BIG_OUTPUT = 64 << 20  # bytes: above this a run's outputs are handed over, not copied (a volume window: 0.9 GB)


def native_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 or AMX). One small function, so a
    test can stand in a CPU without it; elsewhere OpenVINO would emulate bf16 ~100x slower."""
    return "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def throughput_plan(sizes: list[int], streams: int, dynamic: bool) -> tuple[list[int], list[int]]:
    """(pieces run side by side on the streams, pieces run after them on all cores) for
    chunks of `sizes` items. In throughput mode a stream owns 1/streams of the cores, so a
    round that leaves a stream idle is slower than latency mode: only whole rounds go to
    the streams (an even share each), the rest to a latency-mode twin. With a dynamic batch
    the items are regrouped; with a fixed one whole chunks are dealt out."""
    if streams <= 1:
        return list(sizes), []
    if not dynamic:
        full = len(sizes) // streams * streams
        return list(sizes[:full]), list(sizes[full:])
    per, rest = divmod(sum(sizes), streams)
    return [per] * streams if per else [], [rest] if rest else []


def split_batches(chunks: list[dict], sizes: list[int]) -> list[dict]:
    """The chunks' items regrouped along axis 0 into pieces of `sizes`, in order (so the
    caller's concatenation of the results is unchanged); no copy when one chunk is given."""
    whole = chunks[0] if len(chunks) == 1 else {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    starts = np.cumsum([0, *sizes])
    return [{k: v[a:b] for k, v in whole.items()} for a, b in itertools.pairwise(starts)]


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
        if options.get("input_shape") and device != "npu":  # every run has this shape (a volume window)
            model.reshape({model.inputs[0].any_name: list(options["input_shape"])})
            self.max_batch = options["input_shape"][0]
        self.mode, self.device = options.get("mode", "latency"), device
        self._profile = [] if options.get("profile") else None  # one {node: row} per run
        config = self._config(device, options)
        self.compiled = self._compile(model, files, config)
        self.streams = max(1, int(self.compiled.get_property("NUM_STREAMS")))
        # throughput mode: rounds that cannot fill every stream run here, on all cores (throughput_plan)
        self._twin = None
        if self.mode == "throughput" and self.streams > 1:
            twin = {k: v for k, v in config.items() if k != "NUM_STREAMS"}
            self._twin = self._compile(model, files, {**twin, "PERFORMANCE_HINT": "LATENCY"})
        self.inputs = [port_name(i) for i in self.compiled.inputs]
        self.outputs = [port_name(o) for o in self.compiled.outputs]
        self._local = threading.local()
        self._queue, self._queue_lock = None, threading.Lock()
        self._calls, self._calls_lock = 0, threading.Lock()  # run_many calls in flight

    def _config(self, device: str, options: dict) -> dict:
        """OpenVINO properties from the recipe's and the kind's options. `streams` caps the
        streams of throughput mode (volumes: 1, measured faster than 2)."""
        config = {"PERFORMANCE_HINT": self.mode.upper()}
        hint = options.get("inference_precision")
        if hint == "bf16" and device == "cpu" and not options.get("allow_emulated_bf16") and not native_bf16():
            raise BackendUnavailableError(
                "this CPU has no native bf16 (AVX512-BF16 or AMX); OpenVINO would emulate it about 100x slower",
                "use an fp32 or int8 artifact on this machine (omedge export ... --int8)")
        if hint:
            config["INFERENCE_PRECISION_HINT"] = hint
        if options.get("threads") and device == "cpu":
            config["INFERENCE_NUM_THREADS"] = int(options["threads"])
        if options.get("streams") and self.mode == "throughput":
            config["NUM_STREAMS"] = int(options["streams"])
        if self._profile is not None:
            config["PERF_COUNT"] = True  # per-node times, for `omedge bench --profile`
        return config

    def _compile(self, model, files: dict, config: dict):
        try:
            return core().compile_model(model, DEVICES[self.device], config)
        except RuntimeError as e:
            raise BackendUnavailableError(f"openvino cannot compile {files['model'].name} for {self.device}: "
                                          f"{str(e).strip()[:300]}",
                                          "re-export the bundle with this omedge and openvino") from None

    def run(self, inputs: dict, compiled=None) -> dict:
        compiled = compiled or self.compiled
        local = "request" if compiled is self.compiled else "twin_request"
        request = getattr(self._local, local, None)
        if request is None:  # one infer request per thread: concurrent predict is safe
            request = compiled.create_infer_request()
            setattr(self._local, local, request)
        try:
            request.infer({k: np.ascontiguousarray(v) for k, v in inputs.items()})
        except RuntimeError as e:  # OpenVINO reports a bad input and a failed kernel alike
            raise run_error("openvino", e, bad_input=not self._fits(inputs)) from None
        if self._profile is not None:
            self._add_profile(request.profiling_info)
        out, big = self._outputs(request, compiled, hand_over=True)
        if big:  # dropped: it no longer holds (nor writes into) the outputs handed over
            setattr(self._local, local, None)
        return out

    def _outputs(self, request, compiled, hand_over: bool) -> tuple[dict, bool]:
        """The request's outputs as arrays it will not write to again, and whether they are
        big. Small ones are copied (the request is reused); big ones are handed over when the
        caller then drops the request, so one window's logits (0.9 GB) exist once, not twice
        with the request's own buffer kept until its next run."""
        tensors = [request.get_tensor(out) for out in compiled.outputs]
        big = sum(t.byte_size for t in tensors) > BIG_OUTPUT
        return {name: (t.data if big and hand_over else t.data.copy()) for name, t in zip(self.outputs, tensors)}, big

    def _fits(self, inputs: dict) -> bool:
        """Whether every array has a shape the compiled graph accepts."""
        ports = {port_name(p): p for p in self.compiled.inputs}
        return all(k in ports and ports[k].get_partial_shape().compatible(ov.PartialShape(list(np.shape(v))))
                   for k, v in inputs.items())

    def run_many(self, chunks: list[dict]) -> list[dict]:
        """Several requests in flight, one per stream, in order. In throughput mode each
        stream owns only its share of the cores: whole rounds run on the streams, what
        would leave a stream idle runs after them on all cores (throughput_plan), so
        throughput mode is never slower than latency mode. While other threads' calls are
        in flight the streams are busy anyway: the rest runs on a stream beside them."""
        if self.mode != "throughput" or self.streams == 1:
            return [self.run(c) for c in chunks]
        dynamic = self._batch_is_dynamic()
        on_streams, after = throughput_plan([len(next(iter(c.values()))) for c in chunks], self.streams, dynamic)
        pieces = split_batches(chunks, on_streams + after) if dynamic else list(chunks)
        first, rest = pieces[:len(on_streams)], pieces[len(on_streams):]
        with self._calls_lock:
            self._calls += 1
        try:
            out = self._run_async(first) if first else []
            with self._calls_lock:
                alone = self._calls == 1
            return out + [self.run(c, self._twin if alone else None) for c in rest]
        finally:
            with self._calls_lock:
                self._calls -= 1

    def _run_async(self, chunks: list[dict]) -> list[dict]:
        """OpenVINO's own queue of one infer request per stream, kept for the backend's life:
        no Python threads (a fresh thread pool per call, each thread making its own infer
        request while others ran, was seen to deadlock under load)."""
        with self._queue_lock:
            if self._queue is None:
                self._queue = ov.AsyncInferQueue(self.compiled, self.streams)
            results: list = [None] * len(chunks)
            big = []

            def done(request, i):
                results[i], large = self._outputs(request, self.compiled, hand_over=False)
                big.append(large)
                if self._profile is not None:
                    self._add_profile(request.profiling_info)
            self._queue.set_callback(done)
            try:
                for i, c in enumerate(chunks):
                    self._queue.start_async({k: np.ascontiguousarray(v) for k, v in c.items()}, i)
                self._queue.wait_all()
            except RuntimeError as e:
                raise run_error("openvino", e, bad_input=not all(self._fits(c) for c in chunks)) from None
            if any(big):  # the queue's requests would hold their big outputs until the next call
                self._queue = None
            if any(r is None for r in results):
                raise run_error("openvino", RuntimeError("an infer request of the queue returned no result"))
            return results

    def _batch_is_dynamic(self) -> bool:
        return all(p.get_partial_shape().rank.is_static and p.get_partial_shape()[0].is_dynamic
                   for p in self.compiled.inputs)

    def _add_profile(self, infos) -> None:
        """OpenVINO reports the last inference only: keep each run's times per node, with
        the kernel that ran (e.g. brgemm_avx512_amx_I8: the precision and ISA really used)."""
        self._profile.append({i.node_name: (i.node_type, i.exec_type, i.real_time.total_seconds() * 1000.0)
                              for i in infos if i.status == ov.ProfilingInfo.Status.EXECUTED})

    def profile(self, skip_runs: int = 1) -> list[dict]:
        """Time per executed node over the runs so far, without the first `skip_runs`."""
        rows: dict = {}
        for run in (self._profile or [])[skip_runs:]:
            for node, (op, kernel, ms) in run.items():
                row = rows.setdefault(node, {"op": op, "exec": kernel, "ms": 0.0, "calls": 0})
                row["ms"] += ms
                row["calls"] += 1
        return [{"node": k, **v} for k, v in rows.items()]

    def describe(self) -> dict:
        info = {"backend": "openvino", "version": ov.get_version(), "device": self.device, "mode": self.mode,
                "execution_devices": list(self.compiled.get_property("EXECUTION_DEVICES"))}
        try:
            info["inference_precision"] = precision_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        except RuntimeError:
            pass
        if self.device == "cpu":
            info["threads"] = self.compiled.get_property("INFERENCE_NUM_THREADS")
        info["streams"] = self.streams
        if self.mode == "throughput":  # rounds that cannot fill the streams run on all cores
            info["latency_twin"] = self._twin is not None
        return info


BACKEND = OpenVINOBackend
