"""Whole-slide images in: pyramid levels, the level for a target µm/px, a tissue mask and
the tile grid at level 0 (x, y of each tile's top-left corner, as CLAM/TRIDENT write them).

SVS/NDPI/pyramidal TIFF go through tiffslide (pure Python), DICOM WSI through wsidicom.
Slides are untrusted and huge: nothing is ever decoded whole. The low-resolution picture
the tissue mask is computed on is read in bands and block-averaged, so a slide without a
pyramid (or a plain stripped TIFF) costs a few tens of MB, not its full size; a file whose
pixels are stored as one giant strip cannot be read in pieces and is refused."""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, UsageError

SLIDE_SUFFIXES = {".svs", ".ndpi", ".scn", ".bif", ".svslide"}   # always slides: `predict` dispatches on them
TIFF_SUFFIXES = {".tif", ".tiff", ".btf"}                        # slides only with --wsi (else plain images)
MAX_CHUNK_PIXELS = 2 ** 26     # one stored tile/strip decoded at a time; larger ones cannot be read in pieces
BAND_PIXELS = 2 ** 21          # pixels per band when the low-resolution picture is built
MPP_TOLERANCE = 0.1            # a level within 10% of the target µm/px is used as it is
THUMB_SIDE = 2048              # longest side of the picture the tissue mask is computed on


def _need(module: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = "wsidicom" if module == "wsidicom" else "wsi"
        raise UsageError(f"reading whole-slide images needs the {module} package",
                         f'pip install "omedge[{extra}]"' if extra == "wsi" else "pip install wsidicom") from None


class Slide:
    """One slide: level sizes and downsamples, the scan's µm/px (None when the file does
    not say), and read(x, y, level, w, h) -> RGB uint8 HWC with x, y at level 0. Each
    reading thread gets its own file handle (the libraries' readers are not thread-safe)."""

    def __init__(self, path: Path, opener, dims, downsamples, mpp, vendor: str):
        self.path, self._opener = path, opener
        self.level_dims, self.level_downsamples = list(dims), [float(d) for d in downsamples]
        self.mpp, self.vendor = mpp, vendor
        self._local, self._handles, self._lock = threading.local(), [], threading.Lock()

    @property
    def dims(self) -> tuple[int, int]:
        return self.level_dims[0]

    def _reader(self):
        if getattr(self._local, "reader", None) is None:
            handle, self._local.reader = self._opener()
            with self._lock:
                self._handles.append(handle)
        return self._local.reader

    def close(self) -> None:
        """Close every thread's file handle (they outlive the threads that opened them)."""
        with self._lock:
            handles, self._handles = self._handles, []
        for h in handles:
            h.close()
        self._local = threading.local()

    def read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        return self._reader()(int(x), int(y), int(level), int(w), int(h))


def open_slide(path) -> Slide:
    """A slide file (or a DICOM WSI folder / .dcm file), refused with a clear message when
    it is not one, or when its pixels cannot be read in pieces."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"slide not found: {path}")
    if path.is_dir() or path.suffix.lower() == ".dcm":
        return _open_dicom(path)
    tiffslide = _need("tiffslide")
    try:
        probe = tiffslide.TiffSlide(path)
        dims, ds = probe.level_dimensions, probe.level_downsamples
        props = dict(probe.properties)
        chunks = _chunk_pixels(probe)
        probe.close()
    except Exception as e:  # noqa: BLE001 - tifffile/tiffslide raise many types for a file that is no TIFF
        raise InputError(f"{path.name} is not a whole-slide image tiffslide can read ({type(e).__name__}: "
                         f"{str(e)[:120]})", "give an SVS/NDPI/pyramidal TIFF slide, or a DICOM WSI folder") from None
    if chunks > MAX_CHUNK_PIXELS:
        raise InputError(f"{path.name} stores its {dims[0][0]}x{dims[0][1]} px as pieces of {chunks / 1e6:.0f} "
                         "megapixels; it cannot be read without decoding them whole",
                         "convert it to a tiled pyramidal TIFF first (e.g. vips tiffsave in.tif out.tif --tile "
                         "--pyramid --compression jpeg)")
    mpp = props.get("tiffslide.mpp-x")

    def opener():
        s = tiffslide.TiffSlide(path)
        return s, lambda x, y, lv, w, h: np.asarray(s.read_region((x, y), lv, (w, h), as_array=True))[..., :3]
    return Slide(path, opener, dims, ds, float(mpp) if mpp else None, props.get("tiffslide.vendor") or "tiff")


def _chunk_pixels(s) -> int:
    """The largest stored piece (tile or strip) of any level, in pixels."""
    group = s.zarr_group
    arrays = [group[k] for k in sorted(group.array_keys())] if hasattr(group, "array_keys") else [group]
    return max(math.prod(a.chunks[:2]) for a in arrays)


def _open_dicom(path: Path) -> Slide:
    """A DICOM WSI (a folder of VL Whole Slide Microscopy instances) through wsidicom;
    its levels are addressed in their own pixels, so level-0 x, y are scaled here."""
    wsidicom = _need("wsidicom")
    try:
        wsi = wsidicom.WsiDicom.open(path)
    except Exception as e:  # noqa: BLE001 - wsidicom's errors for files it cannot use have no common base
        raise InputError(f"{path.name} is not a DICOM whole-slide image wsidicom can read ({str(e)[:120]})",
                         "give the folder holding the slide's DICOM instances") from None
    base = wsi.size.width
    levels = list(wsi.levels)
    dims = [(lv.size.width, lv.size.height) for lv in levels]
    ds = [base / w for w, _ in dims]
    mpp = float(wsi.mpp.width) if wsi.mpp is not None else None
    indexes = [lv.level for lv in levels]
    wsi.close()

    def opener():
        s = wsidicom.WsiDicom.open(path)
        return s, lambda x, y, lv, w, h: np.asarray(s.read_region((round(x / ds[lv]), round(y / ds[lv])), indexes[lv],
                                                               (w, h)).convert("RGB"))
    return Slide(path, opener, dims, ds, mpp, "dicom")


@dataclass(frozen=True)
class LevelPlan:
    """Where tiles come from: `read_size` px at `level`, resized to `tile` when they differ;
    each tile covers `patch_level0` px at level 0 and ends up at `mpp` µm/px."""
    mpp: float
    mpp_requested: float
    mpp_base: float
    mpp_source: str          # "slide" (the file's metadata) or "--mpp-base"
    level: int
    downsample: float
    patch_level0: int
    read_size: int
    tile: int
    resolution: str          # "exact" (a level within 10%), "downsampled" (finer level resized), "nearest"
    note: str

    def attrs(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def plan_level(slide: Slide, mpp: float, tile: int, mpp_base: float | None = None, nearest: bool = False) -> LevelPlan:
    """The level for `mpp` µm/px tiles of `tile` px. A coarser target than any level reads
    the nearest finer level and downsamples; a finer target than the scan is refused (the
    detail is not in the file) unless `nearest`, which reads at the scan's resolution."""
    if not (mpp > 0 and tile >= 16):
        raise UsageError(f"need --mpp > 0 and --tile >= 16, got {mpp} and {tile}")
    base, source = (mpp_base, "--mpp-base") if mpp_base else (slide.mpp, "slide")
    if not base or base <= 0:
        raise InputError(f"{slide.path.name} does not say its resolution (µm/px)",
                         "pass --mpp-base with the scanner's µm/px at full resolution (e.g. 0.25 for 40x)")
    factor, note, resolution = mpp / base, "", None
    if factor < 1 - MPP_TOLERANCE:
        if not nearest:
            raise InputError(f"{slide.path.name} was scanned at {base:.4g} µm/px; {mpp:g} µm/px is finer than any of "
                             "its levels", f"ask for --mpp {base:.4g} or coarser, or pass --mpp-nearest to read tiles "
                             f"at {base:.4g} µm/px (each tile then covers {factor:.2g}x the width asked for)")
        note = f"requested {mpp:g} µm/px is finer than the scan; tiles read at the nearest level ({base:.4g} µm/px)"
        factor, resolution = 1.0, "nearest"
    usable = [i for i, d in enumerate(slide.level_downsamples) if d <= factor * (1 + MPP_TOLERANCE)]
    level = max(usable, key=lambda i: slide.level_downsamples[i])
    ds = slide.level_downsamples[level]
    if abs(ds - factor) <= MPP_TOLERANCE * factor:
        resolution = resolution or "exact"
        return LevelPlan(base * ds, mpp, base, source, level, ds, round(tile * ds), tile, tile, resolution,
                         note or f"level {level} ({base * ds:.4g} µm/px) read as it is")
    patch0 = round(tile * factor)
    return LevelPlan(base * patch0 / tile, mpp, base, source, level, ds, patch0, round(patch0 / ds), tile,
                     "downsampled", f"no level at {mpp:g} µm/px: level {level} ({base * ds:.4g} µm/px) read and "
                     f"resized to {tile} px")


def low_res(slide: Slide, max_side: int = THUMB_SIDE) -> tuple[np.ndarray, float]:
    """(RGB picture of the whole slide with its longest side <= about max_side, level-0 px
    per picture px). Read in bands of rows from the finest level that is small enough,
    block-averaged: memory stays at a band, whatever the slide's size. A level with an
    undecodable tile gives way to the next coarser one (the tiles themselves are read later,
    and a damaged one is skipped there)."""
    w0, h0 = slide.dims
    target = max(1.0, max(w0, h0) / max_side)
    first = max((i for i, d in enumerate(slide.level_downsamples) if d <= target),
                key=lambda i: slide.level_downsamples[i])
    coarser = sorted((i for i, d in enumerate(slide.level_downsamples) if d > slide.level_downsamples[first]),
                     key=lambda i: slide.level_downsamples[i])
    error = None
    for level in [first, *coarser]:
        try:
            return _banded(slide, level, max(1, math.ceil(target / slide.level_downsamples[level] - 1e-6)))
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - the codec's own error for a damaged tile
            error = e
    raise InputError(f"{slide.path.name}: no level can be decoded for the tissue mask ({type(error).__name__}: "
                     f"{str(error)[:100]})", "the file is damaged; re-export or re-scan the slide")


def _banded(slide: Slide, level: int, k: int) -> tuple[np.ndarray, float]:
    w, h = slide.level_dims[level]
    ds = slide.level_downsamples[level]
    out_w, out_h = w // k, h // k
    if out_w < 1 or out_h < 1:
        raise InputError(f"{slide.path.name} is only {slide.dims[0]}x{slide.dims[1]} px: not a whole-slide image")
    band = max(k, BAND_PIXELS // max(w, 1) // k * k)
    rows = []
    for y in range(0, out_h * k, band):
        bh = min(band, out_h * k - y)
        px = slide.read(0, round(y * ds), level, out_w * k, bh)
        rows.append((px.reshape(bh // k, k, out_w, k, 3).sum(axis=3, dtype=np.uint32).sum(axis=1) // (k * k))
                    .astype(np.uint8))
    return np.concatenate(rows), ds * k


@dataclass(frozen=True)
class TissueParams:
    """Tissue detection settings. Areas are in mm² at the slide's scale, so the same values
    work for any scan resolution."""
    min_saturation: float = 0.07    # Otsu's threshold is never below this (a blank slide stays blank)
    min_tissue_mm2: float = 0.01    # specks (dust, debris) smaller than this are removed
    max_hole_mm2: float = 0.01      # holes smaller than this are filled


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the split maximising between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(1, hist.sum())
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m = np.cumsum(p * centers)
    between = (m[-1] * w0 - m) ** 2 / np.maximum(w0 * (1 - w0), 1e-12)
    return float(centers[int(np.argmax(between))])


def pen_marks(rgb: np.ndarray) -> np.ndarray:
    """Marker ink, simply: strong blue (blue well above red, green not below red: H&E's
    purples always have green lowest), strong green, and near-black."""
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    blue = (b > r + 50) & (g >= r)
    green = (g > r + 30) & (g > b)
    black = (r < 60) & (g < 60) & (b < 60)
    return blue | green | black


def tissue_mask(rgb: np.ndarray, um_per_px: float, params: TissueParams = TissueParams()) -> np.ndarray:
    """Boolean tissue mask of a low-resolution RGB picture: Otsu on the saturation (white
    glass is unsaturated, stained tissue is not), marker pen removed, small specks removed
    and small holes filled (scipy.ndimage)."""
    try:
        from scipy import ndimage
    except ImportError:
        raise UsageError("tissue detection needs scipy", "pip install scipy (part of omedge[volume])") from None
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]   # per-channel ufuncs: max(axis=-1) over 3 is slow
    top = np.maximum(np.maximum(r, g), b)
    sat = (top - np.minimum(np.minimum(r, g), b)).astype(np.float32)
    sat /= np.maximum(top, 1)                           # HSV saturation, 0 for black
    pen = pen_marks(rgb)
    clean = sat[~pen]
    threshold = max(otsu(clean) if clean.size else 1.0, params.min_saturation)
    mask = (sat > threshold) & ~pen
    px_mm2 = (um_per_px / 1000) ** 2
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n:
        sizes = np.bincount(labels.ravel())
        keep = sizes * px_mm2 >= params.min_tissue_mm2
        keep[0] = False
        mask = keep[labels]
    holes, n = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)
    if n:
        small = np.bincount(holes.ravel()) * px_mm2 < params.max_hole_mm2
        small[0] = False
        mask |= small[holes]
    return mask


def tile_grid(mask: np.ndarray, scale: float, dims: tuple[int, int], patch0: int,
              min_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(coords [N, 2] int64 level-0 x, y; tissue fraction of each) of the non-overlapping
    patch0 x patch0 tiles that lie inside the slide and are at least min_fraction tissue
    on the mask, in row-major order."""
    w0, h0 = dims
    xs = np.arange(0, w0 - patch0 + 1, patch0)
    ys = np.arange(0, h0 - patch0 + 1, patch0)
    if not len(xs) or not len(ys):
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    hm, wm = mask.shape
    integral = np.zeros((hm + 1, wm + 1), np.int32)   # summed-area table, built in place (the mask can be large)
    np.cumsum(mask, axis=0, out=integral[1:, 1:])
    np.cumsum(integral[1:, 1:], axis=1, out=integral[1:, 1:])

    def edges(v, limit):
        return np.clip(np.round(v / scale).astype(np.int64), 0, limit)
    x0, x1 = edges(xs, wm), edges(xs + patch0, wm)
    y0, y1 = edges(ys, hm), edges(ys + patch0, hm)
    total = (integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0] + integral[y0][:, x0])
    area = np.maximum(np.outer(y1 - y0, x1 - x0), 1)
    fraction = total / area
    iy, ix = np.nonzero(fraction >= min_fraction)
    coords = np.stack([xs[ix], ys[iy]], axis=1).astype(np.int64)
    return coords, fraction[iy, ix].astype(np.float32)
