"""`omedge predict BUNDLE SLIDE` end to end, in a fresh process that never imports torch:
a slide suffix (or --wsi) dispatches to the WSI pipeline; --json gives the summary;
bad slides exit with InputError's code and a message, never a traceback."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import h5py
import pytest

from tests.wsi_files import Layout, write_slide

RUN = """import sys
from omedge.cli import main
rc = main(sys.argv[1:])
bad = [m for m in ("torch", "nncf", "transformers", "timm") if m in sys.modules]
assert not bad, f"the run side imported {bad}"
sys.exit(rc)
"""
LAYOUT = Layout(2688, 2240, tissue=[(448, 448, 1792, 1344)], pen=[(200, 1700, 1500, 1800)])


def omedge_cli(*args):
    return subprocess.run([sys.executable, "-c", RUN, *map(str, args)], capture_output=True, text=True, timeout=300,
                          check=False)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    return {"svs": write_slide(d / "slide.svs", LAYOUT),
            "tif": write_slide(d / "generic.tif", LAYOUT, compression="zlib", style="generic"),
            "blank": write_slide(d / "blank.svs", Layout(1792, 1792), downsamples=(1, 4))}


def test_predict_slide_to_hdf5_and_thumbnail(brow_bundle, slides, tmp_path):
    out, png = tmp_path / "slide_features.h5", tmp_path / "slide.png"
    r = omedge_cli("predict", brow_bundle, slides["svs"], "--mpp", "0.5", "--tile", "224", "-o", out,
                   "--thumbnail", png, "--backend", "openvino", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)["results"][0]
    assert result["tiles"] == 6 and result["skipped"] == 0 and result["tiles_planned"] == 6
    assert 0.15 < result["tissue_fraction"] < 0.3 and result["thumbnail"] == str(png) and png.stat().st_size > 0
    with h5py.File(out) as f:
        assert f["features"].shape[0] == 6 and f["coords"].shape == (6, 2) and f.attrs["mpp"] == 0.5
        assert f.attrs["backend"] == "openvino"
    again = omedge_cli("predict", brow_bundle, slides["svs"], "-o", out)
    assert again.returncode == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr


def test_tif_needs_wsi_flag_and_text_output(brow_bundle, slides, tmp_path):
    out = tmp_path / "g.h5"
    r = omedge_cli("predict", brow_bundle, slides["tif"], "--wsi", "--mpp", "1.0", "-o", out)
    assert r.returncode == 0, r.stderr
    printed = re.search(r"g\.h5: (\d+) tiles \(0 skipped", r.stdout)
    with h5py.File(out) as f:
        assert f.attrs["resolution"] == "exact" and f.attrs["level"] == 1 and f.attrs["patch_size_level0"] == 896
        assert printed and int(printed.group(1)) == f["features"].shape[0] == f.attrs["tiles_planned"] > 0


def test_bad_slides_exit_with_a_message(brow_bundle, slides, tmp_path):
    fine = omedge_cli("predict", brow_bundle, slides["svs"], "--mpp", "0.1", "-o", tmp_path / "a.h5")
    assert fine.returncode == 6 and "finer than any of its levels" in fine.stderr and "--mpp-nearest" in fine.stderr
    assert "Traceback" not in fine.stderr
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"\x00" * 1000)
    r = omedge_cli("predict", brow_bundle, junk, "-o", tmp_path / "b.h5")
    assert r.returncode == 6 and "not a whole-slide image" in r.stderr and "Traceback" not in r.stderr
    blank = omedge_cli("predict", brow_bundle, slides["blank"], "-o", tmp_path / "c.h5")
    assert blank.returncode == 0 and "no tissue found" in blank.stderr and "0 tiles" in blank.stdout
