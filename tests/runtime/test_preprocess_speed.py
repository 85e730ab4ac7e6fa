"""The faster image preprocessing (issue #16) gives the same bits as the straightforward
chain it replaces: one decode of a DeblurringMIM file, its grey plane resized once instead
of three times, and a lookup-table normalise straight into CHW."""
import cv2
import numpy as np
import pytest
from PIL import Image

from omedge import models
from omedge.errors import InputError
from omedge.io.images import read_image
from omedge.runtime.preprocess import (
    decode,
    normalise_chw,
    preprocess,
    preprocess_one,
    transform,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def spec(model_id):
    return models.get_spec(model_id).preprocess


def reference_chain(rgb_or_gray: np.ndarray, size: int, crop: int, resample=Image.BICUBIC) -> np.ndarray:
    """PIL convert('RGB') -> Resize(size) on the RGB image -> CenterCrop -> float32 /255,
    mean/std pixel by pixel -> CHW: the order the official loaders run."""
    img = Image.fromarray(rgb_or_gray).convert("RGB")
    w, h = img.size
    img = img.resize((size, int(size * h / w)) if w <= h else (int(size * w / h), size), resample)
    a = np.asarray(img)
    top, left = round((a.shape[0] - crop) / 2.0), round((a.shape[1] - crop) / 2.0)
    x = a[top:top + crop, left:left + crop].astype(np.float32) / 255.0
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """Ultrasound-like frames, 480x640: grey and colour, PNG and JPEG."""
    d = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(4)
    base = np.asarray(Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize((640, 480),
                                                                                                 Image.BICUBIC))
    paths = []
    for mode in ("L", "RGB"):
        for ext in ("png", "jpg"):
            p = d / f"frame_{mode}.{ext}"
            Image.fromarray(base).convert(mode).save(p, quality=90) if ext == "jpg" else \
                Image.fromarray(base).convert(mode).save(p)
            paths.append(p)
    return paths


def test_deblurring_file_path_is_the_official_chain_bit_for_bit(frames):
    """cv2.imread(GRAYSCALE) -> cv2.GaussianBlur(1.1) -> RGB -> Resize 256 bicubic -> CenterCrop
    224 -> normalise: array_equal, not allclose."""
    for path in frames:
        blurred = cv2.GaussianBlur(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (0, 0), 1.1)
        ref = reference_chain(blurred, 256, 224)
        for model_id in ("deblurring-convmae", "deblurring-mae"):
            ours = preprocess_one(path, spec(model_id))
            assert ours.dtype == np.float32 and ours.flags.c_contiguous
            np.testing.assert_array_equal(ours, ref, err_msg=f"{model_id} {path.name}")


def test_deblurring_arrays_are_the_official_chain_bit_for_bit(frames):
    rgb = np.asarray(Image.open(frames[3]).convert("RGB"))
    blurred = cv2.GaussianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (0, 0), 1.1)
    np.testing.assert_array_equal(preprocess_one(rgb, spec("deblurring-convmae")), reference_chain(blurred, 256, 224))
    grey = decode(rgb, spec("deblurring-convmae"))
    assert grey.shape == (480, 640) and grey.dtype == np.uint8  # one plane until the normalise
    np.testing.assert_array_equal(transform(grey, spec("deblurring-convmae")), preprocess_one(rgb,
                                                                                            spec("deblurring-convmae")))


@pytest.mark.parametrize("resample", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [(37, 53), (300, 200)])
def test_one_grey_plane_resamples_as_each_band_of_its_rgb_copy(resample, size):
    """Why the grey plane can be resized alone: Pillow resamples every band of an 8-bit
    image with the same integer taps."""
    from omedge.runtime.preprocess import resize_to
    grey = np.random.default_rng(size[0]).integers(0, 256, (120, 90), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    one, three = resize_to(grey, *size, resample), resize_to(rgb, *size, resample)
    for c in range(3):
        np.testing.assert_array_equal(one, three[..., c])
    f = grey.astype(np.float32) / 255
    np.testing.assert_array_equal(resize_to(f, *size, resample), resize_to(np.stack([f] * 3, 2), *size, resample)[..., 1])


def test_lookup_normalise_is_the_pixelwise_float32_formula():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (57, 43, 3), dtype=np.uint8)
    img[0, :3] = [[0, 0, 0], [255, 255, 255], [128, 1, 254]]
    pixelwise = ((img.astype(np.float32) / 255.0 - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32))
    np.testing.assert_array_equal(normalise_chw(img, MEAN, STD), pixelwise.transpose(2, 0, 1))
    grey = img[..., 1]
    np.testing.assert_array_equal(normalise_chw(grey, MEAN, STD),
                                  normalise_chw(np.repeat(grey[..., None], 3, axis=2), MEAN, STD))
    f = img.astype(np.float32) / 255
    np.testing.assert_array_equal(normalise_chw(f, MEAN, STD),
                                  ((f - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)).transpose(2, 0, 1))
    no_norm = normalise_chw(img, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # PathoDuet: plain /255
    np.testing.assert_array_equal(no_norm, (img.astype(np.float32) / 255.0).transpose(2, 0, 1))


def test_brow_tiles_are_the_official_chain_bit_for_bit(tiles):
    s = spec("brow")
    for path in tiles[:4]:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        top, left = round((rgb.shape[0] - 224) / 2.0), round((rgb.shape[1] - 224) / 2.0)
        x = rgb[top:top + 224, left:left + 224].astype(np.float32) / 255.0
        ref = ((x - np.asarray(s["mean"], np.float32)) / np.asarray(s["std"], np.float32)).transpose(2, 0, 1)
        np.testing.assert_array_equal(preprocess(path, s)[0], ref)


def test_deblurring_file_is_decoded_once(frames, monkeypatch):
    """The grey decode replaces the RGB one (both ran before): one decoder per file."""
    from PIL import Image as PILImage
    real, made = PILImage._getdecoder, []

    def counting(*args, **kwargs):
        made.append(args[1] if len(args) > 1 else kwargs.get("decoder_name"))
        return real(*args, **kwargs)
    monkeypatch.setattr(PILImage, "_getdecoder", counting)
    for path in frames:
        made.clear()
        preprocess_one(path, spec("deblurring-convmae"))
        assert len(made) == 1, (path.name, made)


def test_header_probe_refuses_what_read_image_refuses(tmp_path):
    """The grey path decodes with imread_gray, which would accept 16-bit grey and 1-bit
    files (cv2 does); read_image's refusals still apply, with the same messages."""
    deep, bits, broken = tmp_path / "deep.png", tmp_path / "bits.png", tmp_path / "broken.png"
    Image.fromarray(np.zeros((256, 256), np.uint16)).save(deep)
    Image.fromarray(np.zeros((256, 256), bool)).save(bits)
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    grey_spec = spec("deblurring-convmae")
    for path in (deep, bits, broken, tmp_path / "missing.png"):
        with pytest.raises(InputError) as expected:
            read_image(path)
        with pytest.raises(InputError) as got:
            preprocess_one(path, grey_spec)
        assert got.value.message == expected.value.message
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((256, 256), 9, np.uint8)).save(grey)
    with pytest.raises(InputError, match="grayscale"):
        preprocess_one(grey, {**grey_spec, "grayscale": "refuse"})
    with pytest.raises(InputError, match="alpha rule"):
        preprocess_one(grey, {**grey_spec, "alpha": "blend"})


@pytest.mark.parametrize("sigma", [0.5, 1.1, 2.0, 3.3])
def test_fast_grey_blur_is_opencv_bit_for_bit(sigma):
    """The plane blur DeblurringMIM runs on every frame, against cv2 itself and the readable
    replica in io.opencv_compat: random, saturated and flat-edged planes, sizes near the
    kernel's (where the reflect-101 border covers most of the plane)."""
    from omedge.io.opencv_compat import gaussian_blur_u8
    from omedge.runtime.preprocess import blur_plane_u8, gaussian_blur
    rng = np.random.default_rng(int(sigma * 10))
    side = int(8 * sigma + 3)
    for shape in ((480, 640), (side, side + 5), (side + 40, 3 * side)):
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        img[: shape[0] // 3] = 255
        img[:, -2:] = 0
        ref = cv2.GaussianBlur(img, (0, 0), sigma)
        np.testing.assert_array_equal(blur_plane_u8(img, sigma), ref, err_msg=f"{shape} sigma {sigma}")
        np.testing.assert_array_equal(gaussian_blur(img, sigma), gaussian_blur_u8(img, sigma))
    tiny = rng.integers(0, 256, (5, 7), dtype=np.uint8)  # narrower than the kernel: the reference path
    np.testing.assert_array_equal(gaussian_blur(tiny, sigma), cv2.GaussianBlur(tiny, (0, 0), sigma))
