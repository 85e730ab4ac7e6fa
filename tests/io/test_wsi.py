"""Whole-slide images: level choice, tissue detection, tiling, the resumable HDF5, the
thumbnail, and bad slides. Slides are synthesised with tifffile (tests/wsi_files.py) and
read back through the real tiffslide; tiles run through the tiny BROW INT8 bundle."""
from __future__ import annotations

import logging
import tracemalloc
import zlib

import h5py
import numpy as np
import pytest

import omedge
from omedge.errors import InputError, UsageError
from omedge.io.wsi import low_res, open_slide, plan_level, tile_grid, tissue_mask
from omedge.wsi import embed_slide
from tests.wsi_files import Layout, corrupt_tile, paint, write_slide

P0 = 448   # level-0 px of a 224 px tile at 0.5 µm/px on a 0.25 µm/px scan
# tissue rectangles on the 448 px grid (so each grid tile is all tissue or none), a pen stroke on glass
LAYOUT = Layout(4032, 3136, tissue=[(448, 448, 1792, 1344), (2240, 896, 3584, 2688)], pen=[(300, 2150, 1900, 2260)])


def expected_tiles(layout: Layout, patch0: int) -> set[tuple[int, int]]:
    """Grid tiles whose centre is tissue (the rectangles are grid-aligned: all or nothing)."""
    return {(x, y) for y in range(0, layout.height - patch0 + 1, patch0)
            for x in range(0, layout.width - patch0 + 1, patch0)
            if layout.truth(np.array(x + patch0 / 2), np.array(y + patch0 / 2))}


@pytest.fixture(scope="module")
def svs(tmp_path_factory):
    return write_slide(tmp_path_factory.mktemp("wsi") / "slide.svs", LAYOUT)


@pytest.fixture(scope="module")
def predictor(brow_bundle):
    return omedge.load(brow_bundle, backend="onnxruntime")


def test_level_for_target_mpp(svs, caplog):
    s = open_slide(svs)
    assert s.level_downsamples == [1.0, 4.0, 16.0] and s.mpp == 0.25 and s.vendor == "aperio"
    exact = plan_level(s, 1.0, 224)
    assert (exact.level, exact.resolution, exact.read_size, exact.patch_level0) == (1, "exact", 224, 896)
    down = plan_level(s, 2.0, 224)   # between levels 1 (1 µm/px) and 2 (4 µm/px): level 1 read, halved
    assert (down.level, down.resolution, down.read_size, down.patch_level0, down.mpp) == (1, "downsampled", 448,
                                                                                          1792, 2.0)
    with pytest.raises(InputError, match="finer than any of its levels") as e:
        plan_level(s, 0.1, 224)
    assert "--mpp-nearest" in e.value.hint
    near = plan_level(s, 0.1, 224, nearest=True)
    assert (near.level, near.resolution, near.mpp, near.patch_level0) == (0, "nearest", 0.25, 224)
    assert "nearest" in near.note


def test_slide_without_mpp_needs_mpp_base(tmp_path):
    path = write_slide(tmp_path / "nompp.svs", Layout(1024, 1024), mpp=None, downsamples=(1, 4))
    s = open_slide(path)
    assert s.mpp is None
    with pytest.raises(InputError, match="does not say its resolution") as e:
        plan_level(s, 0.5, 224)
    assert "--mpp-base" in e.value.hint
    plan = plan_level(s, 0.5, 224, mpp_base=0.25)
    assert (plan.mpp_source, plan.patch_level0) == ("--mpp-base", 448)


def test_tissue_mask_and_grid_on_a_generic_pyramid(tmp_path):
    path = write_slide(tmp_path / "generic.tif", LAYOUT, compression="zlib", style="generic")
    s = open_slide(path)
    assert s.mpp == pytest.approx(0.25) and len(s.level_dims) == 3
    picture, scale = low_res(s)
    mask = tissue_mask(picture, scale * s.mpp)
    yy, xx = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
    truth = LAYOUT.truth((xx + 0.5) * scale, (yy + 0.5) * scale)
    assert (mask == truth).mean() > 0.99            # the pen stroke and the glass are not tissue
    pen = LAYOUT.pen[0]
    assert not mask[int(pen[1] / scale):int(pen[3] / scale), int(pen[0] / scale):int(pen[2] / scale)].any()
    coords, fraction = tile_grid(mask, scale, s.dims, P0, 0.5)
    assert {tuple(c) for c in coords.tolist()} == expected_tiles(LAYOUT, P0)
    assert coords.dtype == np.int64 and (fraction > 0.9).all()


def test_embed_slide_writes_clam_layout_equal_to_predict(svs, predictor, brow_bundle, tmp_path):
    out = tmp_path / "slide_features.h5"
    summary = embed_slide(predictor, svs, mpp=0.5, tile=224, out=out, batch_size=5, workers=3)
    want = expected_tiles(LAYOUT, P0)
    assert summary["tiles"] == len(want) and summary["skipped"] == 0 and summary["resolution"] == "downsampled"
    with h5py.File(out) as f:
        feats, coords, a = f["features"][:], f["coords"][:], dict(f.attrs)
        assert f["coords"].attrs["patch_size_level0"] == P0 and f["coords"].attrs["patch_level"] == 0
    assert feats.dtype == np.float32 and feats.shape[0] == coords.shape[0] == len(want)
    assert {tuple(c) for c in coords.tolist()} == want
    assert a["mpp"] == 0.5 and a["tile_size"] == 224 and a["level"] == 0 and a["downsample"] == 1.0
    assert a["patch_size_level0"] == P0 and a["complete"] and a["done"] == len(want) and a["skipped_tiles"] == 0
    assert a["manifest_hash"] == omedge.manifest.stored_hash(brow_bundle) and a["model_id"] == "brow"
    assert a["tool_version"] == f"omedge {omedge.__version__}" and a["resolution"] == "downsampled"
    assert 0.2 < a["tissue_fraction"] < 0.35
    import tiffslide
    from PIL import Image
    raw = tiffslide.TiffSlide(svs)
    tiles = [np.asarray(Image.fromarray(raw.read_region((int(x), int(y)), 0, (P0, P0), as_array=True))
                        .reduce(2)) for x, y in coords[:7]]    # 448 -> 224 px: a 2 x 2 box average
    np.testing.assert_allclose(feats[:7], predictor.predict(tiles, batch_size=7), rtol=1e-4, atol=1e-4)
    assert not list(tmp_path.glob(".*partial"))


def test_interrupted_run_resumes_and_refuses_to_mix(svs, predictor, tmp_path):
    out = tmp_path / "x.h5"
    full = embed_slide(predictor, svs, mpp=0.5, out=tmp_path / "full.h5", batch_size=4)

    def stop_after_two(done, total, rate):
        if done >= 8:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        embed_slide(predictor, svs, mpp=0.5, out=out, batch_size=4, progress=stop_after_two)
    partial = tmp_path / ".x.h5.partial"
    assert partial.is_file() and not out.exists()
    with h5py.File(partial) as f:
        assert f.attrs["done"] == 8 and f["features"].shape[0] == 8 and not f.attrs["complete"]
    with pytest.raises(UsageError, match="partial result of another run"):
        embed_slide(predictor, svs, mpp=0.6, out=out, batch_size=4)
    seen = []
    summary = embed_slide(predictor, svs, mpp=0.5, out=out, batch_size=4, progress=lambda d, t, r: seen.append(d))
    assert summary["resumed_from"] == 8 and seen[0] == 12 and summary["tiles"] == full["tiles"]
    with h5py.File(out) as f, h5py.File(tmp_path / "full.h5") as g:
        np.testing.assert_array_equal(f["coords"][:], g["coords"][:])
        np.testing.assert_allclose(f["features"][:], g["features"][:], rtol=1e-5, atol=1e-5)
    with pytest.raises(UsageError, match="already exists"):
        embed_slide(predictor, svs, mpp=0.5, out=out)


def test_slide_without_tissue_gives_an_empty_file(predictor, tmp_path):
    path = write_slide(tmp_path / "blank.svs", Layout(2048, 2048), downsamples=(1, 4))
    summary = embed_slide(predictor, path, mpp=0.5, out=tmp_path / "blank.h5")
    assert summary["tiles"] == 0 and "no tissue" in summary["message"] and summary["tissue_fraction"] == 0
    with h5py.File(tmp_path / "blank.h5") as f:
        assert f["features"].shape[0] == 0 and f["coords"].shape == (0, 2) and f.attrs["complete"]


def test_corrupt_tile_is_skipped_and_counted(predictor, tmp_path, caplog):
    path = write_slide(tmp_path / "broken.svs", LAYOUT)
    corrupt_tile(path, 2400, 1600)     # stored tile (2304-2560, 1536-1792): inside one 448 px patch
    with caplog.at_level(logging.WARNING, logger="omedge.wsi"):
        summary = embed_slide(predictor, path, mpp=0.5, out=tmp_path / "broken.h5", batch_size=6)
    want = expected_tiles(LAYOUT, P0)
    assert summary["skipped"] == 1 and summary["tiles"] == len(want) - 1
    with h5py.File(tmp_path / "broken.h5") as f:
        bad = f["skipped_coords"][:]
        assert f.attrs["skipped_tiles"] == 1 and f["features"].shape[0] == len(want) - 1
    x, y = bad[0]
    assert (x, y) == (2240, 1344) and tuple(bad[0]) not in {tuple(c) for c in f_coords(tmp_path)}
    assert "undecodable tile" in caplog.text


def f_coords(tmp_path):
    with h5py.File(tmp_path / "broken.h5") as f:
        return f["coords"][:].tolist()


def test_flat_stripped_tiff_is_read_in_pieces(predictor, tmp_path):
    """A 10000 x 8000 px TIFF without a pyramid (240 MB of pixels, ~8 MB on disk): the tissue
    mask and tiles are read strip by strip, and Python's peak allocation stays far below it."""
    layout = Layout(10000, 8000, tissue=[(1792, 1792, 5376, 3584)])   # 2 tiles of 1792 px at 2 µm/px
    path = write_slide(tmp_path / "flat.tif", layout, compression="zlib", style="flat")
    assert path.stat().st_size < 40e6
    tracemalloc.start()
    try:
        summary = embed_slide(predictor, path, mpp=2.0, out=tmp_path / "flat.h5", workers=1, batch_size=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary["tiles"] == 2 and summary["level"] == 0 and summary["resolution"] == "downsampled"
    assert peak < 120e6, f"peak {peak / 1e6:.0f} MB for a 240 MB image"   # full-width strips: ~60 MB per tile


def test_one_giant_strip_is_refused(tmp_path):
    import tifffile
    h, w = 9000, 8000   # 72 megapixels stored as one strip: it cannot be read in pieces
    row = bytes([242]) * (w * 3)
    z = zlib.compressobj(1)
    strip = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    tifffile.imwrite(tmp_path / "strip.tif", iter([strip]), shape=(h, w, 3), dtype=np.uint8, photometric="rgb",
                     compression="zlib", rowsperstrip=h)
    with pytest.raises(InputError, match="cannot be read without decoding them whole") as e:
        open_slide(tmp_path / "strip.tif")
    assert "pyramid" in e.value.hint


@pytest.mark.parametrize("content", [b"not a slide at all\n", None])
def test_file_that_is_not_a_slide(tmp_path, content):
    path = tmp_path / "slide.svs"
    if content is None:   # a PNG under a slide name
        from PIL import Image
        Image.fromarray(paint(LAYOUT, 0, 0, 64, 64, 1.0)).save(path, format="PNG")
    else:
        path.write_bytes(content)
    with pytest.raises(InputError, match="not a whole-slide image"):
        open_slide(path)
    with pytest.raises(InputError, match="slide not found"):
        open_slide(tmp_path / "missing.svs")


def test_thumbnail_shows_tissue_and_grid(svs, predictor, tmp_path):
    from PIL import Image
    summary = embed_slide(predictor, svs, mpp=0.5, out=tmp_path / "t.h5", thumbnail=tmp_path / "t.png")
    img = np.asarray(Image.open(summary["thumbnail"]).convert("RGB")).astype(int)
    picture, scale = low_res(open_slide(svs))
    assert img.shape == picture.shape and scale == 2.0
    # inside a tile, away from its edges: tinted green (green raised relative to the slide's own pixel)
    y, x = int((448 + 100) / scale), int((448 + 100) / scale)
    assert img[y, x, 1] > picture[y, x, 1] + 20 and img[y, x, 0] < picture[y, x, 0]
    glass = (int(2900 / scale), int(200 / scale))
    np.testing.assert_array_equal(img[glass], picture[glass])            # glass left as it is
    with h5py.File(tmp_path / "t.h5") as f:
        coords = f["coords"][:]
    for cx, cy in coords:                                                    # each tile's left edge is grid blue
        px = img[int(cy / scale) + 50, int(cx / scale)]
        assert tuple(px) == (30, 60, 255)
    gap = img[int(200 / scale), int(2900 / scale)]
    assert tuple(gap) != (30, 60, 255)


def test_heatmap_colours_tiles_by_class_probability(tmp_path):
    """The renderer on a features file as a classifier bundle writes it (logits per tile)."""
    from PIL import Image

    from omedge.wsi import write_thumbnail
    picture = np.full((100, 200, 3), 242, np.uint8)
    mask = np.zeros((100, 200), bool)
    mask[10:90, 10:190] = True
    coords = np.array([[40, 40], [200, 40]])            # level-0 px; scale 2 -> picture boxes of 50 px
    logits = np.array([[4.0, -4.0], [-4.0, 4.0]], np.float32)
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f["coords"], f["skipped_coords"], f["logits"] = coords, np.zeros((0, 2), np.int64), logits
    write_thumbnail(tmp_path / "c.png", picture, mask, 2.0, tmp_path / "c.h5", 100, "benign", ["benign", "tumour"],
                    overwrite=False)
    img = np.asarray(Image.open(tmp_path / "c.png").convert("RGB")).astype(int)
    first, second = img[45, 45], img[45, 125]            # inside tile 1 (benign) and tile 2 (tumour)
    assert first[0] > first[2] + 60 and second[2] > second[0] + 60   # red = probable, blue = not
    write_thumbnail(tmp_path / "d.png", picture, mask, 2.0, tmp_path / "c.h5", 100, "top", ["benign", "tumour"],
                    overwrite=False)
    with pytest.raises(UsageError, match="no such class"):
        write_thumbnail(tmp_path / "e.png", picture, mask, 2.0, tmp_path / "c.h5", 100, "x", ["benign", "tumour"],
                        overwrite=False)


def test_heatmap_needs_a_classifier(svs, predictor, tmp_path):
    with pytest.raises(UsageError, match="classifier bundle"):
        embed_slide(predictor, svs, mpp=0.5, out=tmp_path / "h.h5", thumbnail=tmp_path / "h.png", heatmap="top")


def test_output_must_be_hdf5(svs, predictor, tmp_path):
    with pytest.raises(UsageError, match="HDF5"):
        embed_slide(predictor, svs, out=tmp_path / "x.npy")

