"""Images in, RGB HWC arrays out, with a clear refusal where a conversion would be a guess."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


def describe_source(item) -> str:
    if isinstance(item, (str, Path)):
        return str(item)
    if isinstance(item, np.ndarray):
        return f"array{tuple(item.shape)}:{item.dtype}"
    return type(item).__name__


ALPHA_RULES = ("drop", "white")


def read_image(item, grayscale: str = "replicate", alpha: str = "drop") -> np.ndarray:
    """Return an RGB image: uint8 HWC, or float32 HWC in [0, 1] for float arrays.

    grayscale: "replicate" copies one channel to three (what PIL's convert('RGB')
    does in the official loaders); "refuse" raises, for models whose input must be
    colour (H&E and IHC stains carry meaning in colour).
    alpha: "drop" keeps the colour channels as they are, as the official loaders'
    `convert('RGB')` does (OpenSlide's transparent pixels, 0,0,0,0, become black);
    "white" composites onto white.
    """
    if alpha not in ALPHA_RULES:
        raise InputError(f"unknown alpha rule '{alpha}' in the manifest", f"known: {', '.join(ALPHA_RULES)}")
    from PIL import Image, UnidentifiedImageError
    name = describe_source(item)
    if isinstance(item, (str, Path)):
        path = Path(item)
        if not path.is_file():
            raise InputError(f"image not found: {path}")
        try:
            with Image.open(path) as img:
                img.load()
                return _from_pil(img, name, grayscale, alpha)
        except UnidentifiedImageError as e:
            raise InputError(f"{name} is not a readable image", "supported: PNG, JPEG, TIFF, BMP, WebP") from e
        except OSError as e:
            raise InputError(f"{name} cannot be decoded ({e})", "the file is truncated or corrupt") from e
    if isinstance(item, Image.Image):
        return _from_pil(item, name, grayscale, alpha)
    if isinstance(item, np.ndarray):
        return _from_array(item, name, grayscale, alpha)
    raise InputError(f"cannot use a {type(item).__name__} as an image",
                     "give a file path, a PIL image or a numpy array (HWC)")


def _from_pil(img, name, grayscale, alpha):
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        raise InputError(f"{name} is a {mode} ({'16' if '16' in mode else '32'}-bit) image; the model expects 8-bit RGB",
                         "convert it to 8-bit first, with the windowing you want (e.g. scale by 255/max)")
    if mode == "1":
        raise InputError(f"{name} is a 1-bit (black/white) image; the model expects 8-bit RGB")
    if mode in ("P", "PA"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("L", "LA"):
        return _from_array(np.asarray(img.convert("L")), name, grayscale, alpha)
    if mode == "RGBA":
        return _from_array(np.asarray(img), name, grayscale, alpha)
    return np.asarray(img.convert("RGB"))


def _from_array(arr: np.ndarray, name: str, grayscale: str, alpha: str = "drop") -> np.ndarray:
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        raise InputError(f"{name} looks channels-first (CHW); images must be HWC",
                         "use arr.transpose(1, 2, 0)")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise InputError(f"{name}: expected an HxW or HxWx3/4 image, got shape {arr.shape}")
    if arr.dtype == np.uint16 or arr.dtype.itemsize > 1 and arr.dtype.kind in "iu":
        raise InputError(f"{name} is a {arr.dtype} image; the model expects 8-bit RGB",
                         "convert to uint8 (with the windowing you want) or to float in [0, 1]")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise InputError(f"{name} contains NaN or Inf values")
        if arr.min() < 0 or arr.max() > 1:
            raise InputError(f"{name}: float images must be scaled to [0, 1] (got {arr.min():.3g}..{arr.max():.3g})",
                             "divide 8-bit data by 255, or pass it as uint8")
        arr = arr.astype(np.float32)
    elif arr.dtype == np.bool_:
        raise InputError(f"{name} is a boolean mask, not an image")
    else:
        arr = arr.astype(np.uint8, copy=False)
    if arr.ndim == 2:
        if grayscale == "refuse":
            raise InputError(f"{name} is grayscale; this model needs colour (RGB) input",
                             "give the original colour image (a stain's colour carries the signal)")
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[-1] == 4 and alpha == "drop":  # PIL's convert('RGB'): the alpha channel is discarded
        return np.ascontiguousarray(arr[..., :3])
    if arr.shape[-1] == 4:  # composite on white
        a = arr[..., 3:].astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 1.0)
        top = 255.0 if arr.dtype == np.uint8 else 1.0
        rgb = arr[..., :3].astype(np.float32) * a + top * (1 - a)
        return np.round(rgb).astype(np.uint8) if arr.dtype == np.uint8 else rgb.astype(np.float32)
    return arr


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputError(f"no images in {folder}", f"expected files ending in {', '.join(sorted(IMAGE_SUFFIXES))}")
    return files
