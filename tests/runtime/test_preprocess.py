"""The numpy preprocessing against the official transforms it replaces (torchvision
on PIL images == Pillow resize + torch crop/normalise; OpenCV for the offline blur)."""
import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import omedge.models as models
from omedge.errors import InputError
from omedge.runtime.preprocess import gaussian_blur, preprocess


def torchvision_like(img: Image.Image, resize=None, interp=Image.BILINEAR, crop=224, mean=(0, 0, 0), std=(1, 1, 1)):
    """Resize(int) -> CenterCrop -> ToTensor -> Normalize, as torchvision does on PIL."""
    if resize:
        w, h = img.size
        short, long = min(w, h), max(w, h)
        nl = int(resize * long / short)
        img = img.resize((resize, nl) if w <= h else (nl, resize), interp)
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    h, w = t.shape[1:]
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    t = t[:, top:top + crop, left:left + crop]
    return ((t - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]).numpy()


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).resize((300, 260), Image.BICUBIC)
    p = tmp_path / "photo.png"
    img.save(p)
    return p


def spec(model_id):
    return models.get_spec(model_id).preprocess


def test_brow_center_crop_imagenet(photo):
    ours = preprocess(photo, spec("brow"))[0]
    ref = torchvision_like(Image.open(photo).convert("RGB"), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_pathoduet_resize_crop_no_normalisation(photo):
    ours = preprocess(photo, spec("pathoduet-he"))[0]
    ref = torchvision_like(Image.open(photo).convert("RGB"), resize=256)
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    assert 0 <= ours.min() and ours.max() <= 1


def test_deblurring_offline_blur_matches_opencv(tmp_path, photo):
    # official: cv2.imread(GRAYSCALE) -> cv2.GaussianBlur((0,0), 1.1) -> PIL convert('RGB'),
    # on an 8-bit grayscale ultrasound frame
    for name, image in (("us.png", Image.open(photo).convert("L")), ("colour.png", Image.open(photo)),
                        ("colour.jpg", Image.open(photo).convert("RGB"))):
        us = tmp_path / name
        image.save(us)
        gray = cv2.imread(str(us), cv2.IMREAD_GRAYSCALE)
        blurred = cv2.GaussianBlur(gray, (0, 0), 1.1)
        ref = torchvision_like(Image.fromarray(blurred).convert("RGB"), resize=256, interp=Image.BICUBIC,
                               mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        ours = preprocess(us, spec("deblurring-mae"))[0]
        # the grey decode and OpenCV's fixed-point blur are bit-exact: only float rounding remains
        np.testing.assert_allclose(ours, ref, atol=1e-5, err_msg=name)


def test_colour_to_grey_matches_opencv(photo):
    from omedge.runtime.preprocess import to_gray
    rgb = np.asarray(Image.open(photo).convert("RGB"))
    ref = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(int)
    assert np.array_equal(to_gray(rgb).astype(int), ref)


def test_blur_kernel_and_border_match_opencv():
    img = np.random.default_rng(1).integers(0, 256, (40, 33), dtype=np.uint8)
    ours = gaussian_blur(img, 1.1).astype(int)
    ref = cv2.GaussianBlur(img, (0, 0), 1.1).astype(int)
    # OpenCV's fixed-point 8-bit path, reproduced bit for bit (io.opencv_compat)
    assert np.array_equal(ours, ref)
    f = img.astype(np.float32) / 255
    np.testing.assert_allclose(gaussian_blur(f, 1.1), cv2.GaussianBlur(f, (0, 0), 1.1), atol=1e-5)


def test_inputs_of_every_kind_agree(photo):
    s = spec("pathoduet-he")
    arr = np.asarray(Image.open(photo).convert("RGB"))
    from_path = preprocess(photo, s)
    np.testing.assert_array_equal(preprocess(Image.open(photo), s), from_path)
    np.testing.assert_array_equal(preprocess(arr, s), from_path)
    np.testing.assert_allclose(preprocess(arr.astype(np.float32) / 255, s), from_path, atol=0.02)
    assert preprocess(np.stack([arr, arr]), s).shape == (2, 3, 224, 224)
    assert preprocess([photo, arr], s).shape == (2, 3, 224, 224)


def test_grayscale_refused_for_stains_replicated_for_ultrasound(tmp_path):
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((256, 256), 120, np.uint8)).save(gray)
    with pytest.raises(InputError, match="grayscale"):
        preprocess(gray, spec("brow"))
    x = preprocess(gray, spec("deblurring-mae"))
    assert np.allclose(x[0, 0] * 0.229 + 0.485, x[0, 1] * 0.224 + 0.456, atol=1e-5)


def test_alpha_follows_the_official_convert_rgb(tmp_path):
    """The official loaders call PIL's convert('RGB'), which discards alpha: a transparent
    band read by OpenSlide (0,0,0,0) is black, and any RGB under alpha 0 is kept as is."""
    from PIL import Image as PILImage
    rgba = np.random.default_rng(0).integers(0, 256, (256, 256, 4), dtype=np.uint8)
    rgba[:64, :, :] = 0  # OpenSlide's transparent pixels
    p = tmp_path / "a.png"
    PILImage.fromarray(rgba, "RGBA").save(p)
    official = np.asarray(PILImage.open(p).convert("RGB"))
    for source in (rgba, p):
        x = preprocess(source, spec("pathoduet-he"))[0]  # [0, 1] scaling, no normalisation
        assert np.array_equal(np.round(x.transpose(1, 2, 0) * 255).astype(np.uint8), official[16:240, 16:240])
    white = {**spec("pathoduet-he"), "alpha": "white"}
    rgba[..., 3] = 0
    assert np.allclose(preprocess(rgba, white), 1.0)
    with pytest.raises(InputError, match="alpha rule"):
        preprocess(rgba, {**white, "alpha": "blend"})


@pytest.mark.parametrize("bad,match", [
    (np.zeros((256, 256, 3), np.uint16), "uint16"),
    (np.zeros((3, 256, 256), np.uint8), "channels-first"),
    (np.zeros((100, 100, 3), np.uint8), "100x100 px"),
    (np.full((256, 256, 3), 2.0, np.float32), r"\[0, 1\]"),
    (np.full((256, 256, 3), np.nan, np.float32), "NaN"),
    (np.zeros((256, 256, 5), np.uint8), "shape"),
])
def test_bad_arrays_are_refused_clearly(bad, match):
    with pytest.raises(InputError, match=match):
        preprocess(bad, spec("brow"))


def test_16bit_and_broken_files_are_refused(tmp_path):
    p16 = tmp_path / "deep.png"
    Image.fromarray(np.zeros((256, 256), np.uint16)).save(p16)
    with pytest.raises(InputError, match="16-bit"):
        preprocess(p16, spec("deblurring-mae"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(InputError, match="cannot be decoded|not a readable image"):
        preprocess(broken, spec("brow"))
    with pytest.raises(InputError, match="not found"):
        preprocess(tmp_path / "missing.png", spec("brow"))
