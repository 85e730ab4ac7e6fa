"""Video kind: clips of T frames chosen as the official test loader chooses them (Endo-FM),
from files and live streams (omedge.runtime.stream.ClipSampler)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError, UsageError
from ..io.images import read_image
from ..io.video import VIDEO_SUFFIXES
from ..parity import compare, gates_for
from ..runtime.preprocess import as_items, clip_from_frames, preprocess_frame
from ..runtime.stream import ClipPlan
from .image import (
    ImageKind,
    ImagePredictor,
    raw_pictures,
    stream_report,
    synthetic_images,
)

CROP_CHOICES = {"official": "uniform-0", "center": "center"}  # export option -> manifest "crop"


def file_clock(path, seconds: float) -> tuple[float, float | None]:
    """(average fps, end of clip 0's decode range in s, or None) of a video file, as Endo-FM's
    pyav_decode reads them: fps = average_rate; the range ends at pts int((span - 1) *
    duration / frames) with span = seconds * fps; no range when the stream gives no duration
    or frame count (the loader then decodes everything). Files that do not open get 30 fps;
    reading them fails later, with the reader's message."""
    import av
    try:
        with av.open(str(path)) as container:
            s = container.streams.video[0]
            fps = float(s.average_rate) if s.average_rate else 30.0
            if s.duration is None or not s.frames or s.time_base is None:
                return fps, None
            return fps, int((seconds * fps - 1) * (s.duration / s.frames)) * float(s.time_base)
    except (av.error.FFmpegError, IndexError, OSError):
        return 30.0, None


def clip_plan(pre: dict) -> ClipPlan:
    """The manifest's sampling as a ClipPlan: `frames` over frames * sample_rate / fps s."""
    if pre.get("sampling", "linspace") != "linspace":
        raise InputError(f"unknown clip sampling '{pre['sampling']}' in the manifest",
                         "re-export the bundle with this omedge version")
    return ClipPlan(pre["frames"], pre["sample_rate"] * pre["frames"] / pre["fps"],
                    check=lambda f: read_image(f, pre.get("grayscale", "replicate"), pre.get("alpha", "drop")),
                    clock=file_clock)


def first_clip(source, pre: dict) -> np.ndarray:
    """CTHW: the first clip of a video file or frame folder, as the official test loader
    (single clip, clip_idx 0) takes it."""
    from ..io.video import iter_frames
    from ..runtime.stream import StreamStats, clip_windows
    plan = clip_plan(pre)
    windows = clip_windows(((t, f, 0.0) for t, f in iter_frames(source)), plan.sampler(source, None, pre["frames"]),
                           plan.check, lambda f: preprocess_frame(f, pre), StreamStats())
    try:
        window, _ = next(windows, (None, 0))
    finally:
        windows.close()
    if window is None:
        raise InputError(f"{source} has no decodable frames")
    return clip_from_frames([x for _, x, _ in window], pre["frames"])


class VideoPredictor(ImagePredictor):
    def prepare(self, inputs) -> np.ndarray:
        """Clips (T frames each: a THWC array or a list of frames) -> NCTHW."""
        pre = self.manifest.preprocess
        clips = [inputs] if isinstance(inputs, np.ndarray) and inputs.ndim == 4 else as_items(inputs)
        if clips and isinstance(clips[0], np.ndarray) and clips[0].ndim == 3:
            clips = [clips]  # one clip given as a list of frames
        return np.stack([clip_from_frames([preprocess_frame(f, pre) for f in clip], pre["frames"]) for clip in clips])

    def stream_plan(self):
        """(frames per clip, how clips are sampled, frame -> CHW, frames -> batch)."""
        pre = self.manifest.preprocess
        return (pre["frames"], clip_plan(pre), lambda f: preprocess_frame(f, pre),
                lambda xs: clip_from_frames(xs, pre["frames"])[None])


class VideoKind(ImageKind):
    name = "video"
    predictor = VideoPredictor
    batch_suffixes = tuple(sorted(VIDEO_SUFFIXES))
    run_extras = ("video",)

    def export_request(self, spec, preprocess, options):
        """frames: the clip length (the 8-row time table is resized as the official code does).
        crop: "official" (the official evaluation's uniform crop 0, the default) or "center"."""
        options = dict(options)
        frames, crop = options.pop("frames", None), options.pop("crop", None)
        preprocess, inputs, build = super().export_request(spec, preprocess, options)
        if frames is not None:
            if frames < 1:
                raise UsageError("--frames must be at least 1")
            preprocess = {**preprocess, "frames": frames}
            inputs = [{**i, "shape": [*i["shape"][:2], frames, *i["shape"][3:]]} for i in inputs]
            build["num_frames"] = frames
        if crop is not None:
            if crop not in CROP_CHOICES:
                raise UsageError(f"unknown crop '{crop}'", "choose official (the official evaluation's "
                                 "left/top crop, the default) or center")
            preprocess = {**preprocess, "crop": CROP_CHOICES[crop]}
            if crop == "center":
                preprocess["crop_note"] = ("centre crop chosen at export; the official evaluation takes "
                                           "uniform crop 0 (left, or top for portrait frames)")
        return preprocess, inputs, build

    def folder_samples(self, source, pre, limit, name="pixel_values"):
        """The first clip of each video (or frame sub-folder) in `source`, as the official
        test loader takes it."""
        from ..io.video import VIDEO_SUFFIXES
        from .base import paths_in
        feeds, names = [], []
        for src in paths_in(source, tuple(VIDEO_SUFFIXES), "video")[:limit or None]:
            try:
                feeds.append({name: first_clip(src, pre)[None]})
            except InputError as e:
                raise InputError(f"calibration clip {src} cannot be used: {e.message}", e.hint) from e
            names.append(str(src))
        return feeds, names

    def synthetic_samples(self, n, seed, pre, name="pixel_values"):
        frames = synthetic_images(n * pre["frames"], seed, size=256)
        return [{name: clip_from_frames([preprocess_frame(f, pre) for f in frames[i::n]], pre["frames"])[None]}
                for i in range(n)]

    def pipeline_reference(self, run_torch, pre, seed):
        """A raw clip (frames of an odd size) and the torch outputs for it, so `omedge
        verify` runs the manifest's frame preprocessing too (the image kind's check, for
        clips: its raw pictures are not one clip)."""
        frames = raw_clip(seed + 5, pre["frames"])
        out = run_torch(clip_from_frames([preprocess_frame(f, pre) for f in frames], pre["frames"])[None])
        return {"raw_clip": np.stack(frames), **{f"raw_reference.{k}": v for k, v in out.items()}}

    def pipeline_check(self, run, stored, pre, gate):
        keys = list(stored.files if hasattr(stored, "files") else stored)
        if "raw_clip" not in keys:
            return {}, []
        frames = list(np.asarray(stored["raw_clip"]))
        got = run(clip_from_frames([preprocess_frame(f, pre) for f in frames], pre["frames"])[None])
        reference = {k.split(".", 1)[1]: np.asarray(stored[k]) for k in keys if k.startswith("raw_reference.")}
        result = compare(reference, got, gates_for(gate), classify=("logits",))
        failures = [f"from a raw clip through the manifest's preprocessing: {f}" for f in result["failures"]]
        return {"raw_pipeline": {"clips": 1, "outputs": result["outputs"]}}, failures

    def add_cli_arguments(self, parser):
        """--stride is the image kind's (frame models stream too)."""

    def cli_predict(self, p, args, ui) -> int:
        missing = [i for i in args.inputs if not Path(i).exists()]
        if missing:
            raise InputError(f"video not found: {missing[0]}")
        return stream_report(p, args, ui)


def raw_clip(seed: int, frames: int) -> list[np.ndarray]:
    """`frames` synthetic RGB frames of 260x300 px drifting sideways, as a camera pans."""
    base = raw_pictures(seed)[0]
    return [np.ascontiguousarray(np.roll(base, 7 * t, axis=1)) for t in range(frames)]


KIND = VideoKind()
