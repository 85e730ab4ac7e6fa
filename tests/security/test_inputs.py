"""Issue 12, items 9, 12, 13, 14 and 22: hostile images, volumes and output locations.

Every hostile file is made here, small on disk: a PNG is written chunk by chunk (a
20000 x 20000 constant image compresses to ~0.4 MB), a NIfTI header claims what its
payload cannot hold. Each must end in a typed omedge error, never a traceback, a
silent wrong result or an allocation of the huge thing first."""
import gzip
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zlib

import numpy as np
import pytest

from omedge.errors import InputError, UsageError
from omedge.io.images import read_image
from omedge.io.opencv_compat import imread_gray
from omedge.io.volume import Volume, read_volume, write_labels
from omedge.runtime.preprocess import preprocess_one
from omedge.runtime.volume import segment, synthetic_ct
from tests.io.test_volume_io import PRE, nifti, threshold_net, write_dicom_series

MB = 1 << 20


def chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png(width, height, colour_type=0, depth=8, before=b"", after=b"") -> bytes:
    """A valid PNG of constant pixels (zlib-compressed row by row: cheap, tiny), with
    extra chunks before and after the image data."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\0" * (1 + width * channels * depth // 8)
    z = zlib.compressobj(6)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + before + chunk(b"IDAT", idat) + after
            + chunk(b"IEND", b""))


def ztxt(key: str, size: int) -> bytes:
    return chunk(b"zTXt", key.encode() + b"\0\0" + zlib.compress(b"A" * size, 9))


def many_text_chunks() -> bytes:
    """70 zTXt chunks of just under 1 MB each (Pillow's MAX_TEXT_CHUNK): 70 MB of text in 70 KB."""
    one = zlib.compress(b"B" * (MB - 64), 9)
    return b"".join(chunk(b"zTXt", f"k{i}".encode() + b"\0\0" + one) for i in range(70))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    files = {"bomb": png(20000, 20000), "mid": png(10000, 10000),  # 400 and 100 megapixels
             "ztxt_bomb": png(16, 16, 2, before=ztxt("Comment", 200 * MB)),
             "ztxt_after": png(16, 16, 2, after=ztxt("Comment", 200 * MB)),
             "text_64mb": png(16, 16, 2, before=many_text_chunks()),
             "text_64mb_after": png(16, 16, 2, after=many_text_chunks()),
             "rgb16": png(8, 8, 2, 16), "rgba16": png(8, 8, 6, 16), "la16": png(8, 8, 4, 16)}
    for name, data in files.items():
        (d / f"{name}.png").write_bytes(data)
    return d


def pillow_globals():
    from PIL import Image, ImageFile, PngImagePlugin
    return (Image.MAX_IMAGE_PIXELS, PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY,
            ImageFile.LOAD_TRUNCATED_IMAGES)


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "omedge.cli", *map(str, args)], check=False, capture_output=True,
                          text=True, env={**os.environ, **(env or {})})


# ------------------------------------------------------------------ item 12: images

@pytest.mark.parametrize("name, words", [("bomb", "decompression bomb"), ("ztxt_bomb", "MAX_TEXT_CHUNK"),
                                         ("rgb16", "16-bit")])
def test_cli_refuses_hostile_png_with_exit_6(brow_fp32_bundle, hostile, name, words):
    r = cli("predict", brow_fp32_bundle, hostile / f"{name}.png")
    assert r.returncode == 6, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith("error:") and lines[1].lstrip().startswith("->"), r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("name", ["bomb", "mid"])
def test_pixel_limit_is_omedges_own_and_leaves_pillow_alone(hostile, name, monkeypatch):
    # 100 megapixels is below twice Pillow's MAX_IMAGE_PIXELS, where Pillow only warns and decodes
    before = pillow_globals()
    with pytest.warns(Warning) if name == "mid" else _nothing(), pytest.raises(InputError, match="megapixel|bomb"):
        read_image(hostile / f"{name}.png")
    assert pillow_globals() == before
    from PIL import Image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a caller that switched Pillow's guard off
    with pytest.raises(InputError, match="89.5-megapixel limit"):
        read_image(hostile / f"{name}.png")
    with pytest.raises(InputError, match="megapixel limit"):
        imread_gray(hostile / f"{name}.png")  # the grey path of the blur-based models


def _nothing():
    import contextlib
    return contextlib.nullcontext()


def test_pixel_limit_is_set_by_environment(tmp_path, monkeypatch):
    p = tmp_path / "small.png"
    p.write_bytes(png(16, 16, 2))
    monkeypatch.setenv("OMEDGE_MAX_IMAGE_PIXELS", "255")
    with pytest.raises(InputError, match="16x16"):
        read_image(p)
    monkeypatch.setenv("OMEDGE_MAX_IMAGE_PIXELS", "256")
    assert read_image(p).shape == (16, 16, 3)
    monkeypatch.setenv("OMEDGE_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(UsageError, match="OMEDGE_MAX_IMAGE_PIXELS"):
        read_image(p)


@pytest.mark.parametrize("name", ["ztxt_bomb", "ztxt_after", "text_64mb", "text_64mb_after"])
def test_text_chunk_bombs_are_input_errors(hostile, name):
    before = pillow_globals()
    with pytest.raises(InputError, match="MAX_TEXT|text chunks"):
        read_image(hostile / f"{name}.png")
    with pytest.raises(InputError, match="MAX_TEXT|text chunks"):
        imread_gray(hostile / f"{name}.png")
    assert pillow_globals() == before


def test_a_sliver_cannot_grow_past_the_limit_when_resized(tmp_path, monkeypatch):
    # 2 x 600 px, short side to 224: 224 x 67200 = 15 megapixels from a 1200-pixel file
    monkeypatch.setenv("OMEDGE_MAX_IMAGE_PIXELS", "1000000")
    spec = {"resize": {"size": 224, "interpolation": "bicubic"}, "center_crop": 224, "mean": [0.5] * 3,
            "std": [0.5] * 3}
    with pytest.raises(InputError, match="224x67200"):
        preprocess_one(np.zeros((600, 2, 3), np.uint8), spec)


def test_huge_video_frames_are_refused_before_decoding(tmp_path, monkeypatch):
    from omedge.io.video import iter_video
    from tests.video_files import write_video
    video = write_video(tmp_path / "v.mp4", 3)
    monkeypatch.setenv("OMEDGE_MAX_IMAGE_PIXELS", "10000")  # frames are 160 x 120
    with pytest.raises(InputError, match="160x120 frames"):
        next(iter_video(video))


# ------------------------------------------------------------------ item 22: inputs

@pytest.mark.parametrize("name", ["rgb16", "rgba16", "la16"])
def test_16_bit_colour_png_is_refused_not_reduced(hostile, name):
    with pytest.raises(InputError, match="16-bit"):
        read_image(hostile / f"{name}.png")


def test_16_bit_colour_tiff_is_refused(tmp_path):
    import cv2
    cv2.imwrite(str(tmp_path / "c16.tif"), np.full((8, 8, 3), 40000, np.uint16))
    with pytest.raises(InputError, match="16-bit"):
        read_image(tmp_path / "c16.tif")


@pytest.mark.parametrize("arr, words", [
    (np.full((8, 8, 3), -1, np.int8), "int8.*wrap"),
    (np.ones((8, 8, 3), np.complex64) * (0.5 + 0.5j), "complex"),
    (np.full((8, 8), "x", dtype="<U1"), "not pixel values"),
    (np.empty((8, 8, 3), dtype=object), "not pixel values"),
    (np.zeros((0, 0, 3), np.uint8), "empty"),
])
def test_arrays_that_would_cast_wrongly_are_refused(brow_fp32_bundle, arr, words):
    import omedge
    with pytest.raises(InputError, match=words):
        read_image(arr)
    with pytest.raises(InputError, match=words):
        omedge.load(brow_fp32_bundle).predict(arr)


def nifti_with(tmp_path, name, affine=None, data=None):
    """Written byte by byte: nibabel refuses to save a NaN direction (it derives a qform)."""
    import nibabel as nib
    data = synthetic_ct((12, 12, 10)).data if data is None else data
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(data.dtype)
    hdr.set_sform(np.eye(4) if affine is None else affine, code=1)
    p = tmp_path / name
    p.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + data.tobytes(order="F"), 1))
    return p


@pytest.mark.parametrize("row, col", [(0, 3), (2, 3), (1, 1), (0, 2)])
def test_non_finite_affine_is_refused(tmp_path, row, col):
    for bad in (np.nan, np.inf):
        affine = np.diag([1.0, 1, 1, 1])
        affine[row, col] = bad
        with pytest.raises(InputError, match="NaN/Inf"):
            read_volume(nifti_with(tmp_path, "a.nii.gz", affine))
        vol = synthetic_ct((12, 12, 10))
        vol.affine = affine
        with pytest.raises(InputError, match="NaN/Inf"):
            segment(vol, threshold_net, PRE)


def test_complex_volumes_are_refused(tmp_path):
    data = np.ones((12, 12, 10), np.complex64) * (100 + 50j)
    with pytest.raises(InputError, match="complex"):
        read_volume(nifti_with(tmp_path, "c.nii.gz", data=data))
    with pytest.raises(InputError, match="complex"):
        segment(Volume(data, np.eye(4), "complex array"), threshold_net, PRE)


# ------------------------------------------------------------------ item 13: volumes

def claimed_nifti(path, shape, dtype, payload: bytes):
    """A NIfTI header claiming `shape` voxels followed by a payload that cannot hold them."""
    import nibabel as nib
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_sform(np.eye(4), code=1)
    raw = hdr.binaryblock + b"\0" * 4 + payload
    path.write_bytes(gzip.compress(raw, 1) if path.name.endswith(".gz") else raw)
    return path


def peak_mb(fn) -> float:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / MB


def test_1mb_nifti_claiming_1000_cubed_voxels_is_refused_before_allocating(tmp_path):
    p = claimed_nifti(tmp_path / "huge.nii.gz", (1000, 1000, 1000), np.int16, os.urandom(MB))
    assert 0.9 * MB < p.stat().st_size < 1.1 * MB

    def read():
        with pytest.raises(InputError, match="1000 million voxels, over the limit"):
            read_volume(p)
    assert peak_mb(read) < 32  # nibabel used to allocate the 2 GB first


@pytest.mark.parametrize("name", ["claim.nii.gz", "claim.nii"])
def test_header_claiming_more_than_the_file_holds_is_refused(tmp_path, name):
    # 343 M voxels is under the voxel limit; the payload is 4 KB
    p = claimed_nifti(tmp_path / name, (700, 700, 700), np.uint8, b"\1" * 4096)

    def read():
        with pytest.raises(InputError, match="can hold at most"):
            read_volume(p)
    assert peak_mb(read) < 32


@pytest.mark.parametrize("spacing", [100.0, 1e-5])
def test_implausible_spacing_is_refused_before_resampling(tmp_path, spacing):
    # 100 mm to the model's 1.5 mm would be 4267^3 voxels (310 GB); 1e-5 mm would be 0 voxels
    affine = np.diag([spacing, spacing, spacing, 1.0])
    vol = read_volume(nifti(tmp_path, np.zeros((64, 64, 64), np.float32), affine))

    def run():
        with pytest.raises(InputError, match="spacing is wrong"):
            segment(vol, threshold_net, PRE)
    assert peak_mb(run) < 32


def test_voxel_limit_after_resampling_is_checked(monkeypatch):
    vol = synthetic_ct((40, 40, 40), spacing=(3.0, 3.0, 3.0))  # 2x to 1.5 mm: 80^3 = 512000 voxels
    monkeypatch.setenv("OMEDGE_MAX_VOXELS", "300000")
    with pytest.raises(InputError, match=r"resampled to \(1.5, 1.5, 1.5\) mm would be 80 x 80 x 80"):
        segment(vol, threshold_net, PRE)
    monkeypatch.setenv("OMEDGE_MAX_VOXELS", "-1")
    with pytest.raises(UsageError, match="OMEDGE_MAX_VOXELS"):
        segment(vol, threshold_net, PRE)


def test_dicom_series_voxel_count_is_checked_before_decoding(tmp_path, monkeypatch):
    series = write_dicom_series(tmp_path / "s", synthetic_ct((16, 16, 6)).data.round())
    monkeypatch.setenv("OMEDGE_MAX_VOXELS", str(16 * 16 * 6 - 1))
    with pytest.raises(InputError, match="16 x 16 x 6"):
        read_volume(series)
    monkeypatch.setenv("OMEDGE_MAX_VOXELS", str(16 * 16 * 6))
    assert read_volume(series).data.shape == (16, 16, 6)


# ------------------------------------------------------------------ items 9 and 14: predict outputs

@pytest.fixture
def labelled():
    vol = synthetic_ct((12, 12, 10))
    return (vol.data > 0).astype(np.uint8), vol


def test_planted_symlink_at_the_old_temp_name_is_not_followed(tmp_path, labelled):
    labels, vol = labelled
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / ".partial-seg.nii.gz").symlink_to(victim)
    (out / "seg.nii.gz").symlink_to(tmp_path / "victim2.txt")  # a dangling one at the target itself
    write_labels(labels, vol, out / "seg.nii.gz", overwrite=True)
    assert victim.read_text() == "precious" and not (tmp_path / "victim2.txt").exists()
    assert not (out / "seg.nii.gz").is_symlink()
    np.testing.assert_array_equal(read_volume(out / "seg.nii.gz").data, labels)
    assert sorted(p.name for p in out.iterdir()) == [".partial-seg.nii.gz", "seg.nii.gz"]  # no temp left


def test_bad_output_locations_are_usage_errors(tmp_path, labelled):
    labels, vol = labelled
    (tmp_path / "notes.txt").write_text("a file")
    (tmp_path / "folder.nii.gz").mkdir()
    cases = [(tmp_path / "notes.txt" / "seg.nii.gz", "is a file, not a folder"),
             (tmp_path / "notes.txt" / "deeper" / "seg.nii.gz", "is a file, not a folder"),
             ("/proc/seg.nii.gz", "does not accept new files"),
             (tmp_path / ("x" * 300 + ".nii.gz"), "name is 307 bytes"),
             (tmp_path / "missing" / "seg.nii.gz", "does not exist"),
             (tmp_path / "folder.nii.gz", "is a folder"),
             (tmp_path.joinpath(*["d" * 250] * 20, "seg.nii.gz"), "too long"),  # over PATH_MAX
             (tmp_path / "seg.png", "written as NIfTI")]
    for target, words in cases:
        with pytest.raises(UsageError, match=words):
            write_labels(labels, vol, target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.nii.gz", "notes.txt"]  # nothing half-written


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], check=False, capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare -rm (a private mount namespace)")
def test_read_only_mount_and_full_disk_are_usage_errors(tmp_path):
    """Inside a private mount namespace: a read-only bind mount, and a 64 KB tmpfs that a
    1 MB label map cannot fit in. Both must be typed, and leave nothing behind."""
    ro, full = tmp_path / "ro", tmp_path / "full"
    ro.mkdir()
    full.mkdir()
    script = tmp_path / "write.py"
    script.write_text(textwrap.dedent(f"""
        import os, numpy as np
        from omedge.errors import UsageError
        from omedge.io.volume import Volume, write_labels
        labels = np.random.default_rng(0).integers(0, 200, (100, 100, 100)).astype(np.uint8)
        vol = Volume(labels.astype(np.float32), np.eye(4), "test")
        for folder in ({str(ro)!r}, {str(full)!r}):
            try:
                write_labels(labels, vol, os.path.join(folder, "seg.nii.gz"))
                print("WRITTEN", folder)
            except UsageError as e:
                print("REFUSED", e.message, "|", os.listdir(folder))
    """))
    inner = (f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && "
             f"mount -t tmpfs -o size=64k tmpfs {full} && {sys.executable} {script}")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", inner], check=False, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("REFUSED") and "read-only file system" in lines[0] and lines[0].endswith("| []")
    assert lines[1].startswith("REFUSED") and "disk is full" in lines[1] and lines[1].endswith("| []"), r.stdout
