"""The official image preprocessing, run from the manifest's data in numpy + Pillow.

Resizing goes through Pillow because torchvision's Resize on PIL images is exactly a
Pillow resize: the same call gives the same pixels as the research pipeline.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.images import MAX_PIXELS_ENV, describe_source, pixel_limit, read_image

_RESAMPLE = {"bilinear": 2, "bicubic": 3, "nearest": 0, "lanczos": 1}  # PIL codes


def opencv_gaussian_kernel(sigma: float, uint8: bool) -> np.ndarray:
    """The float kernel cv2.GaussianBlur(img, (0, 0), sigma) uses on float images: size
    from sigma as OpenCV derives it (4 sigma each side), odd."""
    size = round(sigma * (3 if uint8 else 4) * 2 + 1) | 1
    x = np.arange(size) - (size - 1) / 2
    k = np.exp(-(x ** 2) / (2 * sigma ** 2))
    return k / k.sum()


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """cv2.GaussianBlur(img, (0, 0), sigma), HxW or HxWxC: bit-exact on 8-bit images (OpenCV's
    fixed-point path, io.opencv_compat), float separable with reflect-101 otherwise."""
    is_u8 = img.dtype == np.uint8
    if is_u8 and img.ndim == 2 and min(img.shape) > 8 * sigma + 2:
        return blur_plane_u8(img, sigma)
    if is_u8:
        from ..io.opencv_compat import gaussian_blur_u8
        return gaussian_blur_u8(img, sigma)
    k = opencv_gaussian_kernel(sigma, is_u8)
    r = len(k) // 2
    out = img.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="reflect")
        n = out.shape[axis]
        out = sum(w * np.take(padded, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
    if is_u8:
        return np.clip(np.round(out), 0, 255).astype(np.uint8)
    return out.astype(np.float32)


def blur_plane_u8(img: np.ndarray, sigma: float) -> np.ndarray:
    """io.opencv_compat.gaussian_blur_u8 on one HxW plane, the same integer arithmetic
    arranged for speed (DeblurringMIM blurs every full-size frame before resizing it).

    The same 256-sum taps and one rounding, (acc + 2**15) >> 16; both sums are exact, so
    their order does not matter. Symmetric taps are paired (one multiply per pair), the
    first pass runs in uint16 (it peaks at 255 * 256 = 65280), and every step writes into
    a preallocated buffer. Reflect-101 borders are numpy's "reflect" padding; the caller
    keeps planes narrower than the kernel on the reference path."""
    from ..io.opencv_compat import gaussian_kernel_u8
    taps = [int(t) for t in gaussian_kernel_u8(sigma)]
    r = len(taps) // 2
    h, w = img.shape
    rows = np.pad(img, ((0, 0), (r, r)), mode="reflect").astype(np.uint16)
    across = rows[:, r:r + w] * np.uint16(taps[r])
    pair = np.empty((h, w), np.uint16)
    for k in range(1, r + 1):
        if taps[r - k]:
            np.add(rows[:, r - k:r - k + w], rows[:, r + k:r + k + w], out=pair)
            np.multiply(pair, np.uint16(taps[r - k]), out=pair)
            across += pair
    cols = np.pad(across, ((r, r), (0, 0)), mode="reflect")
    acc = cols[r:r + h].astype(np.int32) * np.int32(taps[r])
    pair32 = np.empty((h, w), np.int32)
    for k in range(1, r + 1):
        if taps[r - k]:
            np.add(cols[r - k:r - k + h], cols[r + k:r + k + h], out=pair32, dtype=np.int32)
            np.multiply(pair32, np.int32(taps[r - k]), out=pair32)
            acc += pair32
    acc += 1 << 15
    acc >>= 16
    return acc.astype(np.uint8)


def to_gray(img: np.ndarray) -> np.ndarray:
    """Grey from a decoded RGB array as cv2.cvtColor(RGB2GRAY) computes it (fixed point).
    Files are read with io.opencv_compat.imread_gray instead, which follows each
    decoder's own rule, as the official cv2.imread(path, IMREAD_GRAYSCALE) does."""
    if img.dtype == np.uint8:
        from ..io.opencv_compat import to_gray_like_cv2
        return to_gray_like_cv2(img, "cvtcolor")
    return (img[..., 0] * 0.299 + img[..., 1] * 0.587 + img[..., 2] * 0.114).astype(np.float32)


def resize_short_side(img: np.ndarray, size: int, interpolation: str, name: str = "the image") -> np.ndarray:
    """torchvision Resize(int): the shorter side becomes `size`, the longer keeps the
    aspect ratio (truncated, as torchvision does). A sliver (1 x 20000 px) would grow to
    gigapixels, so the result is held to the decoded-image pixel limit first."""
    h, w = img.shape[:2]
    if min(h, w) == size:
        return img
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    if new_h * new_w > pixel_limit():
        raise InputError(f"{name} is {w}x{h} px; scaling its short side to {size} would make it {new_w}x{new_h}, "
                         f"over the {pixel_limit() / 1e6:.1f}-megapixel limit",
                         f"crop it to the region of interest first (the limit is {MAX_PIXELS_ENV})")
    return resize_to(img, new_h, new_w, interpolation)


def resize_to(img: np.ndarray, new_h: int, new_w: int, interpolation: str) -> np.ndarray:
    """torchvision Resize((h, w)) on a PIL image: Pillow's antialiased resample."""
    from PIL import Image
    if img.shape[:2] == (new_h, new_w):
        return img
    resample = _RESAMPLE[interpolation]
    if img.dtype == np.uint8:
        return np.asarray(Image.fromarray(img).resize((new_w, new_h), resample))
    if img.ndim == 2:
        return np.asarray(Image.fromarray(img, mode="F").resize((new_w, new_h), resample))
    chans = [np.asarray(Image.fromarray(img[..., c], mode="F").resize((new_w, new_h), resample))
             for c in range(img.shape[2])]
    return np.stack(chans, axis=2)


def center_crop(img: np.ndarray, size: int, name: str) -> np.ndarray:
    h, w = img.shape[:2]
    if h < size or w < size:
        raise InputError(f"{name} is {w}x{h} px; the model needs at least {size}x{size} here",
                         "give the full-size tile the model was trained on")
    top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    return img[top:top + size, left:left + size]


def decode(item, spec: dict) -> np.ndarray:
    """The pixels the transforms start from: RGB HWC (uint8, or float in [0, 1]); or, for a
    blur on grayscale (DeblurringMIM), the blurred HxW grey plane, kept one channel: its three
    RGB copies are made only by `normalise_chw`, after the resize (Pillow resamples each band
    alike, so resizing one plane gives each band of the replicated image)."""
    grayscale, alpha = spec.get("grayscale", "replicate"), spec.get("alpha", "drop")
    blur = spec.get("blur")
    if not blur:
        return read_image(item, grayscale, alpha)
    if blur.get("on") != "grayscale":
        return gaussian_blur(read_image(item, grayscale, alpha), blur["sigma"])
    if isinstance(item, (str, Path)):  # cv2.imread(GRAYSCALE): one decode, by each format's own rule
        from ..io.images import probe_image
        from ..io.opencv_compat import imread_gray
        probe_image(item, grayscale, alpha)  # read_image's refusals, from the header
        gray = imread_gray(item)
    else:
        gray = to_gray(read_image(item, grayscale, alpha))
    return gaussian_blur(gray, blur["sigma"])


def transform(img: np.ndarray, spec: dict, name: str = "the image") -> np.ndarray:
    """Decoded pixels -> CHW float32: resize and crop in the pixels' own dtype (uint8 stays
    uint8, as Pillow resamples it in the official loaders), then normalise."""
    resize = spec.get("resize")
    if resize and isinstance(resize["size"], list):  # Resize((h, w)): straight to that size (CITE)
        img = resize_to(img, *resize["size"], resize["interpolation"])
    elif resize:
        img = resize_short_side(img, resize["size"], resize["interpolation"], name)
    if spec.get("center_crop"):
        img = center_crop(img, spec["center_crop"], name)
    return normalise_chw(img, spec["mean"], spec["std"])


def normalise_chw(img: np.ndarray, mean, std) -> np.ndarray:
    """(x / 255 - mean) / std as CHW float32, the same bits as computing it pixel by pixel in
    float32: an 8-bit channel has 256 values, so each channel's results are computed once, in
    that arithmetic, and looked up straight into the channel's CHW plane (no float HWC image,
    no transpose copy). An HxW plane fills all three channels."""
    mean = np.broadcast_to(np.asarray(mean, np.float32), (3,))
    std = np.broadcast_to(np.asarray(std, np.float32), (3,))
    if img.dtype != np.uint8:  # float pixels in [0, 1]: computed directly
        x = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img
        return np.ascontiguousarray(((x.astype(np.float32) - mean) / std).transpose(2, 0, 1))
    table = np.ascontiguousarray(((np.arange(256, dtype=np.uint8).astype(np.float32)[:, None] / 255.0 - mean)
                                  / std).T)
    out = np.empty((3, *img.shape[:2]), np.float32)
    for c in range(3):
        np.take(table[c], img if img.ndim == 2 else img[..., c], out=out[c], mode="clip")
    return out


def preprocess_one(item, spec: dict) -> np.ndarray:
    """One image -> CHW float32, following `spec` (the manifest's `preprocess`)."""
    return transform(decode(item, spec), spec, describe_source(item))


def as_items(images) -> list:
    """A single image (path, PIL image, HxW[xC] array) or a batch (list, NHWC array)."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    return [images]


def preprocess(images, spec: dict) -> np.ndarray:
    items = as_items(images)
    if not items:
        raise InputError("no images given")
    return np.stack([preprocess_one(item, spec) for item in items])


# The video frame path follows med-air/Endo-FM's test loader instead (datasets/ucf101.py): the
# frames are made float and normalised first, then scaled by F.interpolate (bilinear, half-pixel
# centres, no antialiasing), then cropped; Pillow's antialiased resize would differ.
FRAME_CROPS = {"uniform-0": 0, "uniform-1": 1, "uniform-2": 2, "center": 1}


def short_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """Size after transform.random_short_side_scale_jitter(min = max = size): unchanged when
    the short side is already `size`, else the long side is floor(long / short * size)."""
    if min(h, w) == size:
        return h, w
    if w < h:
        return math.floor(h / w * size), size
    return size, math.floor(w / h * size)


def bilinear_taps(n_in: int, n_out: int):
    """(index0, index1, weight0, weight1) per output pixel along one axis, as
    F.interpolate(mode="bilinear", align_corners=False, antialias=False) computes them:
    source x = (i + 0.5) * scale - 0.5 with scale = n_in / n_out in float32, rounded once
    (torch's AVX2/AVX-512 kernels fuse the multiply-add), negatives clamped to 0, the last
    source pixel repeated at the far edge."""
    f = np.float32
    scale = np.float64(f(n_in) / f(n_out))
    src = np.maximum((scale * (np.arange(n_out) + 0.5) - 0.5).astype(f), f(0))  # exact in float64, one rounding
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam = np.clip(src - i0.astype(f), f(0), f(1))
    return i0, np.minimum(i0 + 1, n_in - 1), f(1) - lam, lam


def uniform_crop_offsets(h: int, w: int, size: int, index: int, name: str) -> tuple[int, int]:
    """(top, left) of transform.uniform_crop: index 1 is the middle (offsets rounded up),
    0 the left crop, or the top one when the frame is taller than wide, 2 the right/bottom."""
    if h < size or w < size:
        raise InputError(f"{name} is {w}x{h} px after scaling; the crop needs {size}x{size}")
    top, left = math.ceil((h - size) / 2), math.ceil((w - size) / 2)
    if h > w:
        top = (0, top, h - size)[index]
    else:
        left = (0, left, w - size)[index]
    return top, left


def preprocess_frame(frame, spec: dict) -> np.ndarray:
    """One video frame -> CHW float32, in the official loader's order: /255 and mean/std
    (tensor_normalize), short side to spec["short_side"] by float bilinear interpolation,
    then spec["crop"] ("uniform-0": the official evaluation's left/top crop; "center").
    Only the pixels the crop keeps are computed: the same values, a fraction of the work."""
    mode, size = spec.get("crop", "center"), spec.get("crop_size", spec.get("center_crop"))
    if mode not in FRAME_CROPS:
        raise InputError(f"unknown video crop '{mode}' in the manifest", f"known: {', '.join(FRAME_CROPS)}")
    if spec.get("interpolation", "bilinear") != "bilinear" or spec.get("antialias", False):
        raise InputError("this runtime resizes video frames only with bilinear, no antialiasing",
                         "re-export the bundle with this omedge version")
    img = read_image(frame, spec.get("grayscale", "replicate"), spec.get("alpha", "drop"))
    h, w = img.shape[:2]
    new_h, new_w = short_side_size(h, w, spec["short_side"])
    top, left = uniform_crop_offsets(new_h, new_w, size, FRAME_CROPS[mode], describe_source(frame))
    r0, r1, wr0, wr1 = (a[top:top + size] for a in bilinear_taps(h, new_h))
    c0, c1, wc0, wc1 = (a[left:left + size] for a in bilinear_taps(w, new_w))
    mean, std = np.asarray(spec["mean"], np.float32), np.asarray(spec["std"], np.float32)
    scale = 255.0 if img.dtype == np.uint8 else 1.0

    def norm(rows, cols):  # normalising only the source pixels the crop reads: the same values
        return (img[rows[:, None], cols[None, :]].astype(np.float32) / scale - mean) / std

    def across(rows):  # interpolated along the width first, then the height, as torch does
        return norm(rows, c0) * wc0[:, None] + norm(rows, c1) * wc1[:, None]
    x = across(r0) * wr0[:, None, None] + across(r1) * wr1[:, None, None]
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def clip_from_frames(frames: list[np.ndarray], n: int) -> np.ndarray:
    """Stack preprocessed CHW frames into C,T,H,W. A clip shorter than `n` repeats its
    last frame, as the official loaders clamp frame indices to the video's length."""
    if not frames:
        raise InputError("no frames to make a clip from")
    frames = list(frames) + [frames[-1]] * (n - len(frames))
    return np.stack(frames[:n], axis=1)
