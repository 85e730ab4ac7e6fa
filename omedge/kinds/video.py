"""Video kind: clips of T frames sampled by source time (Endo-FM), live streams."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError, UsageError
from ..runtime.preprocess import as_items, clip_from_frames, preprocess_frame
from .image import ImageKind, ImagePredictor, stream_report, synthetic_images


class VideoPredictor(ImagePredictor):
    def prepare(self, inputs) -> np.ndarray:
        """Clips (T frames each: a THWC array or a list of frames) -> NCTHW."""
        pre = self.manifest.preprocess
        clips = [inputs] if isinstance(inputs, np.ndarray) and inputs.ndim == 4 else as_items(inputs)
        if clips and isinstance(clips[0], np.ndarray) and clips[0].ndim == 3:
            clips = [clips]  # one clip given as a list of frames
        return np.stack([clip_from_frames([preprocess_frame(f, pre) for f in clip], pre["frames"]) for clip in clips])

    def stream_plan(self):
        pre = self.manifest.preprocess
        return (pre["frames"], pre["sample_rate"] / pre["fps"], lambda f: preprocess_frame(f, pre),
                lambda xs: clip_from_frames(xs, pre["frames"])[None])


class VideoKind(ImageKind):
    name = "video"
    predictor = VideoPredictor

    def export_request(self, spec, preprocess, options):
        """--frames: the clip length; the 8-row time table is resized as the official code does."""
        options = dict(options)
        frames = options.pop("frames", None)
        preprocess, inputs, build = super().export_request(spec, preprocess, options)
        if frames is not None:
            if frames < 1:
                raise UsageError("--frames must be at least 1")
            preprocess = {**preprocess, "frames": frames}
            inputs = [{**i, "shape": [*i["shape"][:2], frames, *i["shape"][3:]]} for i in inputs]
            build["num_frames"] = frames
        return preprocess, inputs, build

    def folder_samples(self, source, pre, limit, name="pixel_values"):
        """The first clip of each video (or frame sub-folder) in `source`, at the model's rate."""
        from ..io.video import VIDEO_SUFFIXES, iter_frames
        from ..runtime.stream import TimeSampler
        from .base import paths_in
        feeds, names = [], []
        for src in paths_in(source, tuple(VIDEO_SUFFIXES), "video")[:limit or None]:
            sampler, frames = TimeSampler(pre["sample_rate"] / pre["fps"]), []
            try:
                for t, frame in iter_frames(src):
                    if sampler.take(t):
                        frames.append(preprocess_frame(frame, pre))
                    if len(frames) == pre["frames"]:
                        break
            except InputError as e:
                raise InputError(f"calibration clip {src} cannot be used: {e.message}", e.hint) from e
            feeds.append({name: clip_from_frames(frames, pre["frames"])[None]})
            names.append(str(src))
        return feeds, names

    def synthetic_samples(self, n, seed, pre, name="pixel_values"):
        frames = synthetic_images(n * pre["frames"], seed, size=256)
        return [{name: clip_from_frames([preprocess_frame(f, pre) for f in frames[i::n]], pre["frames"])[None]}
                for i in range(n)]

    def add_cli_arguments(self, parser):
        """--stride is the image kind's (frame models stream too)."""

    def cli_predict(self, p, args, ui) -> int:
        missing = [i for i in args.inputs if not Path(i).exists()]
        if missing:
            raise InputError(f"video not found: {missing[0]}")
        return stream_report(p, args, ui)


KIND = VideoKind()
