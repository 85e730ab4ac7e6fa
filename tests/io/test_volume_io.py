"""Volumes: NIfTI and DICOM in, label maps out on the same grid; the sliding window."""
import numpy as np
import pytest

from omedge.errors import InputError, UsageError
from omedge.io.volume import Volume, read_volume, write_labels
from omedge.runtime.volume import (class_argmax, dice_per_class, gaussian_importance, segment, sliding_window,
                                   synthetic_ct, window_starts)

PRE = {"kind": "volume", "target_spacing": [1.5, 1.5, 1.5], "patch_size": [32, 32, 32],
       "normalization": "zscore_per_image", "zscore_eps": 1e-8, "step": 0.5, "gaussian_sigma_scale": 0.125}


def threshold_net(batch):
    """A 'network' with a known answer: class 1 where the normalised input is above 1."""
    fg = (batch[:, 0] > 1.0).astype(np.float32)
    return np.stack([1 - fg, fg], axis=1)


def nifti(tmp_path, data, affine, name="ct.nii.gz"):
    import nibabel as nib
    p = tmp_path / name
    nib.save(nib.Nifti1Image(data, affine), str(p))
    return p


def test_nifti_round_trip_keeps_geometry(tmp_path):
    affine = np.array([[-0.8, 0, 0, 120.0], [0, 0.8, 0, -90.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])
    data = synthetic_ct((50, 40, 30)).data
    vol = read_volume(nifti(tmp_path, data, affine))
    assert np.allclose(vol.spacing, [0.8, 0.8, 2.5])
    labels = segment(vol, threshold_net, PRE)
    assert labels.shape == data.shape
    out = write_labels(labels, vol, tmp_path / "seg.nii.gz")
    back = read_volume(out)
    assert np.allclose(back.affine, affine) and back.data.shape == data.shape
    assert set(np.unique(back.data)) <= {0, 1}
    with pytest.raises(UsageError, match="already exists"):
        write_labels(labels, vol, out)


def test_pipeline_matches_the_direct_answer_through_resampling(tmp_path):
    # anisotropic input (resampled to 1.5 mm and back): the label map must follow the
    # thresholded normalised input closely
    vol = synthetic_ct((64, 64, 24), spacing=(1.0, 1.0, 3.0), seed=2)
    labels = segment(vol, threshold_net, PRE)
    x = vol.data
    direct = ((x - x.mean()) / x.std() > 1.0).astype(np.uint16)
    assert dice_per_class(direct, labels)[1] > 0.9


def test_sliding_window_weights_and_small_volumes():
    # nnU-Net: ceil((100 - 32) / (32 * 0.5)) + 1 = 6 windows, evenly spread
    assert window_starts(100, 32, 0.5) == [0, 14, 27, 41, 54, 68] and window_starts(20, 32, 0.5) == [0]
    g = gaussian_importance((32, 32, 32))
    assert g.max() == 1 and g.min() > 0 and g[16, 16, 16] == 1
    x = np.random.default_rng(0).standard_normal((1, 20, 40, 33)).astype(np.float32)
    seen = []
    out = sliding_window(x, lambda b: (seen.append(b.shape), threshold_net(b))[1], (32, 32, 32), 0.5,
                         batch_size=3, mirror=True)
    assert out.shape == (2, 20, 40, 33) and all(s[0] <= 3 for s in seen)  # padded, batched, mirrored
    np.testing.assert_allclose(out.argmax(0), (x[0] > 1.0).astype(int))


@pytest.mark.parametrize("data,affine,match", [
    (np.zeros((64, 64), np.float32), np.eye(4), "2-D"),
    (np.zeros((16, 16, 16, 3), np.float32), np.eye(4), "4-D"),
    (np.zeros((16, 16, 16), np.float32), "zero-pixdim", "zero voxel spacing"),
    (np.full((16, 16, 16), np.nan, np.float32), np.eye(4), "NaN/Inf"),
])
def test_bad_volumes_are_refused(tmp_path, data, affine, match):
    import nibabel as nib
    p = tmp_path / "bad.nii.gz"
    if isinstance(affine, str):  # a header with no usable geometry: pixdim 0, no s/qform
        img = nib.Nifti1Image(data, None)
        img.header["pixdim"][1:4] = [1.0, 1.0, 0.0]
        img.header.set_sform(None, code=0)
        img.header.set_qform(None, code=0)
    else:
        img = nib.Nifti1Image(data, affine)
    nib.save(img, str(p))
    with pytest.raises(InputError, match=match):
        read_volume(p)


def write_dicom_series(folder, volume_hu, spacing=(0.7, 0.7, 2.0), uid="1.2.3.4", skip=(), desc="CT"):
    """A CT series written with pydicom: one file per slice, shuffled names."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    folder.mkdir(parents=True, exist_ok=True)
    rows, cols, n = volume_hu.shape[1], volume_hu.shape[0], volume_hu.shape[2]
    for k in range(n):
        if k in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"x{(k * 7) % n:04d}_{k}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesDescription = "CT", uid, desc
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-100.0, -120.0, -50.0 + k * spacing[2]]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (volume_hu[:, :, k].T + 1024).astype(np.int16).tobytes()
        ds.save_as(ds.filename, enforce_file_format=True)
    return folder


def test_dicom_series_reads_like_the_volume_it_came_from(tmp_path):
    hu = synthetic_ct((48, 40, 12)).data.round()
    vol = read_volume(write_dicom_series(tmp_path / "series", hu))
    np.testing.assert_allclose(vol.data, hu)  # slices sorted, rescale applied
    assert np.allclose(vol.spacing, [0.7, 0.7, 2.0])
    assert np.allclose(vol.affine[:3, 3], [100.0, 120.0, -50.0])  # LPS origin -> RAS
    labels = segment(vol, threshold_net, PRE)
    out = write_labels(labels, vol, tmp_path / "seg.nii.gz")
    assert read_volume(out).data.shape == hu.shape


def test_dicom_folder_mixing_series_or_missing_slices(tmp_path):
    hu = synthetic_ct((32, 32, 10)).data.round()
    mixed = tmp_path / "mixed"
    write_dicom_series(mixed / "a", hu, uid="1.2.3.1", desc="arterial")
    write_dicom_series(mixed / "b", hu, uid="1.2.3.2", desc="venous")
    with pytest.raises(InputError, match="2 DICOM series.*arterial.*venous|2 DICOM series.*venous.*arterial"):
        read_volume(mixed)
    gap = write_dicom_series(tmp_path / "gap", hu, uid="1.2.3.9", skip=(5,))
    with pytest.raises(InputError, match="1.2.3.9 has missing or uneven slices"):
        read_volume(gap)


def test_volume_dataclass_spacing():
    assert np.allclose(Volume(np.zeros((2, 2, 2)), np.diag([0.5, 2, 3, 1.0]), "x").spacing, [0.5, 2, 3])


def test_class_argmax_by_slabs_equals_numpy_argmax():
    """The slab-wise argmax (no whole-array copy) gives numpy's answer, ties included
    (first class wins), for depths that are not a multiple of the slab."""
    logits = np.random.default_rng(0).standard_normal((7, 13, 9, 5)).astype(np.float32)
    logits[2, :4] = logits[5, :4] = 9.0
    for slab in (1, 4, 8, 32):
        got = class_argmax(logits, slab)
        assert got.dtype == np.uint16 and np.array_equal(got, logits.argmax(0))
