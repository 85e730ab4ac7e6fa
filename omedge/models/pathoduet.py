"""PathoDuet (openmedlab/PathoDuet): MoCo v3 ViT-B/16 with an extra pretext token.

Tokens are [pretext, cls, patches] over a fixed sin-cos table whose two first rows
are zero; global_pool='avg', so the output is fc_norm(mean of patch tokens), 768-d.
"""
from .checkpoint import drop, strip_prefix, unwrap
from ..spec import ModelSpec, embedding_output, image_input
from .vit import VIT_SIZES, VisionTransformer


def build(variant: str):
    return VisionTransformer(**VIT_SIZES[variant], prefix=("pretext_token", "cls_token"),
                             pool="avg", fixed_pos="mocov3")


def remap(raw):
    sd = unwrap(raw)
    if any(k.startswith("module.base_encoder.") for k in sd):  # raw MoCo training file
        sd = {k: v for k, v in sd.items() if k.startswith("module.base_encoder.")}
    sd = strip_prefix(sd, "module.base_encoder.", "base_encoder.", "module.")
    # head.* is timm's default 1000-class head, never trained; bridge_token is an
    # IHC-stage training leftover.
    return drop(sd, r"head\.", r"bridge_token$"), {}


def _spec(stain: str, filename: str) -> ModelSpec:
    return ModelSpec(
        id=f"pathoduet-{stain.lower()}", title=f"PathoDuet {stain} pathology encoder (ViT-B/16, {filename})",
        kind="image", inputs=(image_input(),), outputs=(embedding_output(),), primary_output="embedding",
        variants=("B", "tiny"), default_variant="B",
        preprocess={"color": "RGB", "grayscale": "refuse", "alpha": "drop",
                    "resize": {"size": 256, "interpolation": "bilinear"}, "center_crop": 224,
                    "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
                    "note": "RGB scaled to [0,1], no mean/std normalisation (official)"},
        licence="CC-BY-NC-4.0", source="https://github.com/openmedlab/PathoDuet",
        build=build, remap=remap,
        official={"repo": "openmedlab/PathoDuet", "entry": "README feature-extraction pipeline",
                  "transform": "PIL .convert('RGB') -> Resize(256, bilinear) -> CenterCrop(224) -> ToTensor, "
                               "no normalisation (README: 'we do not use a normalize function')",
                  "why_not_main_lincls": "main_lincls.py cannot run as written: its validation transform "
                                         "(L290-294) uses `normalize`, which is commented out at L268-269 "
                                         "(NameError); the README pipeline above is the one reproduced"})


SPECS = [_spec("HE", "checkpoint_HE.pth"), _spec("IHC", "checkpoint_IHC.pth")]
