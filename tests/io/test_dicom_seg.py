"""DICOM-SEG out: written from a label map and its source series (shuffled on disk,
oblique), read back with pydicom and rebuilt from the frames' referenced SOP instances;
geometry, identifiers and labels must equal the input's. Bad sources are refused."""
import json
import subprocess
import sys

import numpy as np
import pydicom
import pytest

from omedge.errors import InputError, UsageError
from omedge.io.dicom_seg import write_dicom_seg
from omedge.io.volume import read_volume
from omedge.pictures import label_colours
from omedge.runtime.volume import synthetic_ct
from tests.dicom_files import oblique, tiny_stunet_bundle, write_series
from tests.io.test_volume_io import nifti

NAMES = ["bg", "liver", "kidney", "bone"]
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_stunet_bundle(tmp_path_factory)


def known_labels(shape):
    """Classes 1 and 3 (2 absent), off-centre so a flipped or transposed frame shows."""
    labels = np.zeros(shape, np.uint8)
    labels[2:9, 3:7, 1:5] = 1
    i, j, k = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    labels[(i - shape[0] * 0.7) ** 2 + (j - shape[1] * 0.6) ** 2 + ((k - shape[2] * 0.6) * 2) ** 2 < 30] = 3
    return labels


def rebuild(seg, info, names):
    """The label volume (i=column, j=row, k=slice order of the source) from the SEG's frames,
    each placed by its referenced source SOP instance; checks each frame's plane position."""
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    cls_of = {s.SegmentNumber: names.index(s.SegmentLabel) for s in seg.SegmentSequence}
    out = np.zeros((seg.Columns, seg.Rows, len(info["sops"])), np.uint8)
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        ref = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = info["sops"].index(ref)
        np.testing.assert_allclose([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient],
                                   info["positions"][k], atol=1e-4)
        cls = cls_of[group.SegmentIdentificationSequence[0].ReferencedSegmentNumber]
        assert not (out[:, :, k][frame.T > 0]).any(), "two segments claim one voxel in a BINARY label map"
        out[:, :, k][frame.T > 0] = cls
    return out


def test_seg_round_trip_on_a_shuffled_oblique_series(tmp_path):
    hu = synthetic_ct((24, 20, 10), seed=1).data.round()
    info = write_series(tmp_path / "ct", hu, spacing=(0.8, 0.7, 2.5), iop=oblique(), seed=3)
    vol = read_volume(info["folder"])
    assert [ds.SOPInstanceUID for ds in vol.dicom] == info["sops"]  # slice order, not file order
    assert all("PixelData" not in ds for ds in vol.dicom)           # the voxels are held once, in vol.data
    labels = known_labels(hu.shape)
    out = write_dicom_seg(labels, vol, tmp_path / "seg.dcm", NAMES, model="stu-net tiny", version="ab" * 32)
    seg = pydicom.dcmread(out)
    assert seg.SOPClassUID == SEG_STORAGE and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == info["study"] and seg.FrameOfReferenceUID == info["frame_of_reference"]
    assert seg.SeriesInstanceUID not in (info["series"], vol.dicom[0].SeriesInstanceUID)
    assert seg.PatientID == "PH001"
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == info["series"]
    assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == set(info["sops"])
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                               info["iop"], atol=1e-6)
    np.testing.assert_allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing], [0.7, 0.8])
    np.testing.assert_array_equal(rebuild(seg, info, NAMES), labels)


def test_segments_name_colour_and_identify_the_algorithm(tmp_path):
    import highdicom as hd
    info = write_series(tmp_path / "ct", synthetic_ct((24, 20, 10), seed=2).data.round())
    labels = known_labels((24, 20, 10))
    seg = pydicom.dcmread(write_dicom_seg(labels, read_volume(info["folder"]), tmp_path / "s.dcm", NAMES,
                                          model="stu-net tiny", version="cd" * 32))
    segs = {s.SegmentLabel: s for s in seg.SegmentSequence}
    assert sorted(segs) == ["bone", "liver"]  # only what is present: class 2 (kidney) has no segment
    palette = label_colours(4)
    for name, s in segs.items():
        cls = NAMES.index(name)
        assert s.SegmentDescription == f"model class {cls}" and s.SegmentAlgorithmType == "AUTOMATIC"
        rgb = hd.color.CIELabColor.from_dicom_value(list(s.RecommendedDisplayCIELabValue)).to_rgb()
        assert np.abs(np.array(rgb, int) - palette[cls].astype(int)).max() <= 2
        alg = s.SegmentationAlgorithmIdentificationSequence[0]
        assert alg.AlgorithmName == "stu-net tiny" and alg.AlgorithmVersion == "cd" * 32
        assert alg.AlgorithmSource.startswith("omedge ")
        # a name that is exactly a SNOMED CT meaning gets that code; anything else the generic Tissue
        assert s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == name.capitalize()


def test_seg_output_is_atomic_and_not_overwritten(tmp_path):
    info = write_series(tmp_path / "ct", synthetic_ct((24, 20, 8), seed=4).data.round())
    vol, labels = read_volume(info["folder"]), known_labels((24, 20, 8))
    out = write_dicom_seg(labels, vol, tmp_path / "seg.dcm", NAMES)
    first = out.read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        write_dicom_seg(labels, vol, out, NAMES)
    assert out.read_bytes() == first
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    link = tmp_path / "link.dcm"
    link.symlink_to(outside)
    write_dicom_seg(labels, vol, link, NAMES, overwrite=True)   # the link is replaced, never followed
    assert outside.read_text() == "keep me" and not link.is_symlink()
    with pytest.raises(UsageError, match=r"\.dcm"):
        write_dicom_seg(labels, vol, tmp_path / "seg.nii.gz", NAMES)
    with pytest.raises(InputError, match="no structure"):
        write_dicom_seg(np.zeros_like(labels), vol, tmp_path / "empty.dcm", NAMES)
    with pytest.raises(InputError, match="does not match"):
        write_dicom_seg(labels[:-1], vol, tmp_path / "short.dcm", NAMES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "link.dcm", "outside.txt", "seg.dcm"]


def test_seg_needs_a_dicom_source_with_a_frame_of_reference(tmp_path):
    hu = synthetic_ct((24, 20, 8), seed=5).data.round()
    labels = known_labels(hu.shape)
    ct = read_volume(nifti(tmp_path, hu, np.diag([0.8, 0.7, 2.5, 1])))
    with pytest.raises(UsageError, match="not a DICOM series"):
        write_dicom_seg(labels, ct, tmp_path / "a.dcm", NAMES)
    info = write_series(tmp_path / "nofor", hu, frame_of_reference=False)
    with pytest.raises(InputError, match="FrameOfReferenceUID"):
        write_dicom_seg(labels, read_volume(info["folder"]), tmp_path / "b.dcm", NAMES)
    assert not (tmp_path / "a.dcm").exists() and not (tmp_path / "b.dcm").exists()


def predict_with(p, *args) -> tuple[int, str]:
    """`omedge predict BUNDLE ...` parsed by the CLI's own parser and run by the volume kind's
    CLI handler on an already opened bundle: (exit code, error message), as the CLI prints them."""
    from omedge.cli import build_parser
    from omedge.cli.commands import UI
    from omedge.errors import OmedgeError
    from omedge.kinds import get_kind
    args = build_parser().parse_args(["predict", str(p.path), *map(str, args)])
    try:
        return get_kind("volume").cli_predict(p, args, UI()), ""
    except OmedgeError as e:
        return e.exit_code, str(e)


def test_cli_writes_a_seg_and_a_preview_for_a_dicom_series(bundle, tmp_path):
    from PIL import Image

    import omedge
    info = write_series(tmp_path / "ct", synthetic_ct((48, 40, 16), seed=7).data.round(), spacing=(1.2, 1.1, 2.0),
                        iop=oblique(-30, 10), seed=1)
    out, png = tmp_path / "seg.dcm", tmp_path / "seg.png"
    r = subprocess.run([sys.executable, "-m", "omedge.cli", "predict", str(bundle), str(info["folder"]), "-o", str(out),
                        "--format", "dicom-seg", "--preview", str(png), "--json"], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)["results"][0]
    assert res["format"] == "dicom-seg" and res["output"] == str(out) and res["preview"] == str(png)
    p = omedge.load(bundle)
    labels, _ = p.segment(info["folder"])
    seg = pydicom.dcmread(out)
    np.testing.assert_array_equal(rebuild(seg, info, NAMES), labels)
    from omedge.manifest import stored_hash
    alg = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert alg.AlgorithmVersion == stored_hash(bundle) and alg.AlgorithmName == "stu-net tiny"
    assert seg.FrameOfReferenceUID == info["frame_of_reference"]
    legend = Image.open(png).text["omedge:legend"]
    assert legend == ";".join(f"{c}={NAMES[c]}" for c in np.unique(labels) if c > 0)
    code, err = predict_with(p, info["folder"], "-o", out)  # .dcm: a SEG by default; it exists
    assert code == 2 and "already exists" in err


def test_cli_refuses_a_seg_without_a_series_before_segmenting(bundle, tmp_path, monkeypatch):
    import omedge
    import omedge.runtime.volume as runtime_volume
    p = omedge.load(bundle)
    ran = []
    monkeypatch.setattr(runtime_volume, "sliding_window", lambda *a, **k: ran.append(1))  # must never be reached
    hu = synthetic_ct((40, 36, 12), seed=8).data.round()
    ct = nifti(tmp_path, hu, np.diag([1.0, 1.0, 2.0, 1]))
    for extra in (["--format", "dicom-seg", "-o", tmp_path / "a.dcm"], ["-o", tmp_path / "a.dcm"]):
        code, err = predict_with(p, ct, *extra)
        assert code == 2 and "not a DICOM series folder" in err
    info = write_series(tmp_path / "nofor", hu, frame_of_reference=False)
    code, err = predict_with(p, info["folder"], "-o", tmp_path / "b.dcm", "--preview", tmp_path / "b.png")
    assert code == 6 and "FrameOfReferenceUID" in err
    code, err = predict_with(p, info["folder"], "--format", "dicom-seg", "-o", tmp_path / "b.nii.gz")
    assert code == 2 and ".dcm" in err
    assert not ran and sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "nofor"]
