"""Volume bundles over OIP with raw files as BYTES: a NIfTI (.nii.gz / .nii) or a zip of
one DICOM series is decoded on the server through read_volume (its header checks and
voxel limits) and segmented as `p.segment` does; the label map comes back on the input
grid with its affine."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

pytest.importorskip("fastapi")
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

import omedge
from tests.io.test_volume_io import nifti, write_dicom_series
from tests.serve.test_batch import volume_bundle  # noqa: F401  (a module fixture)
from tests.serve.test_server import TIMEOUT, loopback_only, serving  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def served(volume_bundle):  # noqa: F811
    with serving([f"ct={volume_bundle}"]) as s:
        yield s


def _infer(s, data: bytes):
    c = triton.InferenceServerClient(s.host, connection_timeout=TIMEOUT, network_timeout=TIMEOUT)
    inp = triton.InferInput("volume", [1], "BYTES")
    inp.set_data_from_numpy(np.array([data], dtype=object))
    out = c.infer("ct", [inp], outputs=[triton.InferRequestedOutput("labels"), triton.InferRequestedOutput("affine")])
    return out.as_numpy("labels")[0], out.as_numpy("affine")[0]


def test_nifti_bytes_give_the_label_map_of_segment(served, volume_bundle, tmp_path):  # noqa: F811
    from omedge.runtime.volume import synthetic_ct
    affine = np.array([[-1.5, 0, 0, 90.0], [0, 1.5, 0, -60.0], [0, 0, 2.0, -100.0], [0, 0, 0, 1]])
    path = nifti(tmp_path, synthetic_ct((40, 36, 24), seed=3).data, affine, "ct.nii.gz")
    labels, got_affine = _infer(served, path.read_bytes())
    expected, _ = omedge.load(volume_bundle).segment(path)
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_allclose(got_affine, affine)
    plain = nifti(tmp_path, synthetic_ct((40, 36, 24), seed=3).data, affine, "ct.nii")   # uncompressed
    np.testing.assert_array_equal(_infer(served, plain.read_bytes())[0], expected)


def test_a_zipped_dicom_series_is_segmented(served, volume_bundle, tmp_path):  # noqa: F811
    from omedge.runtime.volume import synthetic_ct
    series = tmp_path / "series"
    write_dicom_series(series, synthetic_ct((32, 32, 20), seed=5).data.transpose(2, 1, 0))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(series.iterdir()):
            z.write(f, f"../../escape/{f.name}")   # hostile names: flattened, never followed
    labels, _ = _infer(served, buf.getvalue())
    expected, _ = omedge.load(volume_bundle).segment(series)
    np.testing.assert_array_equal(labels, expected)
    assert not (tmp_path.parent.parent / "escape").exists()


@pytest.mark.parametrize("data, message", [
    (b"not a volume at all" * 40, "neither NIfTI"),
    (b"\x1f\x8b broken gzip" * 40, "NIfTI"),
    (b"PK\x03\x04 not really a zip" * 40, "zip"),
])
def test_bad_volume_bytes_are_400_and_the_server_goes_on(served, data, message, tmp_path):
    with pytest.raises(InferenceServerException) as err:
        _infer(served, data)
    assert "400" in str(err.value.status()) and message in err.value.message()
    c = triton.InferenceServerClient(served.host, connection_timeout=TIMEOUT, network_timeout=TIMEOUT)
    assert c.is_model_ready("ct")
