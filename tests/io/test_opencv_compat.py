"""omedge.io.opencv_compat against OpenCV itself (the reference; needed only by this test).

Every comparison is exact equality unless a comment says otherwise. Images are random
and written into tmp_path with Pillow or cv2, so no fixture files are involved.
"""
from __future__ import annotations

import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from omedge.errors import InputError
from omedge.io.opencv_compat import (
    gaussian_blur_u8,
    gaussian_kernel_u8,
    imread_gray,
    to_gray_like_cv2,
)

cv2 = pytest.importorskip("cv2", reason="OpenCV is the reference these tests compare against")

SIGMAS = [0.5, 0.8, 1.1, 1.5, 2.0, 3.0]


def _smooth_rgb(rng, h, w, c=3):
    """Photo-like content (JPEG on pure noise is atypical); noise keeps every rounding busy."""
    base = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), c), dtype=np.uint8)
    up = np.asarray(Image.fromarray(base if c > 1 else base[..., 0]).resize((w, h), Image.BILINEAR))
    up = up.reshape(h, w, c).astype(np.int16) + rng.integers(-12, 13, (h, w, c))
    return np.clip(up, 0, 255).astype(np.uint8)


def _gray(path):
    ref = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert ref is not None, f"cv2 could not read {path}"
    return ref


def _assert_same(ref, mine, what):
    assert mine.dtype == np.uint8 and mine.shape == ref.shape, f"{what}: {mine.shape} vs cv2 {ref.shape}"
    diff = np.abs(ref.astype(int) - mine.astype(int))
    assert diff.max() == 0, f"{what}: {np.count_nonzero(diff)} px differ, max {diff.max()}"


# ------------------------------------------------------------------ GaussianBlur

def test_kernel_for_sigma_1_1():
    assert gaussian_kernel_u8(1.1).tolist() == [0, 2, 18, 62, 92, 62, 18, 2, 0]
    for s in SIGMAS + [0.05, 7.3, 20.0]:
        k = gaussian_kernel_u8(s)
        assert k.sum() == 256 and len(k) == (int(np.rint(s * 6 + 1)) | 1)


def test_blur_random_images_bit_exact():
    rng = np.random.default_rng(20240611)
    tiny = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 5), (5, 3), (1, 17), (17, 1), (4, 4), (7, 2)]
    cases = 0
    for i in range(240):
        if i < len(tiny) * 2:
            h, w = tiny[i % len(tiny)]
        else:
            h, w = (int(x) for x in rng.integers(1, 90, 2))
        shape = (h, w, 3) if i % 3 == 2 else (h, w)
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        if i % 5 == 4:
            img = _smooth_rgb(rng, h, w)[..., : (3 if len(shape) == 3 else 1)].reshape(shape)
        sigma = SIGMAS[i % len(SIGMAS)]
        _assert_same(cv2.GaussianBlur(img, (0, 0), sigma), gaussian_blur_u8(img, sigma), f"{shape} sigma={sigma}")
        cases += 1
    assert cases >= 200


def test_blur_other_sigmas_large_and_multichannel():
    """No float fallback exists for 8-bit in OpenCV 5.0: sweeps up to sigma 60 stay exact."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (61, 47), dtype=np.uint8)
    for sigma in np.round(np.arange(0.05, 12.0, 0.37), 2).tolist() + [25.0, 60.0]:
        _assert_same(cv2.GaussianBlur(img, (0, 0), sigma), gaussian_blur_u8(img, sigma), f"sigma={sigma}")
    big = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    _assert_same(cv2.GaussianBlur(big, (0, 0), 1.1), gaussian_blur_u8(big, 1.1), "480x640x3")
    four = rng.integers(0, 256, (33, 20, 4), dtype=np.uint8)
    _assert_same(cv2.GaussianBlur(four, (0, 0), 2.0), gaussian_blur_u8(four, 2.0), "HxWx4")
    one = rng.integers(0, 256, (9, 13, 1), dtype=np.uint8)   # cv2 drops the singleton channel
    _assert_same(cv2.GaussianBlur(one, (0, 0), 1.1), gaussian_blur_u8(one, 1.1), "HxWx1")


def test_naive_float_blur_is_not_enough():
    """Why the fixed-point replica matters: a float64 Gaussian rounded once is off by one
    on a large share of pixels (measured ~22% on noise at sigma 1.1)."""
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (128, 128), dtype=np.uint8)
    s, half = 1.1, 4
    d = np.arange(-half, half + 1)
    w = np.exp(-d * d / (2 * s * s))
    w /= w.sum()
    pad = np.pad(img.astype(np.float64), half, mode="reflect")  # reflect == BORDER_REFLECT_101 here
    rows = sum(w[k] * pad[:, k:k + 128] for k in range(9))
    naive = np.clip(np.rint(sum(w[k] * rows[k:k + 128] for k in range(9))), 0, 255)
    ref = cv2.GaussianBlur(img, (0, 0), s)
    share = np.mean(naive != ref)
    assert share > 0.05, f"naive float blur differs on only {share:.2%} of pixels"
    assert np.array_equal(gaussian_blur_u8(img, s), ref)


def test_blur_refuses_bad_input():
    with pytest.raises(InputError):
        gaussian_blur_u8(np.zeros((4, 4), np.float32), 1.1)
    with pytest.raises(InputError):
        gaussian_blur_u8(np.zeros((0, 4), np.uint8), 1.1)
    with pytest.raises(ValueError):
        gaussian_blur_u8(np.zeros((4, 4), np.uint8), 0.0)


# ------------------------------------------------------------------ RGB -> grey rules

def test_to_gray_cvtcolor_rule_all_colours():
    v = np.arange(1 << 24, dtype=np.uint32).reshape(4, 1024, 4096)
    for chunk in v:   # every RGB triple, in four pieces to bound memory
        rgb = np.stack([(chunk >> 16) & 255, (chunk >> 8) & 255, chunk & 255], -1).astype(np.uint8)
        _assert_same(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), to_gray_like_cv2(rgb, "cvtcolor"), "cvtColor")
    rgba = np.concatenate([rgb[:64, :64], np.full((64, 64, 1), 9, np.uint8)], -1)
    _assert_same(cv2.cvtColor(rgba, cv2.COLOR_RGBA2GRAY), to_gray_like_cv2(rgba, "webp"), "RGBA")


@pytest.mark.parametrize("fmt", ["png", "bmp", "tiff"])
def test_to_gray_matches_the_decoder(tmp_path, fmt):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    rgb[:8] = rgb[:8, :, :1]    # some exactly grey pixels
    path = tmp_path / f"x.{fmt}"
    Image.fromarray(rgb).save(path)
    _assert_same(_gray(path), to_gray_like_cv2(rgb, fmt), fmt)


def test_to_gray_refuses_jpeg():
    with pytest.raises(InputError):
        to_gray_like_cv2(np.zeros((2, 2, 3), np.uint8), "jpeg")


# ------------------------------------------------------------------ imread_gray: PNG

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png16(path, arr, colour_type, extra=b""):
    """Pillow cannot write 16-bit colour/LA PNGs, so write them by hand (filter 0 rows)."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\0" + arr[i].astype(">u2").tobytes() for i in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + extra
                     + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))


def test_png_colour_types(tmp_path):
    rng = np.random.default_rng(4)
    n = 0
    for i in range(12):
        h, w = (int(x) for x in rng.integers(1, 70, 2))
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if i % 2 else _smooth_rgb(rng, h, w)
        alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
        images = {
            "rgb": Image.fromarray(rgb), "rgba": Image.fromarray(np.concatenate([rgb, alpha], -1)),
            "palette": Image.fromarray(rgb).quantize(int(rng.integers(2, 256))),
            "grey": Image.fromarray(rgb[..., 0]), "grey_alpha": Image.fromarray(np.concatenate(
                [rgb[..., :1], alpha], -1), "LA"), "bilevel": Image.fromarray(rgb[..., 0] > 127),
        }
        for kind, im in images.items():
            path = tmp_path / f"{kind}_{i}.png"
            kw = {"transparency": 3} if kind == "palette" and i % 3 == 0 else {}
            im.save(path, **kw)
            _assert_same(_gray(path), imread_gray(path), f"{kind} PNG {h}x{w}")
            n += 1
        for bits in (2, 4):
            path = tmp_path / f"grey{bits}_{i}.png"
            Image.fromarray(rgb[..., 0]).save(path, bits=bits)
            _assert_same(_gray(path), imread_gray(path), f"{bits}-bit grey PNG")
    assert n == 72


@pytest.mark.parametrize("chunks", [[(b"gAMA", 45455)], [(b"gAMA", 50000)], [(b"gAMA", 95000)],
                                    [(b"gAMA", 220000)], [(b"gAMA", 100000)], [(b"sRGB", 0)],
                                    [(b"gAMA", 100000), (b"sRGB", 1)]])
def test_png_gamma_chunks(tmp_path, chunks):
    """With gAMA/sRGB libpng converts via linear light; without this the error reaches 61."""
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    rgb[:4] = rgb[:4, :, :1]
    info = PngImagePlugin.PngInfo()
    for kind, value in chunks:
        info.add(kind, struct.pack(">I", value) if kind == b"gAMA" else bytes([value]))
    for name, im in {"rgb": Image.fromarray(rgb), "rgba": Image.fromarray(np.concatenate([rgb, rgb[..., :1]], -1)),
                     "palette": Image.fromarray(rgb).quantize(64), "grey": Image.fromarray(rgb[..., 1])}.items():
        path = tmp_path / f"{name}.png"
        im.save(path, pnginfo=info)
        _assert_same(_gray(path), imread_gray(path), f"{name} PNG with {chunks}")


def test_png_16_bit(tmp_path):
    rng = np.random.default_rng(6)
    g16 = rng.integers(0, 65536, (31, 45), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), g16)
    _assert_same(_gray(tmp_path / "g16.png"), imread_gray(tmp_path / "g16.png"), "16-bit grey")
    _png16(tmp_path / "la16.png", rng.integers(0, 65536, (20, 33, 2), dtype=np.uint16), 4)
    _assert_same(_gray(tmp_path / "la16.png"), imread_gray(tmp_path / "la16.png"), "16-bit grey+alpha")
    # 16-bit colour: cv2 converts the full 16-bit values; Pillow keeps only the high bytes.
    cv2.imwrite(str(tmp_path / "c16.png"), rng.integers(0, 65536, (8, 8, 3), dtype=np.uint16))
    with pytest.raises(InputError, match="16-bit colour"):
        imread_gray(tmp_path / "c16.png")


# ------------------------------------------------------------------ imread_gray: JPEG

def test_jpeg_colour_is_the_y_plane(tmp_path):
    rng = np.random.default_rng(7)
    n = 0
    for i in range(48):
        h, w = (int(x) for x in rng.integers(1, 140, 2))
        rgb = _smooth_rgb(rng, h, w) if i % 4 else rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        quality = [10, 35, 60, 75, 90, 95, 100][i % 7]
        sub = i % 3                                  # 0: 4:4:4, 1: 4:2:2, 2: 4:2:0
        path = tmp_path / f"c{i}.jpg"
        if i % 2:
            Image.fromarray(rgb).save(path, quality=quality, subsampling=sub, progressive=i % 5 == 0)
        else:
            factor = [cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
                      cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420][sub]
            cv2.imwrite(str(path), rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality,
                                                    cv2.IMWRITE_JPEG_SAMPLING_FACTOR, factor])
        _assert_same(_gray(path), imread_gray(path), f"JPEG {h}x{w} q{quality} sub{sub}")
        n += 1
    assert n == 48


def test_jpeg_grey_and_why_not_convert_l(tmp_path):
    rng = np.random.default_rng(8)
    for i, q in enumerate([20, 75, 95]):
        g = _smooth_rgb(rng, 37 + i, 91, 1)[..., 0]
        Image.fromarray(g).save(tmp_path / f"g{i}.jpg", quality=q)
        _assert_same(_gray(tmp_path / f"g{i}.jpg"), imread_gray(tmp_path / f"g{i}.jpg"), f"grey JPEG q{q}")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "n.jpg", quality=75,
                                                                                subsampling=0)
    via_rgb = np.asarray(Image.open(tmp_path / "n.jpg").convert("L"))
    assert np.mean(via_rgb != _gray(tmp_path / "n.jpg")) > 0.05   # measured ~16%, max 25 levels


def test_exif_orientation(tmp_path):
    rng = np.random.default_rng(9)
    rgb = _smooth_rgb(rng, 21, 34)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        for ext in ("jpg", "png", "webp"):
            path = tmp_path / f"o{orientation}.{ext}"
            Image.fromarray(rgb).save(path, exif=exif, **({"lossless": True} if ext == "webp" else {}))
            _assert_same(_gray(path), imread_gray(path), f"{ext} orientation {orientation}")


# ------------------------------------------------------------------ other formats, run side

def test_bmp_tiff_webp(tmp_path):
    rng = np.random.default_rng(10)
    rgb = rng.integers(0, 256, (29, 53, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (29, 53, 1), dtype=np.uint8)], -1)
    for ext in ("bmp", "tif"):
        for name, im in {"rgb": Image.fromarray(rgb), "rgba": Image.fromarray(rgba),
                         "palette": Image.fromarray(rgb).quantize(40), "grey": Image.fromarray(rgb[..., 0])}.items():
            path = tmp_path / f"{name}.{ext}"
            im.save(path)
            _assert_same(_gray(path), imread_gray(path), f"{name} {ext}")
    for kw in ({"lossless": True}, {"quality": 80}):
        Image.fromarray(rgb).save(tmp_path / "w.webp", **kw)
        _assert_same(_gray(tmp_path / "w.webp"), imread_gray(tmp_path / "w.webp"), f"webp {kw}")


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(InputError):
        imread_gray(tmp_path / "absent.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(InputError):
        imread_gray(tmp_path / "junk.png")


def test_run_side_needs_no_opencv(tmp_path):
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(tmp_path / "a.png")
    code = ("import sys; sys.modules['cv2'] = None\n"
            "from omedge.io.opencv_compat import imread_gray, gaussian_blur_u8\n"
            f"print(gaussian_blur_u8(imread_gray({str(tmp_path / 'a.png')!r}), 1.1).shape)")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "(4, 4)", out.stderr
