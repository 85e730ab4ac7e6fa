"""Synthetic CT series as a scanner writes them: the patient/study/frame-of-reference
modules a DICOM-SEG copies, one file per slice, slices written in shuffled order under
names that do not follow the slice order, optionally an oblique orientation."""
from __future__ import annotations

from pathlib import Path

import numpy as np

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def oblique(degrees: float = 25.0, tilt: float = 15.0) -> list[float]:
    """ImageOrientationPatient of rows turned about the patient's z axis and tilted about
    the row direction: a unit, orthogonal pair that no axis-aligned shortcut reads right."""
    a, t = np.radians(degrees), np.radians(tilt)
    row = np.array([np.cos(a), np.sin(a), 0.0])
    col = np.cos(t) * np.array([-np.sin(a), np.cos(a), 0.0]) + np.sin(t) * np.array([0.0, 0.0, 1.0])
    col -= row * np.dot(row, col)
    return [*row.tolist(), *(col / np.linalg.norm(col)).tolist()]


def write_series(folder, hu: np.ndarray, spacing=(0.8, 0.7, 2.5), iop=(1, 0, 0, 0, 1, 0),
                 origin=(-100.0, -120.0, -50.0), frame_of_reference: bool = True, seed: int = 0) -> dict:
    """hu is (i=column, j=row, k=slice) as io.volume reads a series. Returns the UIDs and,
    in slice order, each slice's SOPInstanceUID and ImagePositionPatient (LPS mm)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    iop = np.asarray(iop, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    sops = [generate_uid() for _ in range(hu.shape[2])]
    positions = [np.asarray(origin, dtype=np.float64) + k * spacing[2] * normal for k in range(hu.shape[2])]
    order = np.random.default_rng(seed).permutation(hu.shape[2])  # the order the files are written in
    for n, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CT_IMAGE, sops[k]
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"IM{n:04d}.dcm"  # file name order is write order, not slice order
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, sops[k]
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "PH001", "19700101", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study, "20260101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "A1", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality, ds.SeriesDescription = series, 3, "CT", "phantom"
        ds.InstanceNumber = int(k) + 1
        if frame_of_reference:
            ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame, ""
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [float(v) for v in positions[k]]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # [row spacing (between rows), column spacing]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (hu[:, :, k].T + 1024).astype(np.int16).tobytes()
        ds.save_as(path, enforce_file_format=True)
    return {"folder": folder, "study": study, "series": series, "frame_of_reference": frame, "sops": sops,
            "positions": np.array(positions), "iop": iop, "spacing": spacing}


_BUNDLES: dict = {}


def small_plans() -> dict:
    """nnU-Net v1 plans (CT scheme) with a small patch and a coarse spacing: the same
    pipeline as STU-Net's 128^3 at 1.5 mm at a tenth of the compute."""
    from collections import OrderedDict
    stage = {"current_spacing": np.array([2.5, 2.0, 2.0]), "patch_size": np.array([32, 64, 64]),
             "pool_op_kernel_sizes": [[2, 2, 2]] * 4 + [[1, 1, 2]]}
    return {"init": ("plans.pkl", 0, "out", "data", True, 1, True, False, True), "name": "STUNetTrainer_small",
            "plans": {"plans_per_stage": {0: stage}, "normalization_schemes": OrderedDict({0: "CT"}),
                      "dataset_properties": {"intensityproperties": {0: {
                          "percentile_00_5": np.float64(-1000.0), "percentile_99_5": np.float64(1500.0),
                          "mean": np.float64(80.0), "sd": np.float64(300.0)}}}}}


def tiny_stunet_bundle(tmp_path_factory):
    """A tiny 4-class STU-Net ONNX bundle from an nnU-Net v1 `.model` checkpoint with its
    plans beside it (as tests/kinds/test_volume.py makes them), exported once per test
    session and shared by the DICOM-SEG and preview tests: the export is most of their time."""
    if "stunet" not in _BUNDLES:
        import pickle

        import torch

        import omedge
        from omedge import models
        sd = models.build(models.get_spec("stu-net"), "tiny", num_classes=4).state_dict()
        folder = tmp_path_factory.mktemp("stunet-seg")
        torch.save({"epoch": 4000, "state_dict": sd, "optimizer_state_dict": {"state": {}, "param_groups": []},
                    "lr_scheduler_state_dict": None, "amp_grad_scaler": {"scale": 1024.0},
                    "plot_stuff": ([np.float64(0.5)], [np.float64(0.4)], [np.float64(0.8)], [np.float64(0.7)])},
                   folder / "tiny_ep4k.model")
        (folder / "tiny_ep4k.model.pkl").write_bytes(pickle.dumps(small_plans()))
        _BUNDLES["stunet"] = omedge.export("stu-net", folder / "tiny_ep4k.model", formats=["onnx"],
                                           labels=["bg", "liver", "kidney", "bone"], out=folder / "stunet")
    return _BUNDLES["stunet"]
