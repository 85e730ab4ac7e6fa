"""DeblurringMIM (openmedlab/DeblurringMIM): MAE ViT-B/16 thyroid-ultrasound encoder.

The pretraining file ({'model': encoder + decoder}) gives an embedding; a fine-tuned
file with `fc_norm` + `head` gives the 2-class nodule classifier as well.
"""
from ..errors import CheckpointError
from .checkpoint import drop, strip_prefix, unwrap
from ..spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, embedding_output, image_input, logits_output
from .vit import VIT_SIZES, VisionTransformer


def build(variant: str, num_classes: int = 0):
    # Classifier: mean of patch tokens (no CLS) -> fc_norm -> head. Encoder only:
    # mean of normed patch tokens.
    return VisionTransformer(**VIT_SIZES[variant], pool="avg" if num_classes else "avg_norm",
                             fixed_pos="mae", num_classes=num_classes)


def head_options(sd: dict, what: str) -> dict:
    """A fine-tuned DeblurringMIM classifier has `fc_norm` + `head`; a pretraining file neither."""
    if "head.weight" in sd and "fc_norm.weight" in sd:
        return {"num_classes": int(sd["head.weight"].shape[0])}
    if "head.weight" in sd:
        raise CheckpointError(f"checkpoint has a classification head but no fc_norm: not a DeblurringMIM "
                              f"fine-tuned {what}")
    return {}


def remap(raw):
    sd = strip_prefix(unwrap(raw, ("model", "state_dict")), "module.")
    sd = drop(sd, r"decoder_", r"mask_token$")
    return sd, head_options(sd, "classifier")


OFFICIAL = {"repo": "openmedlab/DeblurringMIM",
            "entry": "blurred_images.py L46-49 (offline blur step) + main_finetune.py / util/datasets.py "
                     "build_transform (eval branch L60-74)",
            "transform": "cv2.imread(path, IMREAD_GRAYSCALE) -> cv2.GaussianBlur((0, 0), 1.1) -> single-channel "
                         "file -> ImageFolder PIL .convert('RGB') -> Resize(256, bicubic) -> CenterCrop(224) -> "
                         "ToTensor -> Normalize(ImageNet)",
            "exactness": "grey decode and 8-bit blur reproduced bit for bit (omedge.io.opencv_compat)"}

SPECS = [ModelSpec(
    id="deblurring-mae", title="DeblurringMIM MAE ViT-B/16 thyroid ultrasound encoder (+ nodule classifier)",
    kind="image",
    inputs=(image_input(),), outputs=(embedding_output(), logits_output()),
    primary_output="logits", variants=("B", "tiny"), default_variant="B",
    preprocess={"color": "RGB", "grayscale": "replicate", "alpha": "drop",
                "blur": {"sigma": 1.1, "on": "grayscale"},
                "resize": {"size": 256, "interpolation": "bicubic"}, "center_crop": 224,
                "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                "note": "official pipeline: 8-bit grayscale -> cv2.GaussianBlur(sigma 1.1) -> RGB "
                        "-> Resize 256 bicubic -> CenterCrop 224 -> ImageNet mean/std"},
    licence="CC-BY-NC-4.0", source="https://github.com/openmedlab/DeblurringMIM",
    build=build, remap=remap, labels=["class_0", "class_1"],
    official=OFFICIAL,
    notes="Class order follows the training folders (ImageFolder, alphabetical); the release "
          "does not name them, so pass --labels at export, e.g. --labels benign,malignant.")]
