"""Bit-exact numpy/Pillow stand-ins for cv2.imread(p, IMREAD_GRAYSCALE) and 8-bit GaussianBlur.

DeblurringMIM preprocesses with both; omedge must give the same bytes without OpenCV at run
time. Rules measured against opencv-python-headless 5.0.0 (libpng 1.6.58, libjpeg-turbo 3.1,
libwebp 1.6) with Pillow 13 (libjpeg-turbo 3.2, libwebp 1.6); see tests/io/test_opencv_compat.py.
Bit-exact: GaussianBlur(uint8); imread_gray for PNG (8-bit, any colour type, gAMA/sRGB; 16-bit
grey), JPEG (grey, YCbCr), BMP, 8-bit TIFF, WebP. Refused with InputError: 16-bit colour PNG,
CMYK JPEG, TIFF with an Orientation tag, image modes whose cv2 rule is not reproduced.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import InputError

_EXIF_ORIENTATION = 0x0112


def _describe(a) -> str:
    return f"{a.dtype} {a.shape} array" if isinstance(a, np.ndarray) else type(a).__name__


# ---------------------------------------------------------------- GaussianBlur (8-bit)

def gaussian_kernel_u8(sigma: float) -> np.ndarray:
    """The integer taps (sum 256) cv2 uses for an 8-bit GaussianBlur with ksize (0, 0).

    Size: round-half-even(6*sigma + 1) | 1. The normalised float kernel is quantised from
    the outer taps inwards with error diffusion (each tap rounds value*256 plus the carried
    rounding error); the centre tap takes whatever makes the sum exactly 256.
    """
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    n = int(np.rint(sigma * 6 + 1)) | 1
    half = n // 2
    d = np.arange(-half, half + 1, dtype=np.float64)
    w = np.exp(-(d * d) / (2.0 * sigma * sigma))
    w = w * (1.0 / w.sum())
    taps, carry = np.zeros(n, dtype=np.int64), 0.0
    for i in range(half):
        v = w[i] * 256.0 + carry
        taps[i] = taps[n - 1 - i] = q = int(np.rint(v))   # round half to even, like cvRound
        carry = v - q
    taps[half] = 256 - 2 * int(taps[:half].sum())
    return taps


def _reflect101(n: int, r: int) -> np.ndarray:
    """Source index of each padded position (BORDER_REFLECT_101, repeated for tiny n)."""
    if n == 1:
        return np.zeros(2 * r + 1, dtype=np.int64)
    period = 2 * (n - 1)
    idx = np.mod(np.arange(-r, n + r), period)
    return np.where(idx >= n, period - idx, idx)


def _smooth_axis(a: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    a = np.moveaxis(a, axis, 0)
    n, r = a.shape[0], len(taps) // 2
    padded = a[_reflect101(n, r)]
    out = np.zeros_like(a)
    for k, t in enumerate(taps.tolist()):
        if t:
            out += t * padded[k:k + n]
    return np.moveaxis(out, 0, axis)


def gaussian_blur_u8(img: np.ndarray, sigma: float) -> np.ndarray:
    """cv2.GaussianBlur(img, (0, 0), sigma) for uint8 HxW / HxWxC, BORDER_REFLECT_101.

    OpenCV's 8-bit path is fixed point: both 1-D passes use the 256-sum integer taps and
    accumulate exactly; one rounding at the end, (acc + 2**15) >> 16. A float Gaussian with
    one rounding differs on a sizeable share of pixels, hence this integer replica.
    Like cv2, an HxWx1 input comes back HxW.
    """
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim not in (2, 3) or img.size == 0:
        raise InputError(f"gaussian_blur_u8 needs a non-empty uint8 HxW or HxWxC array, got {_describe(img)}",
                         "convert to uint8 first (this replicates OpenCV's 8-bit fixed-point path only)")
    taps = gaussian_kernel_u8(sigma)
    acc = _smooth_axis(_smooth_axis(img.astype(np.int32), taps, 1), taps, 0)  # max 255*2**16
    out = ((acc + (1 << 15)) >> 16).astype(np.uint8)
    return out[..., 0] if out.ndim == 3 and out.shape[2] == 1 else out


# ---------------------------------------------------------------- RGB -> grey rules

def _channels(rgb: np.ndarray):
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise InputError(f"expected a uint8 HxWx3 (RGB) or HxWx4 (RGBA) array, got {_describe(rgb)}")
    return (rgb[..., i].astype(np.int32) for i in range(3))  # sums stay below 255 * 2**15 + 2**14


def _png_significant(g: int) -> bool:
    return abs(g - 100000) > 5000           # libpng's gamma threshold, 0.05 in 1e5 fixed point


def _png_reciprocal(g: int) -> int:
    return math.floor(1e10 / g + 0.5)


def _png_gamma_table(g: int) -> np.ndarray:
    v = np.arange(256, dtype=np.int64)
    if not _png_significant(g):
        return v
    t = np.floor(255.0 * np.power(v / 255.0, g * 1e-5) + 0.5).astype(np.int64)
    t[0], t[255] = 0, 255
    return t


def _libpng_gray(rgb: np.ndarray, gamma: int = 100000) -> np.ndarray:
    """libpng's rgb_to_gray with OpenCV's weights (0.299, 0.587 -> 9797/19234/3737 of 2**15).

    Without a significant file gamma it truncates (no +16384). With gAMA/sRGB, libpng
    linearises through 8-bit tables, rounds, and re-encodes; grey pixels pass unchanged.
    """
    r, g, b = _channels(rgb)
    screen = _png_reciprocal(gamma)
    if not (_png_significant(gamma) or _png_significant(screen)):
        return ((9797 * r + 19234 * g + 3737 * b) >> 15).astype(np.uint8)
    to_lin, from_lin = _png_gamma_table(screen), _png_gamma_table(_png_reciprocal(screen))
    lin = (9797 * to_lin[r] + 19234 * to_lin[g] + 3737 * to_lin[b] + 16384) >> 15
    return np.where((r == g) & (g == b), r, from_lin[lin]).astype(np.uint8)


def to_gray_like_cv2(rgb_uint8: np.ndarray, source_format: str) -> np.ndarray:
    """Grey from an already-decoded RGB(A) array, by the rule cv2 applies for that decoder.

    "png": libpng (truncating, 2**15 weights; no gamma, see imread_gray for gAMA files).
    "bmp"/"tif"/"tiff": OpenCV's codec helper, (4899R + 9617G + 1868B + 2**13) >> 14.
    anything else (e.g. "webp", "cvtcolor"): cv2.cvtColor(RGB2GRAY) in OpenCV 5.0,
    (9798R + 19235G + 3735B + 2**14) >> 15. Alpha is ignored.
    "jpeg" is refused: cv2 reads JPEG grey as the decoded Y plane, which RGB cannot give back.
    """
    fmt = source_format.lower().lstrip(".")
    if fmt in ("jpeg", "jpg", "jpe", "mpo"):
        raise InputError("cv2 reads JPEG as grey by decoding the Y plane, not by converting RGB",
                         "call imread_gray(path) on the JPEG file instead")
    if fmt == "png":
        return _libpng_gray(rgb_uint8)
    r, g, b = _channels(rgb_uint8)
    if fmt in ("bmp", "dib", "tif", "tiff"):
        return ((4899 * r + 9617 * g + 1868 * b + (1 << 13)) >> 14).astype(np.uint8)
    return ((9798 * r + 19235 * g + 3735 * b + (1 << 14)) >> 15).astype(np.uint8)


# ---------------------------------------------------------------- imread(IMREAD_GRAYSCALE)

def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF Orientation value, as cv2.imread does for JPEG, PNG and WebP."""
    if orientation in (5, 6, 7, 8):         # the transposing ones
        a = a.T
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]
    return {2: a[:, ::-1], 3: a[::-1, ::-1], 4: a[::-1]}.get(orientation, a)


def _png_gray(img, head: bytes, name: str) -> np.ndarray:
    depth, colour_type = head[24], head[25]
    if colour_type & 2:                     # truecolour (2, 6) or palette (3)
        if depth == 16:
            raise InputError(f"{name} is a 16-bit colour PNG; its exact cv2 grey needs the low bytes, "
                             "which Pillow drops", "convert it to 8-bit or grey first")
        info = img.info
        gamma = 45455 if "srgb" in info else round(info.get("gamma", 1.0) * 100000) or 100000
        return _libpng_gray(np.asarray(img if img.mode == "RGB" else img.convert("RGB")), gamma)
    a = np.asarray(img.convert("L") if img.mode == "1" else img)
    if a.ndim == 3:                         # grey + alpha (Pillow may widen 16-bit LA to RGBA)
        a = a[..., 0]
    if depth == 16 and a.dtype != np.uint8:
        return (a.astype(np.uint32) >> 8).astype(np.uint8)   # libpng strip_16: high byte
    return a.astype(np.uint8)


def _other_gray(img, fmt: str, name: str) -> np.ndarray:
    if img.mode in ("L", "1"):
        return np.asarray(img.convert("L"))
    if img.mode == "LA":
        return np.asarray(img)[..., 0]
    if img.mode not in ("RGB", "RGBA", "P", "PA"):
        raise InputError(f"{name} is a {fmt} image in mode {img.mode}; its cv2 grey rule is not replicated",
                         "convert it to 8-bit RGB or grey PNG first")
    if fmt == "tiff" and img.mode == "RGBA":  # libtiff's RGBA reader premultiplies alpha
        rgba = np.asarray(img).astype(np.int64)
        rgb = ((rgba[..., :3] * rgba[..., 3:] + 127) // 255).astype(np.uint8)
    else:
        rgb = np.asarray(img.convert("RGB"))
    return to_gray_like_cv2(rgb, fmt)


def imread_gray(path) -> np.ndarray:
    """cv2.imread(path, cv2.IMREAD_GRAYSCALE) as uint8 HxW, without OpenCV.

    PNG: libpng's grey rule (alpha stripped, not composited; 16-bit grey -> high byte).
    JPEG: Pillow's draft('L') makes libjpeg emit the Y plane directly, as cv2 does
    (convert('L') would re-derive grey from RGB and differ). EXIF orientation is applied.
    """
    from .images import open_image
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    name = str(path)
    with open(path, "rb") as f:
        head = f.read(32)               # the PNG IHDR: bit depth and colour type
    with open_image(path, name, eight_bit=False) as img:  # size-checked; Pillow's refusals typed
        fmt = (img.format or "").lower()
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)  # before decoding: Pillow's
        if fmt == "tiff" and orientation not in (0, 1):          # TIFF loader applies it itself
            raise InputError(f"{name} is a TIFF with Orientation={orientation}; cv2 5.0 fails to read "
                             "such files, so there is no reference to match", "re-save it without the tag")
        if fmt in ("jpeg", "mpo"):
            if img.mode not in ("L", "RGB", "YCbCr"):
                raise InputError(f"{name} is a {img.mode} JPEG; cv2 converts it to grey by its own rule",
                                 "convert it to an RGB or grey image first")
            if img.mode != "L":
                img.draft("L", img.size)   # libjpeg decodes to JCS_GRAYSCALE: the Y plane
            gray = np.asarray(img)
        elif fmt == "png":
            gray = _png_gray(img, head, name)
        else:
            gray = _other_gray(img, fmt, name)
    if fmt in ("jpeg", "mpo", "png", "webp"):
        gray = _orient(gray, orientation)
    return np.ascontiguousarray(gray, dtype=np.uint8)
