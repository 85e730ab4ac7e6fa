"""Synthetic whole-slide images written with tifffile, tile by tile (never whole in memory):
tissue-like stained rectangles on white glass, an optional blue marker-pen stroke, as an
Aperio SVS (ImageDescription `Aperio ...|MPP = ...|`), a generic pyramidal TIFF with
resolution tags (SubIFDs), or a flat stripped TIFF. Levels are painted from the same
level-0 geometry, so every level shows the same slide."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

WHITE = 242


@dataclass
class Layout:
    """Level-0 geometry: tissue rectangles and pen rectangles (x0, y0, x1, y1)."""
    width: int
    height: int
    tissue: list = field(default_factory=list)
    pen: list = field(default_factory=list)

    def truth(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """True where (level-0) x, y lies in tissue."""
        inside = np.zeros(np.broadcast(x, y).shape, bool)
        for x0, y0, x1, y1 in self.tissue:
            inside |= (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
        return inside


def paint(layout: Layout, x0: int, y0: int, w: int, h: int, ds: float) -> np.ndarray:
    """RGB uint8 of the region whose top-left is level-0 (x0, y0), w x h px at downsample ds.
    Every pattern is separable in x and y, so painting costs a few array passes per tile."""
    x = (x0 + (np.arange(w) + 0.5) * ds)[None, :]
    y = (y0 + (np.arange(h) + 0.5) * ds)[:, None]
    img = np.empty((h, w, 3), np.float32)
    img[:] = (WHITE - 4 * np.sin(x / 37.0) * np.cos(y / 29.0))[..., None]
    texture = (np.sin(x / 5.3) * np.sin(y / 4.1) + np.sin(x / 11.0) * np.cos(y / 11.0)
               + np.cos(x / 11.0) * np.sin(y / 11.0)) * 18
    tissue = layout.truth(x, y)
    if tissue.any():
        for c, (base, gain) in enumerate(((190, 1.0), (95, 0.8), (165, 0.5))):   # H&E pink/purple
            img[..., c] = np.where(tissue, base + texture * gain, img[..., c])
    for px0, py0, px1, py1 in layout.pen:
        img[((x >= px0) & (x < px1)) & ((y >= py0) & (y < py1))] = (35, 70, 170)   # blue marker
    img[((x >= layout.width) | (y >= layout.height)) & np.ones((h, w), bool)] = 0  # tile padding past the edge
    return np.clip(img, 0, 255).astype(np.uint8)


def _tiles(layout: Layout, ds: float, tile: int):
    """Level tiles in row-major order; tiles of bare glass (most of a slide) are one cached
    flat tile, so a 40,000 px slide is written in minutes."""
    w, h = int(layout.width // ds), int(layout.height // ds)
    glass = np.full((tile, tile, 3), WHITE, np.uint8)
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            x0, y0, x1, y1 = tx * ds, ty * ds, (tx + tile) * ds, (ty + tile) * ds
            busy = any(a < x1 and c > x0 and b < y1 and d > y0 for a, b, c, d in layout.tissue + layout.pen)
            inside = x1 <= layout.width and y1 <= layout.height
            yield paint(layout, int(x0), int(y0), tile, tile, ds) if busy or not inside else glass


def _flat_strips(layout: Layout, rows: int):
    """zlib-encoded strips (tifffile would want the whole page for a stripped write); rows
    away from any tissue or pen are plain glass, encoded once, so a huge file is cheap."""
    import zlib
    h, w = layout.height, layout.width
    glass = {}
    for y in range(0, h, rows):
        n = min(rows, h - y)
        spans = [(x0, x1) for x0, y0, x1, y1 in layout.tissue + layout.pen if y0 < y + n and y1 > y]
        if spans:
            strip = np.full((n, w, 3), WHITE, np.uint8)
            x0, x1 = min(s[0] for s in spans), max(s[1] for s in spans)
            strip[:, x0:x1] = paint(layout, x0, y, x1 - x0, n, 1.0)
            yield zlib.compress(strip.tobytes(), 1)
        else:
            if n not in glass:
                glass[n] = zlib.compress(np.full((n, w, 3), WHITE, np.uint8).tobytes(), 1)
            yield glass[n]


def write_slide(path: Path, layout: Layout, mpp: float | None = 0.25, downsamples=(1, 4, 16), tile: int = 256,
                compression: str = "jpeg", style: str = "svs") -> Path:
    """`style`: "svs" (Aperio pages: baseline, thumbnail, levels), "generic" (SubIFD pyramid
    with resolution tags), "flat" (one stripped page, no pyramid, resolution tags)."""
    import tifffile
    path = Path(path)
    sizes = [(int(layout.height // d), int(layout.width // d)) for d in downsamples]
    opts = {"photometric": "rgb", "compression": compression, "metadata": None}
    res = {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        if style == "flat":
            tw.write(_flat_strips(layout, 64), shape=(*sizes[0], 3), dtype=np.uint8, rowsperstrip=64,
                     **{**opts, "compression": "zlib"}, **res)
            return path
        if style == "svs":
            mpp_txt = f"|MPP = {mpp}" if mpp else ""
            desc = f"Aperio Image Library v12.0.15\n{layout.width}x{layout.height} [0,0 {layout.width}x{layout.height}]" \
                   f" ({tile}x{tile}) JPEG/RGB Q=80|AppMag = 40{mpp_txt}|Filename = synthetic"
            tw.write(_tiles(layout, 1.0, tile), shape=(*sizes[0], 3), dtype=np.uint8, tile=(tile, tile),
                     description=desc, **opts)
            th = max(downsamples[-1], 32)
            thumb = paint(layout, 0, 0, int(layout.width // th), int(layout.height // th), th)
            tw.write(thumb, description=f"Aperio Image Library v12.0.15\n{desc.split(chr(10))[1]} -> thumbnail",
                     **opts)
            for d, size in zip(downsamples[1:], sizes[1:]):
                tw.write(_tiles(layout, d, tile), shape=(*size, 3), dtype=np.uint8, tile=(tile, tile),
                         description=f"Aperio Image Library v12.0.15\n{layout.width}x{layout.height} -> "
                         f"{size[1]}x{size[0]}{mpp_txt}", **opts)
            return path
        tw.write(_tiles(layout, 1.0, tile), shape=(*sizes[0], 3), dtype=np.uint8, tile=(tile, tile),
                 subifds=len(downsamples) - 1, **opts, **res)
        for d, size in zip(downsamples[1:], sizes[1:]):
            level_res = {} if mpp is None else {"resolution": (1e4 / (mpp * d),) * 2, "resolutionunit": "CENTIMETER"}
            tw.write(_tiles(layout, d, tile), shape=(*size, 3), dtype=np.uint8, tile=(tile, tile),
                     subfiletype=1, **opts, **level_res)
    return path


def corrupt_tile(path: Path, x: int, y: int) -> int:
    """Overwrite the stored bytes of the level-0 tile holding level-0 pixel (x, y) with
    zeros, as a damaged disk sector would. Returns the tile's index."""
    import tifffile
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        across = -(-page.imagewidth // page.tilewidth)
        index = (y // page.tilelength) * across + x // page.tilewidth
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * count)
    return index
