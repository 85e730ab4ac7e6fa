"""CT/MR volumes in and label maps out: NIfTI (nibabel) and DICOM series (pydicom).

A Volume keeps the voxel data in NIfTI order (i, j, k) with its 4x4 voxel-to-RAS
affine, so a label map written back lands exactly on the input's grid."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, UsageError


@dataclass
class Volume:
    data: np.ndarray          # float32, (i, j, k)
    affine: np.ndarray        # voxel -> RAS mm
    source: str
    header: object = None     # nibabel header of a NIfTI input, reused when writing

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)


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
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj, dtype=np.float32)
        with nib.openers.ImageOpener(str(path)) as f:  # as stored: nibabel "fixes" zero pixdims to 1
            raw = nib.Nifti1Header.from_fileobj(f, check=False)
    except Exception as e:
        raise InputError(f"{path.name} cannot be read as NIfTI ({e})", "the file is truncated or corrupt") from e
    if raw["sform_code"] == 0 and raw["qform_code"] == 0 and np.any(raw["pixdim"][1:4] <= 0):
        raise InputError(f"{path.name} has missing or zero voxel spacing (pixdim {raw['pixdim'][1:4].tolist()}, "
                         "no sform/qform)", "fix the header before segmenting: sizes and volumes depend on it")
    return checked(Volume(data, img.affine.astype(np.float64), str(path), img.header))


def checked(vol: Volume) -> Volume:
    """Refuse what would give a wrong label map rather than an error."""
    data = vol.data
    if data.ndim == 4 and data.shape[3] == 1:
        data = vol.data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{vol.source} is {data.ndim}-D {tuple(data.shape)}; a 3-D volume is expected",
                         "give one 3-D scan (split 4-D series into single volumes)")
    if min(data.shape) < 2:
        raise InputError(f"{vol.source} has shape {tuple(data.shape)}: that is a 2-D image, not a volume")
    spacing = vol.spacing
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 1e-6):
        raise InputError(f"{vol.source} has missing or zero voxel spacing {tuple(np.round(spacing, 4))}",
                         "fix the header (pixdim / affine) before segmenting: sizes and volumes depend on it")
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
        except Exception:
            continue  # not DICOM (a DICOMDIR index, a readme...)
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
    arrays = [ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1) or 1)
              + float(getattr(ds, "RescaleIntercept", 0) or 0) for ds in slices]
    data = np.stack(arrays, axis=-1).transpose(1, 0, 2)  # (rows, cols, k) -> (i=col, j=row, k)
    ps = [float(v) for v in slices[0].PixelSpacing]      # [row spacing, column spacing]
    lps = np.eye(4)
    lps[:3, 0] = row * ps[1]
    lps[:3, 1] = col * ps[0]
    lps[:3, 2] = normal * step
    lps[:3, 3] = np.array(slices[0].ImagePositionPatient, dtype=np.float64)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM LPS -> NIfTI RAS
    return checked(Volume(data, affine, f"DICOM series {uid}"))


def write_labels(labels: np.ndarray, like: Volume, path, overwrite: bool = False) -> Path:
    """A label map on the input's grid (same shape and affine; header kept for NIfTI)."""
    import nibabel as nib
    path = Path(path)
    if path.exists() and not overwrite:
        raise UsageError(f"{path} already exists", "pass --overwrite to replace it")
    if labels.shape != like.data.shape:
        raise InputError(f"label map {labels.shape} does not match the volume {like.data.shape}")
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    header = like.header.copy() if like.header is not None else None
    img = nib.Nifti1Image(labels.astype(dtype), like.affine, header)
    img.set_data_dtype(dtype)
    img.header["scl_slope"], img.header["scl_inter"] = 1, 0
    tmp = path.with_name(f".partial-{path.name}")  # keeps the extension nibabel reads
    nib.save(img, str(tmp))
    tmp.replace(path)
    return path
