"""MedLSAM on the run side (numpy + scipy): MedLAM localises each support-set organ in the
query CT, SAM/MedSAM segments it slice by slice inside the box. The networks are callables,
so the torch reference and every bundle run through exactly this code:
  localise(patches[N,1,D,H,W] float32) -> {"position": [N,3], "feature0/1/2": [N,C,d,h,w]}
  embed(slice_rgb uint8 [1024,1024,3]) -> embedding   (once per slice, for all classes)
  segment(embedding, box_xyxy in the 1024 grid) -> bool mask
Steps follow openmedlab/MedLSAM (MedLAM/*.py, MedSAM/auto_pre_CT.py, MedLSAM_*_Inference.py),
whole-patch localisation (WPL): LAS, 3 mm, piecewise-linear HU; six extreme points per class
in each support volume; crops near the query's centre regress (1500, 600, 600) mm *
tanh(support - query); a patch around each estimate is refined by the summed cosine
similarity of the decoder features at 1/4, 1/2 and full resolution."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, UsageError
from .io.volume import Volume, checked, read_volume
from .runtime.volume import class_volumes, model_space_zoom

SPACING = 3.0                                     # mm, MedLAM's grid
DIST_RATIO = np.array([1500.0, 600.0, 600.0])     # mm, z y x (Anatomy_detection.dis_ratio)
HU_POINTS, HU_VALUES = (-1000.0, -200.0, 200.0, 1500.0), (0.0, 0.2, 0.8, 1.0)
CENTER_PATCH = 8                                  # support kernel edge at full resolution
FEATURES = ("feature0", "feature1", "feature2")
SAM_SIZE, SAM_HU, BOX_PAD = 1024, (-500.0, 1000.0), 10
_LAS_SIGN = np.array([-1.0, 1.0, 1.0])            # L, A, S in RAS+ world axes


def hu_piecewise(x: np.ndarray) -> np.ndarray:
    """[-1000, -200, 200, 1500] HU -> [0, 0.2, 0.8, 1], 0 below, 1 above (img_multi_thresh_normalized)."""
    return np.interp(x, HU_POINTS, HU_VALUES, left=HU_VALUES[0], right=HU_VALUES[-1]).astype(np.float32)


def las_transform(affine: np.ndarray, shape) -> np.ndarray:
    """4x4 map from LAS-array voxel indices to input voxel indices (axis permutation and
    flips only, like nibabel's as_reoriented; oblique axes go to their nearest world axis)."""
    dirs = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    world, free = [-1] * 3, set(range(3))
    for ax in np.argsort(-np.abs(dirs).max(axis=0)):      # the most clearly aligned axis picks first
        world[ax] = max(free, key=lambda w_: abs(dirs[w_, ax]))
        free.discard(world[ax])
    m = np.diag([0.0, 0.0, 0.0, 1.0])
    for ax, w in enumerate(world):
        m[ax, w], m[ax, 3] = (1, 0) if np.sign(dirs[w, ax]) == _LAS_SIGN[w] else (-1, shape[ax] - 1)
    return m


def to_las(vol: Volume, order: int | None = 3):
    """(array z, y, x at 3 mm in LAS, zoom z y x, LAS->input voxel map).
    order=None: a label map, resampled as the official one-hot trilinear + argmax."""
    m = las_transform(vol.affine, vol.data.shape)
    inv = np.linalg.inv(m)
    las = vol.data.transpose([int(np.argmax(np.abs(inv[a, :3]))) for a in range(3)])
    las = np.flip(las, [a for a in range(3) if inv[a, :3].sum() < 0])
    zoom = model_space_zoom(Volume(las, vol.affine @ m, vol.source), {"target_spacing": [SPACING] * 3})
    zoom = np.ones(3) if zoom is None else zoom
    arr = np.ascontiguousarray(las.transpose(2, 1, 0))
    if order is None:
        return _label_resample(arr, zoom), zoom, m
    from scipy import ndimage
    return (arr if np.allclose(zoom, 1) else ndimage.zoom(arr.astype(np.float32), zoom, order=order)), zoom, m


def linear_resize(a: np.ndarray, shape, scale=None) -> np.ndarray:
    """Separable (tri)linear resize with torch's align_corners=False rule: source =
    (dst + 0.5) / scale - 0.5, clamped at 0; scale = out/in unless given (scale_factor)."""
    out = a.astype(np.float32, copy=False)
    for axis, n_out in enumerate(shape):
        n_in = out.shape[axis]
        s = n_out / n_in if scale is None else scale[axis]
        src = np.maximum((np.arange(n_out) + 0.5) / s - 0.5, 0)
        i0 = np.minimum(src.astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        w = (src - i0).astype(np.float32).reshape([-1 if d == axis else 1 for d in range(out.ndim)])
        out = np.take(out, i0, axis) * (1 - w) + np.take(out, i1, axis) * w
    return out


def _label_resample(lab: np.ndarray, zoom) -> np.ndarray:
    """One-hot, trilinear at the zoom, argmax (resize_Multi_label_to_given_shape), one class
    at a time so memory stays at two output-sized arrays."""
    if np.allclose(zoom, 1):
        return lab.astype(np.int32)
    shape = [round(n * z) for n, z in zip(lab.shape, zoom)]   # the image's grid (ndimage.zoom sizes)
    best = np.full(shape, -1.0, np.float32)
    out = np.zeros(shape, np.int32)
    for c in np.unique(lab):
        w = linear_resize((lab == c).astype(np.float32), shape, zoom)
        win = w > best
        out[win], best[win] = int(c), w[win]
    return out


def extreme_points(mask: np.ndarray) -> np.ndarray:
    """[6, 3]: min z, min y, min x, max z, max y, max x points of a mask, each at the middle
    (by count) foreground voxel of its extreme slice (extract_fg_cor 'extreme')."""
    nz = np.nonzero(mask)
    bounds = (np.min(nz, axis=1), np.max(nz, axis=1))
    pts = np.zeros((6, 3), np.int64)
    for i, bound in enumerate(bounds):
        for ax in range(3):
            a, b = (ax - 2) % 3, (ax - 1) % 3
            sl = np.nonzero(mask.transpose(ax, a, b)[bound[ax]])
            half = len(sl[0]) // 2
            pts[i * 3 + ax, ax], pts[i * 3 + ax, a], pts[i * 3 + ax, b] = bound[ax], sl[0][half], sl[1][half]
    return pts


def _normalise(f: np.ndarray) -> np.ndarray:
    return f / np.maximum(np.sqrt((f * f).sum(axis=1, keepdims=True)), 1e-12)   # F.normalize(dim=1)


def _crops(img: np.ndarray, centres, patch: int) -> np.ndarray:
    return np.stack([img[z - h:z + h, y - h:y + h, x - h:x + h] for h in [patch // 2] for z, y, x in centres])[:, None]


def _run(localise, patches: np.ndarray, batch: int, keys, reduce=None) -> dict:
    """localise over batches; keeps only `keys`, or what `reduce` makes of each batch (the
    full-resolution features are ~100 MB a patch at the official size)."""
    got = {}
    for i in range(0, len(patches), batch):
        out = localise(np.ascontiguousarray(patches[i:i + batch], dtype=np.float32))
        missing = [k for k in keys if k not in out]
        if missing:
            raise UsageError(f"the MedLAM graph returned {sorted(out)}, not {missing}",
                             "export MedLAM with its named outputs: position, feature0, feature1, feature2")
        out = {k: np.asarray(out[k], np.float32) for k in keys}
        for k, v in (reduce(out) if reduce else out).items():
            got.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in got.items()}


@dataclass
class Support:
    """Per class: mean position vectors [6,3] and, per scale, summed unit feature kernels [6,C,k,k,k]."""
    position: dict = field(default_factory=dict)
    kernels: dict = field(default_factory=dict)
    cases: int = 0


@dataclass
class MedLSAMResult:
    labels: np.ndarray     # (i, j, k) on the query grid: write it with io.volume.write_labels(labels, query)
    boxes: dict            # class -> inclusive [[i0, j0, k0], [i1, j1, k1]] in query voxels
    volumes_ml: dict       # class name -> millilitres
    slices: int            # encoder runs (one per slice, shared by all classes)


def medlam_input(vol: Volume, patch: int, order: int | None = 3):
    """LAS, 3 mm, HU mapped (images) and padded by half a patch, as MedLAM reads it."""
    arr, zoom, m = to_las(vol, order)
    if order is not None:
        if arr.min() >= -10:   # the official code prints a warning and runs on: refuse instead
            raise InputError(f"{vol.source} does not look like CT in Hounsfield units (minimum {arr.min():.1f})",
                             "MedLAM expects raw HU (air about -1000); give the unnormalised CT")
        arr = hu_piecewise(arr)
    # half a patch (official), more where the volume is too thin for crops within +-10 voxels of its centre
    pad = np.array([patch // 2 + max(0, -(-(22 - n) // 2)) for n in arr.shape])
    return np.pad(arr, [(p, p) for p in pad]), zoom, m, pad


def correlate(q: np.ndarray, w: np.ndarray) -> np.ndarray:
    """sum over channels of the cross-correlation of q [C,d,h,w] with w [C,k,k,k], zero padding
    k//2: the official grouped Conv3d (bias aside: a constant per map, argmax-neutral), by FFT."""
    from scipy import fft
    k = w.shape[1:]
    qp = np.pad(q, [(0, 0)] + [(kk // 2, kk // 2) for kk in k])
    size = qp.shape[1:]
    spec = (fft.rfftn(qp, axes=(1, 2, 3), workers=-1) * fft.rfftn(w, s=size, axes=(1, 2, 3), workers=-1).conj())
    out = fft.irfftn(spec.sum(0), s=size, workers=-1)
    return out[tuple(slice(0, n - kk + 1) for n, kk in zip(size, k))].astype(np.float32)


def _kernels(out: dict, patch: int) -> dict:
    """Unit-norm centre crops of each feature map (crop_patch_around_center, r = 4 * scale)."""
    kern = {}
    for key in FEATURES:
        f = out[key]
        r = int(CENTER_PATCH // 2 * f.shape[-1] / patch)
        c = [s // 2 for s in f.shape[2:]]
        kern[key] = _normalise(f[:, :, c[0] - r:c[0] + r, c[1] - r:c[1] + r, c[2] - r:c[2] + r])
    return kern


def _similarity(out: dict, kernels: dict, patch: int) -> np.ndarray:
    """[b, p, p, p]: 1 + sum over scales of the per-point similarity map resized to the patch."""
    b = len(out[FEATURES[0]])
    sim = np.ones((b, patch, patch, patch), np.float32)
    for key in FEATURES:
        q = _normalise(out[key])
        for i in range(b):
            w = kernels[key][i]
            sim[i] += linear_resize(correlate(q[i], w) / w.shape[-1] ** 3, (patch,) * 3)
    return sim


def prepare_support(localise, cases, classes, patch: int, batch: int = 2) -> Support:
    """Position vectors (averaged) and feature kernels (summed, as released) per class from
    the six extreme points of each support label."""
    sup = Support()
    for image, label in cases:
        image = image if isinstance(image, Volume) else read_volume(image)
        if label.data.shape != image.data.shape or not np.allclose(label.affine, image.affine, atol=1e-3):
            raise InputError(f"support label {label.source} {label.data.shape} is not on the grid of its CT "
                             f"{image.source} {image.data.shape}", "the label map must share the CT's shape and affine")
        img, _, _, pad = medlam_input(image, patch)
        lab = np.pad(to_las(label, None)[0], [(p, p) for p in pad])
        for c in classes:
            mask = lab == c
            if not mask.any():
                raise InputError(f"support label {label.source} has no voxels of class {c} on MedLAM's 3 mm grid",
                                 f"label class {c} in every support case, or leave it out of --classes")
            got = _run(localise, _crops(img, extreme_points(mask), patch), batch, ("position", *FEATURES),
                       lambda out: {"position": out["position"], **_kernels(out, patch)})
            kern = {k: got[k] for k in FEATURES}
            if c not in sup.position:
                sup.position[c], sup.kernels[c] = got["position"], kern
            else:
                sup.position[c] = sup.position[c] + got["position"]
                sup.kernels[c] = {k: sup.kernels[c][k] + kern[k] for k in FEATURES}
        sup.cases += 1
    sup.position = {c: p / sup.cases for c, p in sup.position.items()}
    return sup


def _query_crops(img: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Centres within +-10 voxels of the middle on foreground (RandomPositionCrop, seeded like the release)."""
    rng, centres = np.random.RandomState(seed), []
    for _ in range(1000 * n):
        c = [rng.randint(s // 2 - 10, s // 2 + 10) for s in img.shape]
        if img[tuple(c)] >= 0.001:
            centres.append(c)
            if len(centres) == n:
                return np.array(centres)
    raise InputError("the query CT is air around its centre: MedLAM needs body voxels there",
                     "give the whole CT scan (not a crop outside the body)")


def locate(localise, vol: Volume, sup: Support, patch: int, n_crops: int = 10, seed: int = 2023,
           batch: int = 2, on_similarity=None) -> dict:
    """class -> inclusive box [[i0, j0, k0], [i1, j1, k1]] in query voxels; on_similarity(class, maps) sees them."""
    img, zoom, m, pad = medlam_input(vol, patch)
    h, shape = patch // 2, np.array(img.shape)
    centres = _query_crops(img, n_crops, seed)
    query = _run(localise, _crops(img, centres, patch), batch, ("position",))["position"].mean(0)
    start = centres.mean(0) * SPACING
    boxes = {}
    for c, position in sup.position.items():
        cor = np.round((DIST_RATIO * np.tanh(position - query) + start) / SPACING).astype(np.int64)
        cor = np.clip(cor, h, shape - h - 1)
        sims = []
        for i in range(0, len(cor), batch):
            out = _run(localise, _crops(img, cor[i:i + batch], patch), batch, FEATURES)
            sims.append(_similarity(out, {k: v[i:i + batch] for k, v in sup.kernels[c].items()}, patch))
        sim = np.concatenate(sims)
        if on_similarity:
            on_similarity(int(c), sim)
        best = np.array([np.unravel_index(np.argmax(s), s.shape) for s in sim])
        cor = cor + best - h + 1 - pad
        corner = np.array([[cor[0, 0], cor[1, 1], cor[2, 2]], [cor[3, 0], cor[4, 1], cor[5, 2]]], np.float64)
        las_xyz = np.around(corner / zoom)[:, ::-1]
        ijk = (m @ np.c_[las_xyz, np.ones(2)].T).T[:, :3]
        boxes[int(c)] = np.clip(np.round([ijk.min(0), ijk.max(0)]), 0, np.array(vol.data.shape) - 1).astype(int).tolist()
    return boxes


def resize_slice(img: np.ndarray, shape=(SAM_SIZE, SAM_SIZE), order: int = 2) -> np.ndarray:
    """skimage.transform.resize(img, shape, order, preserve_range=True, mode='constant',
    anti_aliasing=True) in scipy: Gaussian sigma max(0, (in/out - 1) / 2) (only when
    shrinking), grid-mode spline zoom, clipped to the input's range with the 0 fill."""
    from scipy import ndimage
    img = np.asarray(img, np.float64)
    factors = np.array(img.shape, np.float64) / np.array(shape, np.float64)
    sigma = np.maximum(0, (factors - 1) / 2)
    filtered = ndimage.gaussian_filter(img, sigma, mode="constant", cval=0) if np.any(sigma > 0) else img
    out = ndimage.zoom(filtered, 1 / factors, order=order, mode="grid-constant", cval=0, grid_mode=True)
    return np.clip(out, min(img.min(), 0), max(img.max(), 0))


class SliceImages:
    """The SAM input of each axial slice (auto_pre_CT.preprocess_ct): HU clipped to [-500, 1000],
    min-max over the whole volume to [0, 255], raw 0 kept 0, truncated to integers, resized to
    1024^2 (order 2, anti-aliased), uint8, grey to RGB. Made per slice, on demand."""

    def __init__(self, vol: Volume):
        lo, hi = (float(np.clip(f(vol.data), *SAM_HU)) for f in (np.min, np.max))
        if hi <= lo:
            raise InputError(f"{vol.source} is constant within [-500, 1000] HU: nothing to segment")
        self.vol, self.lo, self.hi = vol, lo, hi

    def __call__(self, k: int) -> np.ndarray:
        raw = self.vol.data[:, :, k].T.astype(np.float64)    # (rows j, columns i), as SimpleITK reads it
        grey = (np.clip(raw, *SAM_HU) - self.lo) / (self.hi - self.lo) * 255.0
        grey[raw == 0] = 0
        grey = resize_slice(grey.astype(np.int32)).astype(np.uint8)   # in [0, 255] after the clip
        return np.repeat(grey[:, :, None], 3, axis=-1)


def box_1024(box, shape_ij) -> np.ndarray:
    """A query box (inclusive voxel indices) as MedLSAM's 2-D prompt: x from i, y from j, scaled
    to the 1024 grid, +-10 px, clipped to the image (the release leaves it unclipped)."""
    (i0, j0, _), (i1, j1, _) = box
    ni, nj = shape_ij
    x0, x1 = np.around(i0 * SAM_SIZE / ni) - BOX_PAD, np.around(i1 * SAM_SIZE / ni) + BOX_PAD
    y0, y1 = np.around(j0 * SAM_SIZE / nj) - BOX_PAD, np.around(j1 * SAM_SIZE / nj) + BOX_PAD
    return np.clip(np.array([x0, y0, x1, y1], np.float64), 0, SAM_SIZE)


def nearest_resize(mask: np.ndarray, shape) -> np.ndarray:
    """cv2.resize(..., INTER_NEAREST): source index floor(dst * in / out)."""
    rows, cols = (np.minimum((np.arange(n) * (m / n)).astype(np.int64), m - 1) for n, m in zip(shape, mask.shape))
    return mask[rows][:, cols]


def segment_slices(vol: Volume, boxes: dict, embed, segment, progress=None) -> tuple[np.ndarray, int]:
    """SAM once per slice that any box covers, every class's box prompted on that embedding;
    a voxel claimed by two classes keeps the later class. Returns (labels (i,j,k), slices)."""
    ni, nj, _ = vol.data.shape
    labels = np.zeros(vol.data.shape, np.uint16 if max(boxes, default=0) > 255 else np.uint8)
    slices = sorted({k for (_, _, k0), (_, _, k1) in boxes.values() for k in range(k0, k1 + 1)})
    images = SliceImages(vol)
    for n, k in enumerate(slices, 1):
        emb = embed(images(k))
        for c, box in boxes.items():
            if box[0][2] <= k <= box[1][2]:
                mask = np.asarray(segment(emb, box_1024(box, (ni, nj)))) > 0.5
                labels[:, :, k][nearest_resize(mask, (nj, ni)).T] = c
        if progress:
            progress(n, len(slices))
    return labels, len(slices)


def find_support(folder) -> list[tuple[Path, Path]]:
    """(image, label) pairs: NAME.nii.gz + NAME_label.nii.gz, or nnU-Net imagesTr/NAME_0000 + labelsTr/NAME."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"support set {folder} is not a folder", _LAYOUT)
    nnunet = (folder / "imagesTr").is_dir()
    images = sorted(p for p in (folder / "imagesTr" if nnunet else folder).iterdir()
                    if p.name.endswith((".nii", ".nii.gz")) and (p.name.split(".nii")[0].endswith("_0000") if nnunet
                                                                 else not p.name.split(".nii")[0].endswith("_label")))
    if not images:
        raise InputError(f"no support CTs in {folder}", _LAYOUT)
    pairs = []
    for img in images:
        stem, ext = img.name.split(".nii")[0], ".nii" + img.name.split(".nii", 1)[1]
        cands = ([folder / "labelsTr" / (stem[:-5] + e) for e in (ext, ".nii.gz", ".nii")] if nnunet
                 else [folder / (stem + "_label" + e) for e in (ext, ".nii.gz", ".nii")])
        label = next((c for c in cands if c.is_file()), None)
        if label is None:
            raise InputError(f"support CT {img.name} has no label map (looked for {cands[0]})", _LAYOUT)
        pairs.append((img, label))
    return pairs


_LAYOUT = ("a support folder holds CTs with label maps: NAME.nii.gz + NAME_label.nii.gz, or nnU-Net's "
           "imagesTr/NAME_0000.nii.gz + labelsTr/NAME.nii.gz")


def _read_label(source) -> tuple[Volume, set]:
    """A support label map, stored compactly (int16/int32), and the classes it holds."""
    label = source if isinstance(source, Volume) else read_volume(source)
    if not np.array_equal(label.data, np.round(label.data)):
        raise InputError(f"{label.source} has non-integer values: not a label map")
    found = set(np.unique(label.data).astype(int).tolist()) - {0}
    if not found:
        raise InputError(f"support label {label.source} has no labels (all 0)", "give the annotated label map")
    small = max(found) < 2 ** 15 and min(found) > -2 ** 15
    return Volume(label.data.astype(np.int16 if small else np.int32), label.affine, label.source), found


def segment_volume(query, support, localise: Callable, embed: Callable, segment: Callable, classes=None,
                   names: dict | None = None, patch: int = 64, n_crops: int = 10, seed: int = 2023, batch: int = 2,
                   progress=None, on_similarity=None) -> MedLSAMResult:
    """Label map of `classes` (default: every class all support labels share) on the query's grid."""
    vol = checked(query if isinstance(query, Volume) else read_volume(query))
    pairs = find_support(support) if isinstance(support, (str, Path)) else list(support)
    if not pairs:
        raise InputError("the support set is empty", _LAYOUT)
    read = [_read_label(lab) for _, lab in pairs]   # CTs are read one at a time, by prepare_support
    cases, found = [(img, lab) for (img, _), (lab, _) in zip(pairs, read)], [f for _, f in read]
    wanted = sorted(set.intersection(*found)) if classes is None else [int(c) for c in classes]
    for c in wanted:
        lacking = [lab.source for (_, lab), have in zip(cases, found) if c not in have]
        if lacking:
            raise InputError(f"class {c} is not labelled in support {', '.join(lacking)}",
                             f"label class {c} in every support case, or leave it out of --classes")
    if not wanted:
        raise InputError("the support labels share no class", "label the same organs in every support case")
    sup = prepare_support(localise, cases, wanted, patch, batch)
    boxes = locate(localise, vol, sup, patch, n_crops, seed, batch, on_similarity)
    labels, slices = segment_slices(vol, boxes, embed, segment, progress)
    table = [names.get(i, f"class_{i}") if names else f"class_{i}" for i in range(max(wanted) + 1)]
    return MedLSAMResult(labels, boxes, class_volumes(labels, vol, table), slices)

