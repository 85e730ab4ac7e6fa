"""Predictor: a verified bundle + the best backend here, behind one `predict`."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..bundle import read_manifest, verify_files
from ..errors import BackendUnavailableError, InputError, OmedgeError
from .backend import backend_class
from .preprocess import as_items, clip_from_frames, preprocess, preprocess_frame

DEVICES = ("auto", "cpu", "cuda", "gpu", "npu")
BACKENDS = ("auto", "onnxruntime", "openvino")


class Predictor:
    def __init__(self, bundle, device="auto", backend="auto", threads=None, artifact=None, mode="latency"):
        from ..devices import plan
        if device not in DEVICES:
            raise InputError(f"unknown device '{device}'", f"choose one of {', '.join(DEVICES)}")
        if backend not in BACKENDS:
            raise InputError(f"unknown backend '{backend}'", f"choose one of {', '.join(BACKENDS)}")
        if mode not in ("latency", "throughput"):
            raise InputError(f"unknown mode '{mode}'", "choose latency or throughput")
        self.path = Path(bundle)
        self.manifest = read_manifest(self.path)
        verify_files(self.path, self.manifest)  # every hash, before anything is loaded
        artifacts = self.manifest["artifacts"]
        if artifact is not None:
            artifacts = [a for a in artifacts if a["name"] == artifact]
            if not artifacts:
                names = ", ".join(a["name"] for a in self.manifest["artifacts"])
                raise InputError(f"bundle has no artifact '{artifact}'", f"it has: {names}")
        candidates, self.skipped = plan(artifacts, device, backend)
        self.backend = None
        for art, name, dev in candidates:
            options = {**art.get("runtime", {}).get(name, {}), "threads": threads, "mode": mode}
            files = {"model": self.path / art["entry"]}
            try:
                self.backend = backend_class(name)(files, dev, options)
            except (OmedgeError, RuntimeError) as e:
                if device != "auto" and backend != "auto":
                    raise BackendUnavailableError(f"{name} could not open {art['name']} on {dev}: {e}") from e
                self.skipped.append(f"{name} on {dev} ({art['name']}): failed to start: {e}")
                continue
            self.artifact = art
            break
        if self.backend is None:
            raise BackendUnavailableError(
                f"nothing in {self.path.name} can run here with device={device}, backend={backend}",
                "; ".join(self.skipped) or "the bundle lists no artifacts")
        self.input_name = self.manifest["input"]["name"]
        self.labels = self.manifest.get("labels")

    def run(self, batch: np.ndarray, batch_size: int = 8) -> dict:
        """Run preprocessed NCHW float32 arrays, in chunks of `batch_size`."""
        step = min(batch_size, self.backend.max_batch or batch_size)
        chunks = [{self.input_name: batch[i:i + step].astype(np.float32)} for i in range(0, len(batch), step)]
        parts = self.backend.run_many(chunks)
        if len(parts) == 1:  # no copy (a 3-D window's logits can be a GB)
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def predict(self, images, batch_size: int = 8, return_dict: bool = False):
        """Images (paths, PIL images, HWC arrays, or a list / NHWC batch of them) ->
        the primary output, one row per image (a dict of all outputs with return_dict)."""
        outputs = self.run(self.prepare(images), batch_size)
        if return_dict:
            if "logits" in outputs and self.labels:
                outputs["probabilities"] = _softmax(outputs["logits"])
                outputs["labels"] = [self.labels[i] for i in outputs["logits"].argmax(-1)]
            return outputs
        return outputs[self.manifest["primary_output"]]

    def prepare(self, inputs) -> np.ndarray:
        """Images -> NCHW; for clip models, clips (T frames each: a THWC array or a list
        of frames) -> NCTHW."""
        pre = self.manifest["preprocess"]
        if pre.get("kind") != "video":
            return preprocess(inputs, pre)
        clips = [inputs] if isinstance(inputs, np.ndarray) and inputs.ndim == 4 else as_items(inputs)
        if clips and isinstance(clips[0], np.ndarray) and clips[0].ndim == 3:
            clips = [clips]  # one clip given as a list of frames
        return np.stack([clip_from_frames([preprocess_frame(f, pre) for f in clip], pre["frames"])
                         for clip in clips])

    def segment(self, volume, tta: bool = False, batch_size: int = 2, progress=None):
        """A CT/MR volume (NIfTI path, DICOM series folder or io.volume.Volume) -> label
        map on the input's grid (NIfTI voxel order) and the Volume it belongs to."""
        from ..io.volume import Volume, read_volume
        from .volume import segment
        pre = self.manifest["preprocess"]
        if pre.get("kind") != "volume":
            raise InputError(f"{self.path.name} is not a segmentation bundle")
        vol = volume if isinstance(volume, Volume) else read_volume(volume)
        labels = segment(vol, lambda b: self.run(b, batch_size=batch_size)["logits"], pre,
                         batch_size=batch_size, mirror=tta, progress=progress)
        return labels, vol

    def stream(self, source, stride: int | None = None, fps: float | None = None, queue_size: int = 8,
               drop: str | None = None):
        """Timestamped results for a video file, a folder of frames or a live iterator
        of frames; see omedge.runtime.stream. Counters: `last_stream_stats`."""
        from .stream import stream
        return stream(self, source, stride=stride, fps=fps, queue_size=queue_size, drop=drop)

    def describe(self) -> dict:
        """What really runs: read back from the backend session, not assumed."""
        m = self.manifest
        return {"bundle": str(self.path), "model": m["model"]["id"], "variant": m["model"]["variant"],
                "weights": m["weights"]["source"], "artifact": self.artifact["name"],
                "format": self.artifact["format"], "precision": self.artifact["precision"],
                **self.backend.describe(), "parity": self.artifact.get("parity", {}).get("passed"),
                "skipped": self.skipped}


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
