"""Streaming: frames in (capture card, file, image sequence), timestamped results out.

A reader thread fills a bounded queue; when inference is slower than the source,
frames are dropped by policy and counted, so memory never grows. Clip models keep a
ring buffer of the last T sampled frames and answer every `stride` sampled frames;
frame models answer every `stride` frames."""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

from ..errors import InputError
from ..io.video import DecodeStats, iter_frames

log = logging.getLogger("omedge.stream")
_END = object()


@dataclass
class StreamStats:
    frames_in: int = 0
    frames_used: int = 0
    dropped: int = 0
    corrupt: int = 0
    size_changes: int = 0
    results: int = 0
    padded_frames: int = 0


class TimeSampler:
    """Keep one frame per `interval` seconds of source time (the official rate of 32
    frames at 30 fps is one frame every 1.067 s, whatever the file's own rate)."""

    TOLERANCE = 0.005  # seconds: containers round timestamps (often to 1 ms)

    def __init__(self, interval: float):
        self.interval, self.next_t = interval, None

    def take(self, t: float) -> bool:
        if self.next_t is not None and t + self.TOLERANCE < self.next_t:
            return False
        self.next_t = (t if self.next_t is None else self.next_t) + self.interval
        while self.next_t <= t + self.TOLERANCE:  # a gap in the stream: do not emit a burst
            self.next_t += self.interval
        return True


def _reader(source, fps, q: queue.Queue, drop: str, stats: StreamStats, decode: DecodeStats, stop):
    try:
        for t, frame in iter_frames(source, fps, decode):
            if stop.is_set():
                break
            stats.frames_in += 1
            item = (t, frame, time.perf_counter())
            if drop == "block":
                q.put(item)
                continue
            try:
                q.put_nowait(item)
            except queue.Full:
                stats.dropped += 1
                if drop == "oldest":
                    try:
                        q.get_nowait()
                    except queue.Empty:
                        pass
                    q.put_nowait(item)
    except Exception as e:  # handed to the consumer, raised there
        q.put(e)
    q.put(_END)


def stream(predictor, source, stride: int | None = None, fps: float | None = None, queue_size: int = 8,
           drop: str | None = None) -> Iterator[dict]:
    """Results for a stream. source: video path, folder of frames, or an iterable of
    frames / (timestamp_s, frame). drop: "block" (files: never lose a frame),
    "oldest" or "newest" (live sources: keep latency bounded)."""
    n_frames, interval, prepare, make_batch = predictor.stream_plan()
    stride = stride or n_frames
    live = not isinstance(source, (str, bytes)) and not hasattr(source, "is_dir")
    drop = drop or ("oldest" if live else "block")
    if drop not in ("block", "oldest", "newest"):
        raise InputError(f"unknown drop policy '{drop}'", "choose block, oldest or newest")
    sampler = TimeSampler(interval) if interval else None
    stats, decode = StreamStats(), DecodeStats()
    q: queue.Queue = queue.Queue(maxsize=queue_size)
    stop = threading.Event()
    reader = threading.Thread(target=_reader, args=(source, fps, q, drop, stats, decode, stop), daemon=True)
    reader.start()
    window: deque = deque(maxlen=n_frames)
    since_last, index, last_shape = 0, 0, None
    try:
        while True:
            item = q.get()
            if item is _END:
                break
            if isinstance(item, Exception):
                raise item
            t, frame, arrived = item
            if sampler and not sampler.take(t):
                continue
            try:
                x = prepare(frame)
            except InputError as e:
                stats.corrupt += 1
                log.warning("skipping frame at %.3f s: %s", t, e.message)
                continue
            shape = getattr(frame, "shape", None)
            if last_shape is not None and shape is not None and shape[:2] != last_shape[:2]:
                stats.size_changes += 1
            last_shape = shape
            stats.frames_used += 1
            window.append((t, x, arrived))
            since_last += 1
            if len(window) == n_frames and since_last >= stride:
                since_last = 0
                yield _result(predictor, window, make_batch, index, stats)
                index += 1
        if n_frames > 1 and index == 0 and window:  # shorter than one clip: pad as the official loader does
            stats.padded_frames = n_frames - len(window)
            yield _result(predictor, window, make_batch, index, stats)
    finally:
        stop.set()
        stats.corrupt += decode.corrupt
        predictor.last_stream_stats = asdict(stats)


def _result(predictor, window, make_batch, index, stats) -> dict:
    outputs = predictor.run(make_batch([x for _, x, _ in window]), batch_size=1)
    done = time.perf_counter()
    stats.results += 1
    result = {"index": index, "t_start": window[0][0], "t_end": window[-1][0],
              "latency_ms": (done - window[-1][2]) * 1000,
              "outputs": {k: v[0] for k, v in outputs.items()}}
    if stats.padded_frames:
        result["padded_frames"] = stats.padded_frames
    if "logits" in outputs and predictor.labels:
        logits = outputs["logits"][0]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        result.update(label=predictor.labels[int(logits.argmax())], probability=float(p.max()))
    return result
