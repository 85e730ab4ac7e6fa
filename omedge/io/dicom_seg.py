"""Label maps out as DICOM Segmentation objects (highdicom), for PACS and DICOM viewers.

The SEG references the source series it was computed from: every frame points at its
source slice's SOP instance, and the SEG shares that series' study and frame of
reference, so a viewer lays it over the CT without any registration. One segment per
label *present* (not per class of the model): viewers list every segment as a structure,
and a 105-class model would otherwise offer a hundred empty ones; each segment's
description keeps the model's class id, its label the bundle's name, its colour the
preview's (omedge.pictures.label_colours)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError, UsageError
from .volume import Volume, check_output, write_atomic

SEG_SUFFIXES = (".dcm",)
SERIES_NUMBER = 9001   # a high number, as most scanners give derived series
LO_MAX = 64            # the DICOM LO value length: labels, names, versions


def _highdicom():
    try:
        import highdicom
    except ImportError:
        raise UsageError("writing DICOM-SEG needs highdicom", 'pip install "omedge[dicom]"') from None
    return highdicom


def check_seg_source(vol: Volume) -> list:
    """The source datasets a SEG can reference, or a clear refusal: NIfTI has none, and a
    series without one shared FrameOfReferenceUID cannot be overlaid in a viewer."""
    slices = getattr(vol, "dicom", None)
    if not slices:
        raise UsageError(f"{vol.source} is not a DICOM series: a DICOM-SEG must reference the DICOM images it "
                         "segments", "give the DICOM series folder, or write a NIfTI label map (-o seg.nii.gz)")
    for key in ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if any(not ds.get(key) for ds in slices):
            raise InputError(f"{vol.source} has slices without {key}; a DICOM-SEG cannot reference them",
                             "re-export the series from the PACS with its identifiers")
    frames = {str(ds.get("FrameOfReferenceUID", "") or "") for ds in slices}
    if "" in frames:
        raise InputError(f"{vol.source} has no FrameOfReferenceUID (0020,0052): a DICOM-SEG's geometry would not "
                         "be tied to the images", "re-export the series with its Frame of Reference module, or write "
                         "a NIfTI label map (-o seg.nii.gz)")
    if len(frames) > 1:
        raise InputError(f"{vol.source} mixes {len(frames)} frames of reference", "give one series acquired in one "
                         "frame of reference")
    return slices


def _property_codes(name: str):
    """(category, type) coded concepts: a SNOMED CT anatomy code where the label name is
    exactly that code's meaning ("liver" -> Liver), else the generic Tissue; never a guess."""
    from pydicom.sr.codedict import codes
    keyword = "".join(w.capitalize() for w in name.replace("_", " ").split())
    code = getattr(codes.SCT, keyword, None) if keyword.isidentifier() else None
    if code is not None and code.meaning.lower() == name.replace("_", " ").lower():
        return codes.SCT.AnatomicalStructure, code
    return codes.SCT.Tissue, codes.SCT.Tissue


def segment_descriptions(present: list[int], names, model: str, version: str, software: str):
    """One SegmentDescription per class id present, numbered 1..n in class id order."""
    from pydicom.sr.codedict import codes

    from ..pictures import label_colours, label_name
    hd = _highdicom()
    algorithm = hd.AlgorithmIdentificationSequence(name=model[:LO_MAX], family=codes.cid7162.ArtificialIntelligence,
                                                   version=version[:LO_MAX], source=software[:LO_MAX])
    colours = label_colours(max(present, default=0) + 1)
    out = []
    for number, cls in enumerate(present, start=1):
        name = label_name(names, cls)
        category, kind = _property_codes(name)
        desc = hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:LO_MAX], segmented_property_category=category,
            segmented_property_type=kind, algorithm_type="AUTOMATIC", algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*(int(v) for v in colours[cls])))
        desc.SegmentDescription = f"model class {cls}"  # (0062,0006): the label map value it came from
        out.append(desc)
    return out


def seg_frames(labels: np.ndarray, vol: Volume, present: list[int]) -> np.ndarray:
    """The label map (NIfTI order i=column, j=row, k=slice in read order) as one
    (rows, columns) frame per source slice, in the order of vol.dicom, with segment
    numbers 1..n in place of class ids."""
    if labels.shape != vol.data.shape:
        raise InputError(f"label map {labels.shape} does not match the volume {vol.data.shape}")
    lut = np.zeros(int(labels.max(initial=0)) + 1, np.uint16)
    lut[present] = np.arange(1, len(present) + 1)
    return np.ascontiguousarray(lut[labels].transpose(2, 1, 0))


def build_seg(labels: np.ndarray, vol: Volume, names=None, model: str = "omedge model", version: str = "unknown"):
    """The highdicom Segmentation dataset (BINARY, empty frames omitted)."""
    from .. import __version__
    hd = _highdicom()
    slices = check_seg_source(vol)
    labels = np.asarray(labels)
    present = [int(v) for v in np.unique(labels) if v > 0]
    software = f"omedge {__version__}"
    descriptions = segment_descriptions(present, names, model, version, software)
    frames = seg_frames(labels, vol, present)
    if not present:  # highdicom needs a segment; a SEG that says "nothing found" is still a result
        raise InputError(f"no structure was found in {vol.source}: a DICOM-SEG needs at least one segment",
                         "write a NIfTI label map (-o seg.nii.gz) to keep the empty result")
    return hd.seg.Segmentation(
        source_images=slices, pixel_array=frames, segmentation_type="BINARY", segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="omedge", manufacturer_model_name=model[:LO_MAX], software_versions=software[:LO_MAX],
        device_serial_number=version[:16] or "unknown", series_description=f"{model} segmentation"[:LO_MAX],
        content_label="OMEDGE_SEG", content_description=f"{model} automatic segmentation"[:LO_MAX])


def write_dicom_seg(labels: np.ndarray, vol: Volume, path, names=None, model: str = "omedge model",
                    version: str = "unknown", overwrite: bool = False) -> Path:
    """Write the SEG of `labels` (on vol's grid) beside nothing else: to an O_EXCL temp file,
    renamed over `path` (.dcm), refused if it exists unless overwrite."""
    path = check_output(path, overwrite, SEG_SUFFIXES, "a DICOM-SEG is written as one .dcm file")
    seg = build_seg(labels, vol, names, model, version)
    return write_atomic(path, lambda f: seg.save_as(f, enforce_file_format=True))
