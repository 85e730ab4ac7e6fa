"""Video in: frames with their timestamps, from a file (PyAV) or an image sequence.

Timestamps come from the stream's presentation times, so clip sampling follows real
time even for variable frame rates. A frame that fails to decode is skipped, counted
and reported; the stream goes on."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from .images import IMAGE_SUFFIXES, MAX_PIXELS_ENV, pixel_limit, read_image

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".m4v"}
log = logging.getLogger("omedge.video")


@dataclass
class DecodeStats:
    frames: int = 0
    corrupt: int = 0
    errors: list = field(default_factory=list)


def iter_video(path: str | Path, stats: DecodeStats | None = None) -> Iterator[tuple[float, np.ndarray]]:
    """(timestamp in seconds, RGB uint8 HxWx3) for every decodable frame."""
    import av
    path = Path(path)
    if not path.is_file():
        raise InputError(f"video not found: {path}")
    stats = stats if stats is not None else DecodeStats()
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise InputError(f"{path.name} cannot be opened as a video ({e})") from e
    with container:
        if not container.streams.video:
            raise InputError(f"{path.name} has no video stream")
        stream = container.streams.video[0]
        w, h = stream.codec_context.width or 0, stream.codec_context.height or 0
        if w * h > pixel_limit():  # each decoded frame is allocated at this size: refuse before decoding
            raise InputError(f"{path.name} has {w}x{h} frames, over the {pixel_limit() / 1e6:.1f}-megapixel limit",
                             f"downscale the video first; to allow larger frames set {MAX_PIXELS_ENV}")
        base = float(stream.time_base) if stream.time_base else None
        fps = float(stream.average_rate) if stream.average_rate else 30.0
        index = 0
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as e:  # a damaged packet: skip it, keep going
                stats.corrupt += 1
                stats.errors.append(str(e)[:120])
                log.warning("skipping an undecodable frame in %s: %s", path.name, e)
                continue
            for frame in frames:
                t = frame.pts * base if (frame.pts is not None and base) else index / fps
                index += 1
                stats.frames += 1
                yield float(t), frame.to_ndarray(format="rgb24")


def iter_image_sequence(folder: str | Path, fps: float) -> Iterator[tuple[float, np.ndarray]]:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"no images in {folder}")
    for i, f in enumerate(files):
        yield i / fps, read_image(f)


def iter_frames(source, fps: float | None = None, stats: DecodeStats | None = None):
    """A video file, a folder of frames, or an iterable of frames / (timestamp, frame)."""
    if isinstance(source, (str, Path)):
        p = Path(source)
        if p.is_dir():
            yield from iter_image_sequence(p, fps or 30.0)
            return
        if p.suffix.lower() in VIDEO_SUFFIXES:
            yield from iter_video(p, stats)
            return
        raise InputError(f"{p.name}: not a video ({', '.join(sorted(VIDEO_SUFFIXES))}) or a folder of frames")
    for i, item in enumerate(source):
        if isinstance(item, tuple) and len(item) == 2:
            yield float(item[0]), item[1]
        else:
            yield i / (fps or 30.0), item
