"""Streaming: frames in (capture card, file, image sequence), timestamped results out.

A reader thread fills a bounded queue; when inference is slower than the source,
frames are dropped by policy and counted, so memory never grows. Frame models answer
every `stride` frames. Clip models take their frames as the official test loader does
(ClipSampler) and answer once per clip; a `stride` under T (in sample slots) overlaps
the clips."""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

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


def linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n) in float32 as torch's AVX2/AVX-512 CPU kernels compute it:
    step = (end - start) / (n - 1), the first half start + step * i, the second end - step *
    (n - 1 - i), each a fused multiply-add (one rounding), so truncating it gives the loader's
    frame indices exactly."""
    f = np.float32
    s, e = f(start), f(end)
    if n == 1:
        return np.array([s], f)
    step = np.float64((e - s) / f(n - 1))
    i = np.arange(n)
    up, down = np.float64(s) + step * i, np.float64(e) - step * (n - 1 - i)  # exact in float64
    return np.where(i < n // 2, up, down).astype(f)


@dataclass
class _Clip:
    start: float
    x: np.ndarray | None  # slot targets (positions); None: computed per slot (times)
    bound: float | None
    ids: list = field(default_factory=list)


class ClipSampler:
    """Which source frames make each clip, as Endo-FM's test loader chooses them.

    Clip k starts at s_k = (first key) + k * hop and spans `span` keys; slot j takes the
    latest frame whose key is at or before x_j:
      files and frame folders (keys are frame positions): x = torch.linspace(s_k, s_k +
        span - 1, T) in float32, i.e. frame trunc(x_j) (decoder.temporal_sampling's
        .long()); span = T * sample_rate / fps * the file's average fps (256 at 30 fps), so
        clip 0 is frames 0, 36, 72, 109, 145, 182, 218, 255;
      live sources (keys are timestamps, s): x_j = s_k + j * (span - dt) / (T - 1) with
        span = T * sample_rate / fps seconds and dt the frame interval (1/fps when given,
        else the mean interval seen so far): the same linspace over the window's source
        time, which picks the file rule's frames from a regular stream.
    Slots past the end of the source take the last frame (the loader clamps its indices).
    `bound` (files, clip 0): the end, in seconds, of pyav_decode's decode range; the first
    frame after it fills the remaining slots, as the one extra frame it decodes does.
    A clip wholly inside a gap of a live source is skipped, so a gap gives no burst."""

    TOLERANCE = 0.001  # s: containers round timestamps, often to 1 ms

    def __init__(self, n: int, span: float, hop: float, positions: bool = True, dt: float | None = None,
                 bound: float | None = None):
        self.n, self.span, self.hop, self.positions, self.dt, self.bound = n, span, hop, positions, dt, bound
        self.clips: list[_Clip] = []
        self.k, self.count, self.first, self.last, self.prev = 0, 0, None, None, None

    def _step(self) -> float:
        if self.positions:
            return 1.0
        if self.dt:
            return self.dt
        return (self.last - self.first) / (self.count - 1) if self.count > 1 else 0.0

    def _tol(self) -> float:
        return 0.0 if self.positions else min(self.TOLERANCE, self._step() / 4 or self.TOLERANCE)

    def _target(self, clip: _Clip, j: int) -> float:
        if clip.x is not None:
            return float(clip.x[j])
        return clip.start + (j * (self.span - self._step()) / (self.n - 1) if self.n > 1 else 0.0)

    def _open(self, key: float):
        while self.first + self.k * self.hop <= key + self._tol():
            start = self.first + self.k * self.hop
            x = linspace_f32(start, start + self.span - 1, self.n) if self.positions else None
            clip = _Clip(start, x, self.bound if self.k == 0 else None)
            self.k += 1
            if self.k == 1 or self._target(clip, self.n - 1) + self._tol() >= key:
                self.clips.append(clip)

    def push(self, fid: int, key: float, t: float) -> tuple[set, list[list[int]]]:
        """Frame `fid` (key: position or timestamp; t: seconds) arrives. Returns the frames
        chosen now (the previous one, whose slots this arrival closes, and, at the decode
        bound, this one) and the clips now complete, as lists of frame ids."""
        if self.first is None:
            self.first = key
        self.count, self.last = self.count + 1, key
        self._open(key)
        chosen, done = set(), []
        for clip in list(self.clips):
            while len(clip.ids) < self.n and key > self._target(clip, len(clip.ids)) + self._tol():
                clip.ids.append(self.prev)
                chosen.add(self.prev)
            if len(clip.ids) < self.n and clip.bound is not None and t > clip.bound:
                clip.ids += [fid] * (self.n - len(clip.ids))
                chosen.add(fid)
            if len(clip.ids) == self.n:
                self.clips.remove(clip)
                done.append(clip.ids)
        self.prev = fid
        return chosen, done

    def finish(self) -> list[tuple[list[int], int]]:
        """The clips still open when the source ends, their empty slots given the last frame
        (the loader's clamp): [(frame ids, slots that lay past the last frame)]."""
        out = []
        for clip in self.clips:
            missing = range(len(clip.ids), self.n)
            past = sum(self._target(clip, j) >= self.last + self._step() for j in missing)
            out.append((clip.ids + [self.prev] * len(missing), past))
        self.clips = []
        return out

    def referenced(self) -> set:
        return {i for clip in self.clips for i in clip.ids} | {self.prev}


@dataclass
class ClipPlan:
    """How a clip model samples a source: `frames` over `seconds` of source time (frames *
    sample_rate / fps), `check` vets a frame cheaply on arrival, `clock(path, seconds)` gives a
    file's (average fps, decode bound in s or None)."""
    frames: int
    seconds: float
    check: Callable
    clock: Callable

    def sampler(self, source, fps: float | None, stride: int) -> ClipSampler:
        if isinstance(source, (str, Path)):
            path = Path(source)
            rate, bound = (fps or 30.0, None) if path.is_dir() else self.clock(path, self.seconds)
            span = self.seconds * rate  # the loader's sampling_rate * num_frames / target_fps * fps
            return ClipSampler(self.frames, span, stride * span / self.frames, bound=bound)
        return ClipSampler(self.frames, self.seconds, stride * self.seconds / self.frames, positions=False,
                           dt=1 / fps if fps else None)


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


def _drain(q: queue.Queue):
    while True:
        item = q.get()
        if item is _END:
            return
        if isinstance(item, Exception):
            raise item
        yield item


def stream(predictor, source, stride: int | None = None, fps: float | None = None, queue_size: int = 8,
           drop: str | None = None) -> Iterator[dict]:
    """Results for a stream. source: video path, folder of frames, or an iterable of
    frames / (timestamp_s, frame). drop: "block" (files: never lose a frame),
    "oldest" or "newest" (live sources: keep latency bounded). Clip models pick each
    clip's frames by position in files and folders, by timestamp in live sources
    (ClipSampler); stride (default T) is the hop between clips in slots of span / T."""
    n_frames, sampling, prepare, make_batch = predictor.stream_plan()
    stride = stride or n_frames
    if not isinstance(stride, int) or stride < 1:
        raise InputError(f"stride must be a positive integer, got {stride!r}")
    live = not isinstance(source, (str, bytes)) and not hasattr(source, "is_dir")
    drop = drop or ("oldest" if live else "block")
    if drop not in ("block", "oldest", "newest"):
        raise InputError(f"unknown drop policy '{drop}'", "choose block, oldest or newest")
    sampler = sampling.sampler(source, fps, stride) if sampling else None
    stats, decode = StreamStats(), DecodeStats()
    q: queue.Queue = queue.Queue(maxsize=queue_size)
    stop = threading.Event()
    reader = threading.Thread(target=_reader, args=(source, fps, q, drop, stats, decode, stop), daemon=True)
    reader.start()
    try:
        if sampler is None:
            windows = _frame_windows(_drain(q), prepare, stride, stats)
        else:
            windows = clip_windows(_drain(q), sampler, sampling.check, prepare, stats)
        for index, (window, padded) in enumerate(windows):
            stats.padded_frames = padded or stats.padded_frames
            yield _result(predictor, window, make_batch, index, stats)
    finally:
        stop.set()
        stats.corrupt += decode.corrupt
        predictor.last_stream_stats = asdict(stats)


def _skip(t, e: InputError, stats: StreamStats):
    stats.corrupt += 1
    log.warning("skipping frame at %.3f s: %s", t, e.message)


def _note_size(frame, last_shape, stats: StreamStats):
    shape = getattr(frame, "shape", None)
    if last_shape is not None and shape is not None and shape[:2] != last_shape[:2]:
        stats.size_changes += 1
    return shape


def _frame_windows(items, prepare, stride: int, stats: StreamStats):
    """Frame models: every frame prepared, one window per `stride` frames."""
    since, last_shape = 0, None
    for t, frame, arrived in items:
        try:
            x = prepare(frame)
        except InputError as e:
            _skip(t, e, stats)
            continue
        last_shape = _note_size(frame, last_shape, stats)
        stats.frames_used += 1
        since += 1
        if since >= stride:
            since = 0
            yield [(t, x, arrived)], 0


def clip_windows(items, sampler: ClipSampler, check, prepare, stats: StreamStats):
    """(t, frame, arrived) items -> ([(t, CHW, arrived)] * T, padded slots) per clip. Frames
    are vetted on arrival and prepared only once a clip chooses them, once however many
    overlapping clips share them. Only a source shorter than its first clip gives a padded
    clip (the official loader's clamp); later unfinished clips are dropped."""
    cache, last, last_shape, fid, yielded = {}, None, None, -1, False

    def ready(i, item):
        if i not in cache:
            cache[i] = (item[0], prepare(item[1]), item[2])
            stats.frames_used += 1
    for t, frame, arrived in items:
        try:
            frame = check(frame)
        except InputError as e:
            _skip(t, e, stats)
            continue
        last_shape = _note_size(frame, last_shape, stats)
        fid += 1
        chosen, done = sampler.push(fid, fid if sampler.positions else t, t)
        for i in chosen:
            ready(i, last if i == fid - 1 else (t, frame, arrived))
        for ids in done:
            yielded = True
            yield [cache[i] for i in ids], 0
        last = (t, frame, arrived)
        for i in set(cache) - sampler.referenced():
            del cache[i]
    for ids, past in sampler.finish():
        if past and yielded:
            continue
        ready(fid, last)
        yielded = True
        yield [cache[i] for i in ids], past


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
