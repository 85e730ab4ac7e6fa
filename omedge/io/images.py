"""Images in, RGB HWC arrays out, with a clear refusal where a conversion would be a guess.

Files are untrusted: the pixel count is checked from the header before anything is
decoded, and Pillow's own metadata guards (PngImagePlugin.MAX_TEXT_CHUNK, MAX_TEXT_MEMORY)
surface as InputError. No Pillow global is changed; ImageFile.LOAD_TRUNCATED_IMAGES is
never set here (a caller that sets it accepts truncated pixels for its whole process)."""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import limit_from_env

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
# Pillow's own warning threshold (2**32 / 4 / 12), enforced here as a refusal instead of a warning,
# and applied even where a caller has switched Pillow's off; OMEDGE_MAX_IMAGE_PIXELS changes it.
DEFAULT_MAX_PIXELS = 89_478_485
MAX_PIXELS_ENV = "OMEDGE_MAX_IMAGE_PIXELS"
_WIDE_SAMPLES = re.compile(r";(16|32)[BLNS]")  # raw modes with 16/32-bit samples (not BMP's packed BGR;16)


def describe_source(item) -> str:
    if isinstance(item, (str, Path)):
        return str(item)
    if isinstance(item, np.ndarray):
        return f"array{tuple(item.shape)}:{item.dtype}"
    return type(item).__name__


ALPHA_RULES = ("drop", "white")


def pixel_limit() -> int:
    """omedge's limit on decoded image size: OMEDGE_MAX_IMAGE_PIXELS or the default. Pillow's
    own refusal above 2 x PIL.Image.MAX_IMAGE_PIXELS still applies on top (its global, not ours)."""
    return limit_from_env(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS, "pixels")


def check_header(img, name: str, limit: int | None = None, eight_bit: bool = True) -> None:
    """Refuse, before decoding, what is too large or wider than 8 bits per sample
    (Pillow decodes 16-bit colour PNG/TIFF into 8-bit RGB by dropping the low bytes)."""
    limit = pixel_limit() if limit is None else limit
    w, h = img.size
    if w * h > limit:
        raise InputError(f"{name} is {w}x{h} = {w * h / 1e6:.1f} megapixels, over the {limit / 1e6:.1f}-megapixel "
                         "limit that guards against decompression bombs",
                         f"tile or downscale it first; to allow larger images set {MAX_PIXELS_ENV}")
    for tile in (getattr(img, "tile", None) or []) if eight_bit else []:
        args = tile.args if hasattr(tile, "args") else tile[3]
        raw = args if isinstance(args, str) else (args[0] if args and isinstance(args[0], str) else "")
        if _WIDE_SAMPLES.search(raw):
            raise InputError(f"{name} has {_WIDE_SAMPLES.search(raw).group(1)}-bit samples ({img.mode}, stored "
                             f"as {raw}); the model expects 8-bit RGB",
                             "convert it to 8-bit first, with the windowing you want (e.g. scale by 255/max)")


@contextmanager
def open_image(path, name: str | None = None, limit: int | None = None, eight_bit: bool = True):
    """Image.open for untrusted files: the header checked before any decoding, and every
    Pillow refusal (bomb, oversized text chunks, truncation) an InputError."""
    from PIL import Image, UnidentifiedImageError
    name = name or str(path)
    try:
        with Image.open(path) as img:
            check_header(img, name, limit, eight_bit)
            yield img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning: under -W error
        raise InputError(f"{name} is refused as a possible decompression bomb ({e})",
                         "tile or downscale it first (PIL.Image.MAX_IMAGE_PIXELS sets Pillow's limit)") from e
    except UnidentifiedImageError as e:
        raise InputError(f"{name} is not a readable image", "supported: PNG, JPEG, TIFF, BMP, WebP") from e
    except ValueError as e:  # Pillow's MAX_TEXT_CHUNK / MAX_TEXT_MEMORY guards, and malformed headers
        raise InputError(f"{name} cannot be decoded ({e})",
                         "its metadata is oversized or malformed: re-save the pixels alone (e.g. without text "
                         "chunks)") from e
    except OSError as e:
        raise InputError(f"{name} cannot be decoded ({e})", "the file is truncated or corrupt") from e


def read_image(item, grayscale: str = "replicate", alpha: str = "drop", max_pixels: int | None = None) -> np.ndarray:
    """Return an RGB image: uint8 HWC, or float32 HWC in [0, 1] for float arrays.

    grayscale: "replicate" copies one channel to three (what PIL's convert('RGB')
    does in the official loaders); "refuse" raises, for models whose input must be
    colour (H&E and IHC stains carry meaning in colour).
    alpha: "drop" keeps the colour channels as they are, as the official loaders'
    `convert('RGB')` does (OpenSlide's transparent pixels, 0,0,0,0, become black);
    "white" composites onto white.
    max_pixels: the decoded-size limit for files and PIL images (default: pixel_limit()).
    """
    _check_alpha(alpha)
    from PIL import Image
    name = describe_source(item)
    if isinstance(item, (str, Path)):
        path = Path(item)
        if not path.is_file():
            raise InputError(f"image not found: {path}")
        with open_image(path, name, max_pixels) as img:
            img.load()
            return _from_pil(img, name, grayscale, alpha)
    if isinstance(item, Image.Image):
        check_header(item, name, max_pixels)
        return _from_pil(item, name, grayscale, alpha)
    if isinstance(item, np.ndarray):
        return _from_array(item, name, grayscale, alpha)
    raise InputError(f"cannot use a {type(item).__name__} as an image",
                     "give a file path, a PIL image or a numpy array (HWC)")


def probe_image(path, grayscale: str = "replicate", alpha: str = "drop", max_pixels: int | None = None) -> None:
    """The refusals read_image would make for this file, from its header alone (nothing is
    decoded): for callers that then decode the pixels their own way, once (the cv2-grey path
    of DeblurringMIM) and must still refuse exactly what read_image refuses."""
    _check_alpha(alpha)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    with open_image(path, str(path), max_pixels) as img:
        _refuse_mode(img.mode, str(path))
        if img.mode in ("L", "LA") and grayscale == "refuse":
            raise _grey_refused(str(path))


def _check_alpha(alpha: str) -> None:
    if alpha not in ALPHA_RULES:
        raise InputError(f"unknown alpha rule '{alpha}' in the manifest", f"known: {', '.join(ALPHA_RULES)}")


def _refuse_mode(mode: str, name: str) -> None:
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        bits = "16" if "16" in mode else "32"
        raise InputError(f"{name} is a {mode} ({bits}-bit) image; the model expects 8-bit RGB",
                         "convert it to 8-bit first, with the windowing you want (e.g. scale by 255/max)")
    if mode == "1":
        raise InputError(f"{name} is a 1-bit (black/white) image; the model expects 8-bit RGB")


def _grey_refused(name: str) -> InputError:
    return InputError(f"{name} is grayscale; this model needs colour (RGB) input",
                      "give the original colour image (a stain's colour carries the signal)")


def _from_pil(img, name, grayscale, alpha):
    mode = img.mode
    _refuse_mode(mode, name)
    if mode in ("P", "PA"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("L", "LA"):
        return _from_array(np.asarray(img.convert("L")), name, grayscale, alpha)
    if mode == "RGBA":
        return _from_array(np.asarray(img), name, grayscale, alpha)
    return np.asarray(img.convert("RGB"))


def _from_array(arr: np.ndarray, name: str, grayscale: str, alpha: str = "drop") -> np.ndarray:
    _check_dtype(arr, name)
    if arr.size == 0:
        raise InputError(f"{name} is empty (shape {arr.shape})")
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        raise InputError(f"{name} looks channels-first (CHW); images must be HWC",
                         "use arr.transpose(1, 2, 0)")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise InputError(f"{name}: expected an HxW or HxWx3/4 image, got shape {arr.shape}")
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
            raise _grey_refused(name)
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[-1] == 4 and alpha == "drop":  # PIL's convert('RGB'): the alpha channel is discarded
        return np.ascontiguousarray(arr[..., :3])
    if arr.shape[-1] == 4:  # composite on white
        a = arr[..., 3:].astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 1.0)
        top = 255.0 if arr.dtype == np.uint8 else 1.0
        rgb = arr[..., :3].astype(np.float32) * a + top * (1 - a)
        return np.round(rgb).astype(np.uint8) if arr.dtype == np.uint8 else rgb.astype(np.float32)
    return arr


def _check_dtype(arr: np.ndarray, name: str) -> None:
    """Only uint8, bool (refused below with its own reason) and real floats are pixels:
    a cast of anything else would wrap (int8 -1 -> 255), drop a part (complex) or fail untyped."""
    kind = arr.dtype.kind
    if arr.dtype == np.uint8 or kind in "fb":
        return
    if kind in "iu":
        what = f"{'an' if arr.dtype.name.startswith('int') else 'a'} {arr.dtype} image" + ("; signed values would wrap around (-1 would read as 255)"
                                          if kind == "i" and arr.dtype.itemsize == 1 else "")
        raise InputError(f"{name} is {what}; the model expects 8-bit RGB",
                         "convert to uint8 (with the windowing you want) or to float in [0, 1]")
    if kind == "c":
        raise InputError(f"{name} holds complex values; an image cast would drop the imaginary part",
                         "pass the magnitude (np.abs) or the real part explicitly, scaled to uint8 or [0, 1]")
    raise InputError(f"{name} is an array of {arr.dtype} ({arr.dtype.kind!r} values), not pixel values",
                     "give a numeric uint8 array, or float in [0, 1]")


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputError(f"no images in {folder}", f"expected files ending in {', '.join(sorted(IMAGE_SUFFIXES))}")
    return files
