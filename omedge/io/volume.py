"""CT/MR volumes in and label maps out: NIfTI (nibabel) and DICOM series (pydicom).

A Volume keeps the voxel data in NIfTI order (i, j, k) with its 4x4 voxel-to-RAS
affine, so a label map written back lands exactly on the input's grid.

Files are untrusted: the voxel count a header claims is checked against a limit (and
against what the file can hold) before anything is allocated; label maps are written
to a fresh O_EXCL temp file in the target folder, then renamed over the target."""
from __future__ import annotations

import errno
import gzip
import math
import os
import secrets
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, UsageError
from . import limit_from_env

# 2**29 voxels: 2 GiB as float32, e.g. a 512 x 512 x 2048 CT; OMEDGE_MAX_VOXELS changes it. Applied to
# what a file claims and to the volume after resampling to the model's spacing (runtime.volume).
DEFAULT_MAX_VOXELS = 2 ** 29
MAX_VOXELS_ENV = "OMEDGE_MAX_VOXELS"
DEFLATE_MAX_RATIO = 1032  # no deflate stream expands more than this: the most a .gz can hold


@dataclass
class Volume:
    data: np.ndarray          # float32, (i, j, k)
    affine: np.ndarray        # voxel -> RAS mm
    source: str
    header: object = None     # nibabel header of a NIfTI input, reused when writing
    dicom: list | None = None  # a DICOM input's datasets in k order, pixel data dropped: what a DICOM-SEG references

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def voxel_limit() -> int:
    return limit_from_env(MAX_VOXELS_ENV, DEFAULT_MAX_VOXELS, "voxels")


def check_voxels(shape, what: str, hint: str | None = None) -> None:
    """Refuse a volume of more voxels than voxel_limit(), before it is allocated."""
    n, limit = math.prod(int(s) for s in shape), voxel_limit()
    if n > limit:
        raise InputError(f"{what} would be {' x '.join(str(int(s)) for s in shape)} = {n / 1e6:.0f} million voxels, "
                         f"over the limit of {limit / 1e6:.0f} million",
                         hint or f"check the header; to allow larger volumes set {MAX_VOXELS_ENV}")


def _check_claim(img, path: Path) -> None:
    """What the header claims, before the voxels are read: count, sample type, and bytes
    the file can actually hold (a 1 MB .nii.gz cannot hold 2 GB, whatever its header says)."""
    check_voxels(img.shape, path.name)
    dtype = img.get_data_dtype()
    if dtype.kind not in "iuf":
        what = "complex" if dtype.kind == "c" else f"{dtype} (e.g. RGB)"
        raise InputError(f"{path.name} stores {what} voxels; a CT/MR intensity volume is expected",
                         "convert it to one real-valued channel (e.g. the magnitude) first")
    need = int(getattr(img.dataobj, "offset", 0)) + math.prod(img.shape) * dtype.itemsize
    size = path.stat().st_size
    room = size * DEFLATE_MAX_RATIO + 1024 if path.name.endswith(".gz") else size
    if need > room:
        raise InputError(f"{path.name} claims {tuple(img.shape)} voxels ({need / 1e6:.0f} MB) but its {size / 1e6:.2f} MB "
                         f"can hold at most {room / 1e6:.0f} MB", "the file is truncated or its header is wrong")


def read_volume(path) -> Volume:
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path)
    if not path.exists():
        raise InputError(f"volume not found: {path}")
    if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        raise InputError(f"{path.name}: expected a NIfTI file (.nii / .nii.gz) or a DICOM series folder")
    import nibabel as nib
    try:
        img = nib.load(str(path))  # the header only: the voxels are read below, once checked
    except Exception as e:  # nibabel raises many types for a damaged header
        raise InputError(f"{path.name} cannot be read as NIfTI ({e})", "the file is truncated or corrupt") from e
    _check_claim(img, path)
    try:
        data = np.asanyarray(img.dataobj, dtype=np.float32)
        with nib.openers.ImageOpener(str(path)) as f:  # as stored: nibabel "fixes" zero pixdims to 1
            raw = nib.Nifti1Header.from_fileobj(f, check=False)
    except Exception as e:  # zlib, EOF, struct and nibabel errors alike mean a damaged file
        raise InputError(f"{path.name} cannot be read as NIfTI ({e})", "the file is truncated or corrupt") from e
    if raw["sform_code"] == 0 and raw["qform_code"] == 0 and np.any(raw["pixdim"][1:4] <= 0):
        raise InputError(f"{path.name} has missing or zero voxel spacing (pixdim {raw['pixdim'][1:4].tolist()}, "
                         "no sform/qform)", "fix the header before segmenting: sizes and volumes depend on it")
    return checked(Volume(data, img.affine.astype(np.float64), str(path), img.header))


def checked(vol: Volume) -> Volume:
    """Refuse what would give a wrong label map rather than an error."""
    data = vol.data
    if not isinstance(data, np.ndarray) or data.dtype.kind not in "biuf":
        what = getattr(data, "dtype", type(data).__name__)
        raise InputError(f"{vol.source} holds {what} voxels; a real-valued intensity volume is expected",
                         "pass a numeric array (complex: take the magnitude first)")
    if data.ndim == 4 and data.shape[3] == 1:
        data = vol.data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{vol.source} is {data.ndim}-D {tuple(data.shape)}; a 3-D volume is expected",
                         "give one 3-D scan (split 4-D series into single volumes)")
    if min(data.shape) < 2:
        raise InputError(f"{vol.source} has shape {tuple(data.shape)}: that is a 2-D image, not a volume")
    affine = np.asarray(vol.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise InputError(f"{vol.source} has a voxel-to-world affine with NaN/Inf or a wrong shape {affine.shape}",
                         "fix the header (sform/qform: origin and directions) before segmenting")
    spacing = vol.spacing
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 1e-6):
        raise InputError(f"{vol.source} has missing or zero voxel spacing {tuple(np.round(spacing, 4))}",
                         "fix the header (pixdim / affine) before segmenting: sizes and volumes depend on it")
    if abs(np.linalg.det(affine[:3, :3] / spacing)) < 1e-6:  # unit directions: scale-free
        raise InputError(f"{vol.source} has a degenerate affine (its voxel axes are not independent)",
                         "fix the header (sform/qform) before segmenting")
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise InputError(f"{vol.source} contains {bad} NaN/Inf voxels", "repair or mask them before segmenting")
    return vol


def read_dicom_series(folder: Path) -> Volume:
    """One series, slices sorted along the slice normal, rescale slope/intercept applied."""
    import pydicom
    series = defaultdict(list)
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=False)
        except Exception:  # noqa: BLE001, S112 - not DICOM (a DICOMDIR index, a readme...): not in the series
            continue
        if "PixelData" not in ds or "ImagePositionPatient" not in ds:
            continue
        series[str(ds.get("SeriesInstanceUID", "?"))].append(ds)
    if not series:
        raise InputError(f"no DICOM images with positions found in {folder}")
    if len(series) > 1:
        names = "; ".join(f"{uid} ({s[0].get('SeriesDescription', 'no description')}, {len(s)} slices)"
                          for uid, s in series.items())
        raise InputError(f"{folder} holds {len(series)} DICOM series: {names}",
                         "put each series in its own folder and give that folder")
    uid, slices = next(iter(series.items()))
    iop = np.array(slices[0].ImageOrientationPatient, dtype=np.float64)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    slices.sort(key=lambda ds: float(np.dot(normal, np.array(ds.ImagePositionPatient, dtype=np.float64))))
    pos = np.array([np.dot(normal, np.array(ds.ImagePositionPatient, dtype=np.float64)) for ds in slices])
    gaps = np.diff(pos)
    if len(slices) < 2:
        raise InputError(f"series {uid} has a single slice: not a volume")
    step = float(np.median(gaps))
    if step <= 1e-6 or np.any(np.abs(gaps - step) > 0.5 * step):
        worst = int(np.argmax(np.abs(gaps - step)))
        raise InputError(f"series {uid} has missing or uneven slices (gap of {gaps[worst]:.2f} mm after slice "
                         f"{worst + 1}, usual {step:.2f} mm)", "re-export the complete series")
    check_voxels((int(slices[0].Columns), int(slices[0].Rows), len(slices)), f"series {uid}")
    arrays = [ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1) or 1)
              + float(getattr(ds, "RescaleIntercept", 0) or 0) for ds in slices]
    data = np.stack(arrays, axis=-1).transpose(1, 0, 2)  # (rows, cols, k) -> (i=col, j=row, k)
    for ds in slices:  # kept for a DICOM-SEG (UIDs, positions, patient/study), without a second copy of the voxels
        del ds.PixelData
    ps = [float(v) for v in slices[0].PixelSpacing]      # [row spacing, column spacing]
    lps = np.eye(4)
    lps[:3, 0] = row * ps[1]
    lps[:3, 1] = col * ps[0]
    lps[:3, 2] = normal * step
    lps[:3, 3] = np.array(slices[0].ImagePositionPatient, dtype=np.float64)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM LPS -> NIfTI RAS
    return checked(Volume(data, affine, f"DICOM series {uid}", dicom=slices))


def write_labels(labels: np.ndarray, like: Volume, path, overwrite: bool = False) -> Path:
    """A label map on the input's grid (same shape and affine; header kept for NIfTI),
    written to an O_EXCL temp file in the target folder and renamed over the target, so
    a planted symlink is never followed and a failed write leaves nothing behind."""
    import nibabel as nib
    path = check_output(path, overwrite)
    if labels.shape != like.data.shape:
        raise InputError(f"label map {labels.shape} does not match the volume {like.data.shape}")
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    header = like.header.copy() if like.header is not None else None
    img = nib.Nifti1Image(labels.astype(dtype), like.affine, header)
    img.set_data_dtype(dtype)
    img.header["scl_slope"], img.header["scl_inter"] = 1, 0

    def stream(raw):
        if path.name.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as out:
                img.to_stream(out)
        else:
            img.to_stream(raw)
    return write_atomic(path, stream)


def write_atomic(path: Path, write) -> Path:
    """write(binary file) into an O_EXCL temp file beside `path`, fsync, rename over `path`:
    a planted symlink is never followed and a failed write leaves nothing behind."""
    fd, tmp = _exclusive_temp(path)
    try:
        with os.fdopen(fd, "wb") as raw:
            write(raw)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise output_error(e, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


NIFTI_SUFFIXES = (".nii.gz", ".nii")


def check_output(path, overwrite: bool = False, suffixes=NIFTI_SUFFIXES, what: str = "a label map is written as NIfTI"
                 ) -> Path:
    """Refuse an unusable output location before the work that would fill it: a wrong
    suffix, a folder, an existing file (without overwrite), a missing or non-folder parent,
    a name the file system cannot hold, or a folder where no file can be created."""
    path = Path(path)
    if not path.name.endswith(tuple(suffixes)):
        also = f" (or {', '.join(suffixes[1:])})" if len(suffixes) > 1 else ""
        raise UsageError(f"{path}: {what}", f"give a name ending in {suffixes[0]}{also}")
    folder = path.parent
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(os.fsencode(path.name)) > name_max:
        raise UsageError(f"cannot write {path.name[:40]}...: the name is {len(os.fsencode(path.name))} bytes, "
                         f"over this file system's {name_max}", "choose a shorter -o name")
    try:
        if path.is_dir():
            raise UsageError(f"{path} is a folder", f"give a file name ending in {suffixes[0]}")
        if (path.exists() or path.is_symlink()) and not overwrite:
            raise UsageError(f"{path} already exists", "pass --overwrite to replace it")
        for above in (folder, *folder.parents):
            if above.exists() or above.is_symlink():
                if not above.is_dir():
                    raise UsageError(f"cannot write {path}: {above} is a file, not a folder", "choose another -o location")
                break
        if not folder.is_dir():
            raise UsageError(f"cannot write {path}: the folder {folder} does not exist", "create it or choose another -o")
    except OSError as e:  # a path too long for the system, a folder we may not search
        raise output_error(e, path) from None
    fd, probe = _exclusive_temp(path)  # the folder must take a new file: read-only mounts, /proc
    os.close(fd)
    probe.unlink(missing_ok=True)
    return path


def _exclusive_temp(path: Path) -> tuple[int, Path]:
    """A new file beside `path` under an unpredictable name, created with O_EXCL|O_NOFOLLOW:
    nothing planted at that name (a symlink, a file) is ever opened."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(16):
        tmp = path.parent / f".omedge-{secrets.token_hex(8)}.partial"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise output_error(e, path) from None
    raise UsageError(f"cannot create a temporary file beside {path}", "choose another -o location")


_OUTPUT_REASONS = {errno.EACCES: "no permission to write in {folder}", errno.EPERM: "no permission to write in {folder}",
                   errno.EROFS: "{folder} is on a read-only file system", errno.ENOTDIR: "{folder} is not a folder",
                   errno.ENOENT: "{folder} does not accept new files", errno.ENAMETOOLONG: "the name is too long",
                   errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                   errno.EXDEV: "{folder} is on another file system than the temp file"}


def output_error(e: OSError, path: Path) -> UsageError:
    """An OSError while writing `path`, as a UsageError that says what is wrong with the place."""
    reason = _OUTPUT_REASONS.get(e.errno, f"{e.strerror or e}").format(folder=path.parent)
    hint = "free some space or choose another -o location" if e.errno in (errno.ENOSPC, errno.EDQUOT) \
        else "choose another -o location"
    return UsageError(f"cannot write {path}: {reason}", hint)
