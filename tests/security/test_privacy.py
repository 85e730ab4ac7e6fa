"""Patient data in bundles (issue #12 item 21): the manifest records counts and content
hashes of calibration/verification files, not their names or folders (which carry MRNs,
names and dates of birth), unless asked; `verify_data="synthetic"` keeps every patient
pixel out of parity.npz, and the export says when it does keep some."""
from __future__ import annotations

import numpy as np
import pytest

import omedge
from omedge.runtime.preprocess import preprocess_one

PHI = ("MRN4711", "Doe_Jane", "1961-02-03")


@pytest.fixture(scope="module")
def patient_folder(tmp_path_factory):
    from conftest import write_tiles
    folder = tmp_path_factory.mktemp("home") / "jdoe" / "MRN4711_Doe_Jane_1961-02-03"
    paths = write_tiles(folder, 12, seed=7)
    for i, p in enumerate(paths):
        p.rename(p.with_name(f"MRN4711_Doe_Jane_1961-02-03_slide{i}.png"))
    return folder


def _export(folder, out, **kw):
    messages = []
    b = omedge.export("brow", variant="tiny", random_weights=True, formats=["onnx"], precision="int8",
                      calib=folder, out=out, log=messages.append, **kw)
    return b, messages


def test_no_names_or_folders_in_the_manifest(patient_folder, tmp_path):
    b, messages = _export(patient_folder, tmp_path / "b.omedge")
    text = (b / "manifest.json").read_text()
    for secret in (*PHI, str(patient_folder.parent), "jdoe"):
        assert secret not in text
    assert any("parity.npz keeps" in m and "--verify-data synthetic" in m for m in messages)


def test_names_only_when_asked_and_never_the_absolute_folder(patient_folder, tmp_path):
    b, _ = _export(patient_folder, tmp_path / "b.omedge", record_names=True)
    text = (b / "manifest.json").read_text()
    assert "MRN4711_Doe_Jane_1961-02-03_slide" in text and str(patient_folder.parent) not in text


def test_synthetic_verification_keeps_patient_pixels_out(patient_folder, tmp_path):
    b, messages = _export(patient_folder, tmp_path / "b.omedge", verify_data="synthetic")
    m = omedge.load(b).manifest
    assert m.calibration["samples"] == 12 and "held_out_calibration" not in m.verification
    assert m.verification["synthetic"] >= 1 and not any("parity.npz keeps" in x for x in messages)
    stored = np.load(b / "parity.npz")
    patient = [preprocess_one(p, m.preprocess).astype(np.float16) for p in sorted(patient_folder.iterdir())]
    for key in stored.files:
        if key.startswith("in."):
            assert not any(np.array_equal(stored[key][0], x) for x in patient), key
