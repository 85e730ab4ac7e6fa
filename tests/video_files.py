"""Short synthetic videos written with PyAV for the streaming tests."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np


def frame_at(i: int, size=(120, 160)) -> np.ndarray:
    """A frame whose content changes over time (a moving bright square on a gradient)."""
    h, w = size
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    img[..., 2] = (i * 7) % 256
    y, x = (i * 3) % (h - 20), (i * 5) % (w - 20)
    img[y:y + 20, x:x + 20] = 255
    return img


def write_video(path: Path, n_frames: int, fps: int = 30, size=(120, 160), times: list[float] | None = None) -> Path:
    """H.264 (or MPEG-4) file; `times` (seconds) gives variable frame timing."""
    import av
    with av.open(str(path), "w") as out:
        try:
            stream = out.add_stream("libx264", rate=fps)
            stream.options = {"crf": "18", "preset": "ultrafast"}
        except Exception:
            stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[1], size[0], "yuv420p"
        stream.time_base = Fraction(1, 1000)
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(frame_at(i, size), format="rgb24")
            frame.pts = int(round((times[i] if times else i / fps) * 1000))
            frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
