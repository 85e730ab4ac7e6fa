"""Whole-volume segmentation, numpy only: orientation, resampling to the model's spacing,
intensity normalisation, sliding-window inference with Gaussian importance weighting
(nnU-Net's scheme), optional mirroring, argmax, and back to the input grid.

`segment` takes the network as a function, so the torch reference and every bundle
run through exactly the same pipeline and their label maps can be compared."""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..errors import InputError
from ..io.volume import Volume, check_voxels, checked

# Resampling to the model's spacing may enlarge an axis at most 16x and shrink it at most 64x: beyond
# that the header's spacing is wrong (100 mm, 1e-5 mm), not the scan. The voxel count after resampling
# is held to io.volume.voxel_limit() (OMEDGE_MAX_VOXELS) too, both checked before anything is allocated.
ZOOM_RANGE = (1 / 64, 16.0)
# Window logits beyond this magnitude make sliding_argmax keep its class scores in float32:
# they are weighted averages of logits, so they stay inside float16's range (65504) below it.
FP16_SAFE = 30000.0


def model_space_zoom(vol: Volume, pre: dict) -> np.ndarray | None:
    """The zoom per axis (z, y, x) to the model's spacing, None where none is needed;
    refused outside ZOOM_RANGE or over the voxel limit, from the header alone."""
    spacing_zyx = vol.spacing[::-1]
    target = np.asarray(pre.get("target_spacing") or spacing_zyx, dtype=np.float64)
    zoom = spacing_zyx / target
    if np.allclose(zoom, 1.0, atol=1e-3):
        return None
    lo, hi = ZOOM_RANGE
    if not (np.all(np.isfinite(zoom)) and np.all(zoom >= lo) and np.all(zoom <= hi)):
        raise InputError(f"{vol.source}: voxel spacing {tuple(round(float(s), 6) for s in spacing_zyx[::-1])} mm would "
                         f"be resampled by {tuple(round(float(z), 4) for z in zoom[::-1])} to the model's "
                         f"{tuple(float(t) for t in target[::-1])} mm; more than {hi:g}x up or {1 / lo:g}x down means "
                         "the header's spacing is wrong", "fix the voxel spacing (pixdim / affine) in the header")
    shape = tuple(round(float(n * z)) for n, z in zip(vol.data.shape[::-1], zoom))  # as ndimage.zoom sizes it
    if min(shape) < 2:
        raise InputError(f"{vol.source} would shrink to {shape} voxels (z, y, x) at the model's spacing",
                         "check the voxel spacing in the header")
    check_voxels(shape[::-1], f"{vol.source} resampled to {tuple(float(t) for t in target[::-1])} mm",
                 "check the voxel spacing in the header; to allow larger volumes set OMEDGE_MAX_VOXELS")
    return zoom


def to_model_space(vol: Volume, pre: dict):
    """Voxel data in the network's axis order (z, y, x as nnU-Net reads NIfTI through
    SimpleITK: reversed NIfTI order) at the target spacing, normalised."""
    from scipy import ndimage
    vol = checked(vol)  # a Volume built in Python gets the checks a file gets
    zoom = model_space_zoom(vol, pre)
    arr = np.ascontiguousarray(vol.data.transpose(2, 1, 0))  # (i,j,k) -> (k,j,i)
    if zoom is not None:
        arr = ndimage.zoom(arr, zoom, order=3, mode="nearest", grid_mode=False)
    x = normalise(arr.astype(np.float32), pre)
    return x[None], arr.shape  # (C=1, D, H, W)


def normalise(x: np.ndarray, pre: dict) -> np.ndarray:
    scheme = pre.get("normalization", "zscore_per_image")
    if scheme == "zscore_per_image":
        return ((x - x.mean()) / (x.std() + pre.get("zscore_eps", 1e-8))).astype(np.float32)
    if scheme == "ct_window":
        lo, hi, mean, std = pre["ct_window"]
        return ((np.clip(x, lo, hi) - mean) / std).astype(np.float32)
    raise InputError(f"unknown normalization '{scheme}' in the manifest")


def back_to_input(labels: np.ndarray, vol: Volume) -> np.ndarray:
    """Nearest-neighbour resample of the label map to the input grid, NIfTI order."""
    from scipy import ndimage
    target = vol.data.shape[::-1]  # zyx
    if labels.shape != target:
        zoom = np.asarray(target, dtype=np.float64) / np.asarray(labels.shape)
        labels = ndimage.zoom(labels, zoom, order=0, mode="nearest", grid_mode=False)
        labels = _fit(labels, target)
    return np.ascontiguousarray(labels.transpose(2, 1, 0))


def _fit(a: np.ndarray, shape) -> np.ndarray:
    """zoom() can be one voxel off by rounding: crop or edge-pad to the exact shape."""
    a = a[tuple(slice(0, s) for s in shape)]
    pad = [(0, s - a.shape[i]) for i, s in enumerate(shape)]
    return np.pad(a, pad, mode="edge") if any(p[1] for p in pad) else a


def gaussian_importance(patch, sigma_scale: float = 0.125) -> np.ndarray:
    """Weights that favour window centres (sigma = patch * 1/8), max 1, never 0."""
    from scipy.ndimage import gaussian_filter
    g = np.zeros(patch, np.float32)
    g[tuple(p // 2 for p in patch)] = 1
    g = gaussian_filter(g, [p * sigma_scale for p in patch], mode="constant", cval=0)
    g /= g.max()
    g[g == 0] = g[g > 0].min()
    return g.astype(np.float32)


def window_starts(size: int, patch: int, step: float) -> list[int]:
    if size <= patch:
        return [0]
    n = math.ceil((size - patch) / (patch * step)) + 1
    actual = (size - patch) / (n - 1)
    return [round(i * actual) for i in range(n)]


def roll_axis(shape, patch) -> int:
    """The spatial axis windows advance along last-first: the one spanning the most patch
    lengths, so the rows kept open (one patch along it, the whole volume across) are the
    smallest share of the volume. 160x256x256 with 128^3 patches: the second (1/2 of
    the volume, not 4/5 along depth). Ties keep depth."""
    spans = [s / min(p, s) for s, p in zip(shape, patch)]
    return spans.index(max(spans))


def _windows(x: np.ndarray, patch, step, sigma_scale: float):
    """(padded volume, window starts ordered along roll_axis, that axis, Gaussian importance)."""
    patch = tuple(int(p) for p in patch)
    pad = [(0, max(0, p - s)) for p, s in zip(patch, x.shape[1:])]  # smaller than a patch: pad
    xp = np.pad(x, [(0, 0)] + pad, mode="constant", constant_values=0) if any(p[1] for p in pad) else x
    steps = step if isinstance(step, (list, tuple)) else [step] * 3
    starts = [window_starts(s, p, st) for s, p, st in zip(xp.shape[1:], patch, steps)]
    axis = roll_axis(x.shape[1:], patch)
    windows = sorted(((a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]), key=lambda w: w[axis])
    return xp, patch, windows, axis, gaussian_importance(patch, sigma_scale)


def _batches(xp, patch, windows, run, batch_size, mirror, progress):
    """(windows, logits) per batch of `batch_size` windows, in order."""
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        batch = np.stack([xp[:, a:a + patch[0], b:b + patch[1], c:c + patch[2]] for a, b, c in chunk])
        yield chunk, _run_tta(run, batch, mirror)
        if progress:
            progress(min(i + batch_size, len(windows)), len(windows))


def sliding_window(x: np.ndarray, run: Callable[[np.ndarray], np.ndarray], patch, step, batch_size: int = 2,
                   mirror: bool = False, sigma_scale: float = 0.125, progress=None) -> np.ndarray:
    """Logits (K, D, H, W) of a (C, D, H, W) volume. Windows go to `run` in batches of
    `batch_size`, so peak memory is the accumulators plus one batch."""
    xp, patch, windows, _, g = _windows(x, patch, step, sigma_scale)
    shape = xp.shape[1:]
    logits, weight = None, np.zeros(shape, np.float32)
    for chunk, out in _batches(xp, patch, windows, run, batch_size, mirror, progress):
        if logits is None:
            logits = np.zeros((out.shape[1], *shape), np.float32)
        for (a, b, c), o in zip(chunk, out):
            sl = (slice(a, a + patch[0]), slice(b, b + patch[1]), slice(c, c + patch[2]))
            np.multiply(o, g, out=o)  # in place: a 105-class window is ~0.9 GB in fp32
            logits[(slice(None), *sl)] += o
            weight[sl] += g
        del out, o  # else this batch stays alive while the next one runs
    logits /= weight
    return logits[(slice(None), *(slice(0, s) for s in x.shape[1:]))]


def sliding_argmax(x: np.ndarray, run: Callable[[np.ndarray], np.ndarray], patch, step, batch_size: int = 2,
                   mirror: bool = False, sigma_scale: float = 0.125, progress=None,
                   accumulator=np.float32) -> np.ndarray:
    """Labels (D, H, W) of class_argmax(sliding_window(...)) with a fraction of its memory.
    Windows run in order along roll_axis, so the slices before the next window's start are
    final: they are argmaxed and their rows reused; the accumulator holds one patch length
    of class scores along that axis, the whole volume across it (not the padding of one
    smaller than a patch). float16 (as nnU-Net v2 keeps them; segment() takes it only
    where float32 would not fit, choose_accumulator) halves it, 2.2 -> 1.1 GB for 105
    classes on 160x256x256. With a head fitted to a phantom it kept 99.985% of voxels
    (decisive-voxel Dice 0.9999); on a random STU-Net-S, all near-ties, it moved one
    class's decisive Dice to 0.987, under the fp32 gate. Each window is then added
    already divided by the voxel's total Gaussian weight (known before any window runs),
    so the sums are averaged logits, never the tiny products of a window's edge that
    float16 would flush to zero; float32 storage from the first window whose logits pass
    FP16_SAFE. float32 (the default) gives exactly class_argmax(sliding_window(...))."""
    xp, patch, windows, ax, g = _windows(x, patch, step, sigma_scale)
    shape = x.shape[1:]
    rows, averaged = min(patch[ax], shape[ax]), np.dtype(accumulator) == np.float16
    labels = np.empty(shape, np.uint16)
    weight = np.zeros(shape, np.float32)
    for region, d, h, w in _inside(windows, patch, shape):
        weight[region] += g[:d, :h, :w]
    acc, base = None, 0
    # the rolling axis first: views, so the row arithmetic below is the same for any axis
    labels_r, weight_r = np.moveaxis(labels, ax, 0), np.moveaxis(weight, ax, 0)

    def finalise(upto: int) -> None:  # rows [base, upto) are complete
        n, acc_r = upto - base, np.moveaxis(acc, ax + 1, 1)
        for z in range(0, n, 8):
            k = min(8, n - z)
            part = acc_r[:, z:z + k] if averaged else acc_r[:, z:z + k] / weight_r[base + z:base + z + k]
            labels_r[base + z:base + z + k] = part.argmax(0)
        keep = max(0, rows - n)
        for z in range(0, keep, 8):  # in slabs: numpy copies views whose extents interleave through a
            k = min(8, keep - z)     # temporary, which for the whole shift was 1 GB (105 classes)
            acc_r[:, z:z + k] = acc_r[:, n + z:n + z + k]
        acc_r[:, keep:] = 0

    for chunk, out in _batches(xp, patch, windows, run, batch_size, mirror, progress):
        if acc is None:
            acc = np.zeros((out.shape[1], *shape[:ax], rows, *shape[ax + 1:]), accumulator)
        if acc.dtype == np.float16 and max(float(out.max()), -float(out.min())) > FP16_SAFE:
            acc = acc.astype(np.float32)
        for (region, d, h, w), o in zip(_inside(chunk, patch, shape), out):
            if region[ax].start > base:
                finalise(region[ax].start)
                base = region[ax].start
            o = o[:, :d, :h, :w]
            np.multiply(o, g[:d, :h, :w] / weight[region] if averaged else g[:d, :h, :w], out=o)
            rolled = list(region)
            rolled[ax] = slice(region[ax].start - base, region[ax].stop - base)
            acc[(slice(None), *rolled)] += o
        del out, o  # else this batch (2 x 0.9 GB for STU-Net) stays alive while the next one runs
    finalise(shape[ax])
    return labels


def _inside(windows, patch, shape):
    """(the window's region of the volume, its depth, height, width there) per window:
    the padding of a volume smaller than a patch is left out."""
    for start in windows:
        d, h, w = (min(p, s - t) for p, s, t in zip(patch, shape, start))
        yield tuple(slice(t, t + n) for t, n in zip(start, (d, h, w))), d, h, w


def _run_tta(run, batch, mirror: bool) -> np.ndarray:
    out = np.asarray(run(batch), dtype=np.float32)  # no copy: windows of 105 classes are large
    if not out.flags.writeable:
        out = out.copy()
    if not mirror:
        return out
    flips = [(2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    for axes in flips:  # nnU-Net's 8-way mirroring, averaged
        out += np.flip(run(np.ascontiguousarray(np.flip(batch, axes))), axes)
    return out / (len(flips) + 1)


def segment(vol: Volume, run: Callable[[np.ndarray], np.ndarray], pre: dict, batch_size: int = 1,
            mirror: bool = False, progress=None, accumulator="float32", classes: int | None = None,
            report: dict | None = None) -> np.ndarray:
    """Label map on the input grid (NIfTI order) for `vol`. accumulator: "float32",
    "float16" or "auto" (choose_accumulator, which needs `classes`); what was used and
    why goes into `report`."""
    x, _ = to_model_space(vol, pre)
    dtype, why = choose_accumulator(x.shape[1:], pre["patch_size"], classes, accumulator)
    if report is not None:
        report.update(accumulator=np.dtype(dtype).name, accumulator_reason=why)
    labels = sliding_argmax(x, run, pre["patch_size"], pre.get("step", 0.5), batch_size, mirror,
                            pre.get("gaussian_sigma_scale", 0.125), progress, accumulator=dtype)
    return back_to_input(labels, vol)


# Besides the accumulator, a run holds about this many windows of class scores at once: the
# backend's output and buffers, the copy handed over (STU-Net-B, OpenVINO: ~3.3 GB beside
# one 0.9 GB window of 105 classes)
WORKING_WINDOWS = 4


def accumulator_bytes(shape, patch, classes: int, dtype=np.float32) -> int:
    """sliding_argmax's class-score rows: one patch length along roll_axis, the whole volume across."""
    ax = roll_axis(shape, patch)
    across = math.prod(s for i, s in enumerate(shape) if i != ax)
    return classes * min(int(patch[ax]), shape[ax]) * across * np.dtype(dtype).itemsize


def memory_available() -> int | None:
    """MemAvailable from /proc/meminfo (what the kernel can hand out without swapping), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def choose_accumulator(shape, patch, classes: int | None, choice="auto", available: int | None = None):
    """(dtype, reason). "auto" keeps float32 (exactly nnU-Net's argmax) unless it and the
    working windows would not fit in the memory available now; then float16, which halves
    the accumulator (STU-Net-B on a 256x256x160 CT at 1.5 mm: 2.2 -> 1.1 GB; on the phantom
    benchmark decisive-voxel Dice 0.9999 against float32). An explicit dtype is taken as given."""
    if choice != "auto":
        try:
            dtype = np.dtype(choice)
        except TypeError:
            dtype = None
        if dtype not in (np.float32, np.float16):
            raise InputError(f"accumulator must be auto, float32 or float16, got {choice!r}")
        return dtype.type, "asked for"
    if not classes:
        return np.float32, "auto: number of classes unknown, float32"
    need = accumulator_bytes(shape, patch, classes) + WORKING_WINDOWS * classes * math.prod(patch) * 4
    available = memory_available() if available is None else available
    gb = 2 ** 30
    if available is None or need <= available:
        where = "" if available is None else f", {available / gb:.1f} GB available"
        return np.float32, f"auto: float32 needs ~{need / gb:.1f} GB{where}"
    return np.float16, f"auto: float32 needs ~{need / gb:.1f} GB, only {available / gb:.1f} GB available"


def class_argmax(logits: np.ndarray, slab: int = 8) -> np.ndarray:
    """argmax over classes, a few slices at a time: numpy's argmax(axis=0) makes a
    contiguous copy of the whole (K, D, H, W) array first, which doubled peak memory."""
    labels = np.empty(logits.shape[1:], np.uint16)
    for z in range(0, logits.shape[1], slab):
        labels[z:z + slab] = logits[:, z:z + slab].argmax(0)
    return labels


def class_volumes(labels: np.ndarray, vol: Volume, names: list[str] | None) -> dict:
    """Millilitres per label present (background excluded)."""
    voxel_ml = float(np.prod(vol.spacing)) / 1000.0
    ids, counts = np.unique(labels, return_counts=True)
    return {(names[i] if names and i < len(names) else f"class_{i}"): round(float(c) * voxel_ml, 3)
            for i, c in zip(ids.tolist(), counts.tolist()) if i != 0}


def dice_per_class(ref: np.ndarray, got: np.ndarray, min_voxels: int = 10) -> dict:
    """Dice for every class present in the reference (with at least min_voxels), by class id."""
    from ..parity import dice_scores
    return {int(k): v for k, v in dice_scores(ref, got, min_voxels=min_voxels).items()}


def synthetic_ct(shape=(96, 96, 80), spacing=(1.5, 1.5, 1.5), seed: int = 0) -> Volume:
    """A CT-like phantom in HU: air, a body of soft tissue with fat, organs and bone
    ellipsoids, noise. For verification when no scan is given (recorded as such)."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    vol = np.full(shape, -1000.0, np.float32)
    body = (i / 0.85) ** 2 + (j / 0.7) ** 2 < 1
    vol[body] = -80
    vol[((i / 0.75) ** 2 + (j / 0.6) ** 2 < 1)] = 40
    for _ in range(6):
        c = rng.uniform(-0.45, 0.45, 3)
        r = rng.uniform(0.12, 0.3, 3)
        hu = rng.choice([60, 120, 250, 700])
        vol[((i - c[0]) / r[0]) ** 2 + ((j - c[1]) / r[1]) ** 2 + ((k - c[2]) / r[2]) ** 2 < 1] = hu
    vol[(i ** 2 + (j + 0.5) ** 2 < 0.02)] = 900  # a spine-like column
    vol = np.round(vol + rng.normal(0, 15, shape)).astype(np.float32)  # integer HU, as scanners store
    affine = np.diag([*spacing, 1.0])
    return Volume(vol, affine, "synthetic CT phantom")
