"""The volume preview, checked on its pixels: each label's colour lies where that label's
voxels fall (placed from the affine by the radiological convention, computed here, not
by the code under test) and nowhere else; voxels are square in mm; the legend lists the
names in the palette's colours."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from omedge.errors import UsageError
from omedge.io.volume import Volume, read_volume
from omedge.pictures import (
    CT_WINDOW,
    PANEL_PX,
    label_colours,
    render_preview,
    write_preview,
)
from omedge.runtime.volume import synthetic_ct
from tests.dicom_files import tiny_stunet_bundle
from tests.io.test_volume_io import nifti

NAMES = ["bg", "liver", "kidney", "bone"]
SPACING = (0.8, 1.0, 3.0)   # anisotropic: a squashed view would show


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_stunet_bundle(tmp_path_factory)


def chromatic(rgb: np.ndarray) -> np.ndarray:
    """Pixels that are not grey: only the overlay, the legend swatches and nothing else."""
    rgb = rgb.astype(int)
    return rgb.max(-1) - rgb.min(-1) > 12


def flat_volume(shape=(60, 50, 20), hu=40.0):
    """Constant soft tissue (grey 127 in the CT window) in LPS-like voxel order: i runs
    toward the patient's left (RAS x decreasing), j toward anterior, k toward superior."""
    affine = np.diag([-SPACING[0], SPACING[1], SPACING[2], 1.0])
    return Volume(np.full(shape, hu, np.float32), affine, "flat")


def test_palette_is_fixed_distinct_and_starts_with_background():
    c = label_colours(40)
    assert c.shape == (40, 3) and c.dtype == np.uint8 and not c[0].any()
    assert len({tuple(v) for v in c[1:]}) == 39
    np.testing.assert_array_equal(label_colours(5), c[:5])  # a class keeps its colour whatever the model size


def test_label_colour_is_where_the_label_is_and_nowhere_else():
    vol = flat_volume()
    labels = np.zeros(vol.data.shape, np.uint8)
    labels[5:15, 30:40, 8:12] = 2            # patient's right (small i), anterior (large j)
    image, layout = render_preview(labels, vol, NAMES, alpha=0.5, window=CT_WINDOW)
    px = np.asarray(image)
    extent = max(60 * SPACING[0], 50 * SPACING[1], 20 * SPACING[2])
    assert layout["mm_per_px"] == pytest.approx(extent / PANEL_PX)
    mm = layout["mm_per_px"]
    grey = (40 - CT_WINDOW[0]) / (CT_WINDOW[1] - CT_WINDOW[0]) * 255
    blended = 0.5 * grey + 0.5 * label_colours(3)[2]
    # where the box must appear on each view, in (col0, col1, row0, row1) mm from the panel's top left:
    # axial: patient's right on the left (i=0 at col 0), anterior up (j=49 at row 0)
    # coronal: right on the left, superior up (k=19 at row 0); sagittal: anterior on the left, superior up
    expect = {"axial": (5 * 0.8, 15 * 0.8, (50 - 40) * 1.0, (50 - 30) * 1.0),
              "coronal": (5 * 0.8, 15 * 0.8, (20 - 12) * 3.0, (20 - 8) * 3.0),
              "sagittal": ((50 - 40) * 1.0, (50 - 30) * 1.0, (20 - 12) * 3.0, (20 - 8) * 3.0)}
    sizes = {"axial": (60 * 0.8, 50 * 1.0), "coronal": (60 * 0.8, 20 * 3.0), "sagittal": (50 * 1.0, 20 * 3.0)}
    for view, (c0, c1, r0, r1) in expect.items():
        x0, y0, x1, y1 = layout["views"][view]
        assert (x1 - x0, y1 - y0) == tuple(round(s / mm) for s in sizes[view])  # square voxels
        panel = px[y0:y1, x0:x1]
        rows, cols = np.nonzero(chromatic(panel))
        assert len(rows), view
        assert abs(cols.min() - c0 / mm) <= 1.5 and abs(cols.max() + 1 - c1 / mm) <= 1.5, view
        assert abs(rows.min() - r0 / mm) <= 1.5 and abs(rows.max() + 1 - r1 / mm) <= 1.5, view
        centre = panel[round((r0 + r1) / 2 / mm), round((c0 + c1) / 2 / mm)]
        np.testing.assert_allclose(centre, blended, atol=2)
        outside = panel[~chromatic(panel)]
        assert np.abs(outside.astype(float) - grey).max() <= 2  # the rest: the windowed intensity only
    # the views cut through the label, whatever its position
    assert 5 <= layout["centre"][0] < 15 and 30 <= layout["centre"][1] < 40 and 8 <= layout["centre"][2] < 12


def test_each_label_its_colour_and_the_legend(tmp_path):
    vol = flat_volume()
    labels = np.zeros(vol.data.shape, np.uint8)
    labels[20:30, 20:30, 5:15] = 1
    labels[30:40, 20:30, 5:15] = 3
    out = write_preview(labels, vol, tmp_path / "p.png", NAMES, window=CT_WINDOW)
    image = Image.open(out)
    assert image.text["omedge:legend"] == "1=liver;3=bone"
    px = np.asarray(image.convert("RGB"))
    _, layout = render_preview(labels, vol, NAMES, window=CT_WINDOW)
    assert [(c, n) for c, n, _ in layout["legend"]] == [(1, "liver"), (3, "bone")]
    palette = label_colours(4)
    for cls, _, (x0, y0, x1, y1) in layout["legend"]:
        np.testing.assert_array_equal(px[y0 + 2:y1 - 1, x0 + 2:x1 - 1].reshape(-1, 3).min(0), palette[cls])
        np.testing.assert_array_equal(px[y0 + 2:y1 - 1, x0 + 2:x1 - 1].reshape(-1, 3).max(0), palette[cls])
    x0, y0, x1, y1 = layout["views"]["axial"]
    panel = px[y0:y1, x0:x1].astype(float)
    grey = (40 - CT_WINDOW[0]) / (CT_WINDOW[1] - CT_WINDOW[0]) * 255
    hues = {tuple(np.round((v - 0.5 * grey) / 0.5)) for v in panel[chromatic(panel)]}
    found = {cls for cls in (1, 2, 3) if any(np.abs(np.array(h) - palette[cls]).max() <= 4 for h in hues)}
    assert found == {1, 3}


def test_empty_labels_show_the_volume_centre_and_say_so():
    vol = Volume(synthetic_ct((40, 36, 16), seed=3).data, np.diag([1.0, 1.0, 2.0, 1.0]), "phantom")
    image, layout = render_preview(np.zeros(vol.data.shape, np.uint8), vol, NAMES)
    assert layout["centre"] == (20, 18, 8) and layout["legend"] == []
    px = np.asarray(image)
    for x0, y0, x1, y1 in layout["views"].values():
        assert not chromatic(px[y0:y1, x0:x1]).any()
    assert px.min() == 0 and px.max() == 255      # air below the window is black, bone above it white


def test_preview_output_is_checked(tmp_path):
    vol, labels = flat_volume(), np.zeros((60, 50, 20), np.uint8)
    write_preview(labels, vol, tmp_path / "p.png")
    with pytest.raises(UsageError, match="already exists"):
        write_preview(labels, vol, tmp_path / "p.png")
    with pytest.raises(UsageError, match="PNG"):
        write_preview(labels, vol, tmp_path / "p.jpg")
    from omedge.errors import InputError
    with pytest.raises(InputError, match="does not match"):
        render_preview(labels[:, :, :-1], vol)


def test_cli_nifti_with_a_preview(bundle, tmp_path):
    affine = np.array([[-1.2, 0, 0, 50.0], [0, 1.1, 0, -20.0], [0, 0, 2.5, 10.0], [0, 0, 0, 1]])
    ct = nifti(tmp_path, synthetic_ct((50, 44, 16), seed=5).data, affine)
    out, png = tmp_path / "ct_seg.nii.gz", tmp_path / "ct.png"
    cmd = [sys.executable, "-m", "omedge.cli", "predict", str(bundle), str(ct), "-o", str(out), "--preview", str(png)]
    r = subprocess.run([*cmd, "--json"], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)["results"][0]
    assert res["format"] == "nifti" and res["preview"] == str(png)
    seg = read_volume(out)
    assert np.allclose(seg.affine, affine)
    present = [int(c) for c in np.unique(seg.data) if c > 0]
    assert Image.open(png).text["omedge:legend"] == ";".join(f"{c}={NAMES[c]}" for c in present)
    with Image.open(png) as im:
        rgb = np.asarray(im.convert("RGB"))
    assert chromatic(rgb).any() == bool(present)
