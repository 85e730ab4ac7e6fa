"""BROW: DINO ViT-B/16 pathology encoder (openmedlab/BROW). Output: CLS token after
the final norm, 768-d."""
from .checkpoint import drop, strip_prefix, unwrap
from ..spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, embedding_output, image_input
from .vit import VIT_SIZES, VisionTransformer


def build(variant: str):
    return VisionTransformer(**VIT_SIZES[variant], pool="cls")


def remap(raw):
    # The release is a bare state_dict; DINO training dicts (teacher/student) and
    # DataParallel prefixes are accepted too. The DINO projection head is not deployed.
    sd = strip_prefix(unwrap(raw), "module.", "backbone.")
    return drop(sd, r"head\."), {}


SPECS = [ModelSpec(
    id="brow", title="BROW pathology WSI encoder (DINO ViT-B/16)", kind="image",
    inputs=(image_input(),), outputs=(embedding_output(),), primary_output="embedding",
    variants=("B", "tiny"), default_variant="B",
    preprocess={"color": "RGB", "grayscale": "refuse", "alpha": "drop", "center_crop": 224,
                "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                "expected_size": [256, 256], "note": "256 px tile read at WSI level 0"},
    licence="none stated by the authors", source="https://github.com/openmedlab/BROW",
    build=build, remap=remap,
    official={"repo": "openmedlab/BROW", "entry": "Slide-level multi-class subtyping task/feature_extract/"
              "extract_features.py (extract_features); datasets.py (build_transform, SubDataset)",
              "transform": "OpenSlide read_region(level 0, 256x256).convert('RGB') (alpha dropped) -> "
                           "CenterCrop(224), no resize -> ToTensor -> Normalize(ImageNet)",
              "output": "genmodel.py: DINO vit_base/16, CLS token after the final norm"})]
