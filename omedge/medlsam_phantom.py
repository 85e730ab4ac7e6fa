"""Synthetic CTs and support sets for MedLSAM's export and verification checks (numpy only,
no patient data): a body of soft tissue and fat in air with three ellipsoid "organs" of
distinct HU, their label map, and support folders in both layouts MedLSAM reads."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .io.volume import Volume

# centre mm, radii mm, HU; all within +-25 mm of the middle, so the tiny MedLAM's 32-voxel
# (96 mm) refinement window around the centre reaches every extreme point
ORGANS = {1: ((-14.0, -8.0, -6.0), (10.0, 9.0, 10.0), 300.0),
          2: ((14.0, -6.0, 4.0), (9.0, 8.0, 11.0), 500.0),
          3: ((0.0, 16.0, -2.0), (10.0, 7.0, 9.0), 750.0)}
GREY_THRESHOLD = 118   # between soft tissue (40 HU) and the organs in MedLSAM's slice grey levels


def centred_affine(shape, spacing) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * s for n, s in zip(shape, spacing)]
    return affine


def phantom(shape=(48, 44, 38), spacing=(2.5, 2.5, 3.0), shift_mm=(0.0, 0.0, 0.0), scale=1.0, seed=0,
            affine=None) -> tuple[Volume, np.ndarray]:
    """(CT in HU, labels) on a grid centred on the body; shift/scale move and resize the organs."""
    rng = np.random.default_rng(seed)
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    ct = np.full(shape, -1000.0, np.float32)
    ct[(x / 55) ** 2 + (y / 48) ** 2 < 1] = -80
    ct[(x / 50) ** 2 + (y / 43) ** 2 < 1] = 40
    labels = np.zeros(shape, np.uint8)
    for c, (centre, radii, hu) in ORGANS.items():
        d = sum(((v - (m + s)) / (r * scale)) ** 2 for v, m, s, r in zip((x, y, z), centre, shift_mm, radii))
        ct[d < 1] = hu
        labels[d < 1] = c
    ct = np.round(ct + rng.normal(0, 10, shape)).astype(np.float32)
    return Volume(ct, centred_affine(shape, spacing) if affine is None else affine, f"phantom seed {seed}"), labels


def support_cases(n: int = 2) -> list[tuple[Volume, np.ndarray]]:
    """n annotated phantoms, shifted and scaled a little (the support set of the checks)."""
    return [phantom(shift_mm=(3.0 * (i + 1), -2.0 * i, 2.0), scale=1.0 + 0.05 * i, seed=10 + i) for i in range(n)]


def save(path: Path, data, affine) -> Path:
    import nibabel as nib
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def support_folder(folder: Path, layout: str = "pairs", n: int = 2) -> Path:
    """support_cases(n) in MedLSAM's layout (NAME + NAME_label) or nnU-Net's (imagesTr/labelsTr)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (vol, labels) in enumerate(support_cases(n)):
        if layout == "pairs":
            save(folder / f"case{i}.nii.gz", vol.data, vol.affine)
            save(folder / f"case{i}_label.nii.gz", labels, vol.affine)
        else:
            (folder / "imagesTr").mkdir(exist_ok=True)
            (folder / "labelsTr").mkdir(exist_ok=True)
            save(folder / "imagesTr" / f"case{i}_0000.nii.gz", vol.data, vol.affine)
            save(folder / "labelsTr" / f"case{i}.nii.gz", labels, vol.affine)
    return folder
