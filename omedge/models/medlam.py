"""MedLAM: the 3-D anatomy localiser of MedLSAM (openmedlab/MedLSAM, networks/medlam.py).

A 3-D U-Net (conv3x3x3 - InstanceNorm3d without affine - ReLU, MaxPool down, trilinear
up) whose bottleneck feeds three linear layers that regress a 3-d "position" of the
patch; the decoder's feature maps at 1/4, 1/2 and full resolution are what the
multi-scale similarity refinement matches. The released `medlam.pth` is a flat
DataParallel state_dict (`module.` prefix, 44 tensors), run as .half() officially: we
load it strictly and upcast to fp32.

The module's forward(patch) returns named outputs, so exporters and the run side never
guess which tensor is which: `position` [N, 3] and `feature0/1/2` [N, C, d, h, w]. The
segmentation head (`classification`) is in the file and loaded, but MedLSAM never runs it.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from .checkpoint import (
    compare,
    describe_mismatch,
    read_checkpoint,
    strip_prefix,
    unwrap,
)

# base: the official base_chns; patch: the cube edge the fc head was sized for (fc1 reads the
# flattened 1/16-resolution bottleneck, so the patch is fixed by the weights). "tiny" is the
# same code at a size a CPU test runs in milliseconds.
VARIANTS = {"official": {"base": 24, "patch": 64}, "tiny": {"base": 4, "patch": 32}}
FEATURES = ("feature0", "feature1", "feature2")   # 1/4, 1/2, full resolution (official feature_scale_ls)
SAM_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


class _Conv(nn.Module):
    """Holds the conv as `.Conv`, the official `depthwise` wrapper's key name."""

    def __init__(self, cin, cout):
        super().__init__()
        self.Conv = nn.Conv3d(cin, cout, 3, padding=1)

    def forward(self, x):
        return self.Conv(x)


class _Block(nn.Module):
    """conv-IN-ReLU under `.model.conv1_1 / norm1_1 / relu1_1` (official SingleConv3D)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.model = nn.Sequential(OrderedDict([("conv1_1", _Conv(cin, cout)), ("norm1_1", nn.InstanceNorm3d(cout)),
                                                ("relu1_1", nn.ReLU())]))

    def forward(self, x):
        return self.model(x)


# (name, in, out) in units of base channels; the encoder doubles at conv2_2, conv3_2, conv4_2 and the
# decoder's first conv of each level reads the upsampled map concatenated with the skip.
_LAYERS = (("conv0_1", 0, 2), ("conv0_2", 2, 2), ("conv1_1", 2, 2), ("conv1_2", 2, 2), ("conv2_1", 2, 2),
           ("conv2_2", 2, 4), ("conv3_1", 4, 4), ("conv3_2", 4, 8), ("conv4_1", 8, 8), ("conv4_2", 8, 16),
           ("conv5_1", 24, 8), ("conv5_2", 8, 8), ("conv6_1", 12, 4), ("conv6_2", 4, 4), ("conv7_1", 6, 4),
           ("conv7_2", 4, 4), ("conv8_1", 6, 4), ("conv8_2", 4, 4))


class MedLAM(nn.Module):
    def __init__(self, base: int = 24, patch: int = 64, in_channels: int = 1, n_classes: int = 3):
        super().__init__()
        if patch % 16:
            raise CheckpointError(f"MedLAM patch {patch} is not a multiple of 16 (four 2x poolings)")
        self.patch = patch
        for name, cin, cout in _LAYERS:
            setattr(self, name, _Block(cin * base if cin else in_channels, cout * base))
        self.classification = nn.Sequential(nn.Conv3d(4 * base, n_classes, 1))
        self.fc1 = nn.Linear((patch // 16) ** 3 * 16 * base, 8 * base)
        self.fc2 = nn.Linear(8 * base, 4 * base)
        self.fc3 = nn.Linear(4 * base, 3)

    def forward(self, patch):
        pool = nn.functional.max_pool3d
        conv0 = self.conv0_2(self.conv0_1(patch))
        conv1 = self.conv1_2(self.conv1_1(pool(conv0, 2, 2)))
        conv2 = self.conv2_2(self.conv2_1(pool(conv1, 2, 2)))
        conv3 = self.conv3_2(self.conv3_1(pool(conv2, 2, 2)))
        bottom = self.conv4_2(self.conv4_1(pool(conv3, 2, 2)))
        position = self.fc3(self.fc2(self.fc1(bottom.flatten(1))))  # no activation between, as released
        out = self.conv5_2(self.conv5_1(torch.cat((_up(bottom), conv3), 1)))
        feature0 = self.conv6_2(self.conv6_1(torch.cat((_up(out), conv2), 1)))
        feature1 = self.conv7_2(self.conv7_1(torch.cat((_up(feature0), conv1), 1)))
        feature2 = self.conv8_2(self.conv8_1(torch.cat((_up(feature1), conv0), 1)))
        return {"position": position, "feature0": feature0, "feature1": feature1, "feature2": feature2}


def _up(x):
    # nn.Upsample(scale_factor=2, mode='trilinear'), align_corners False as in the release
    return nn.functional.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)


def build_medlam(variant: str = "official", **opts) -> MedLAM:
    if variant not in VARIANTS:
        raise CheckpointError(f"MedLAM has no variant '{variant}'", f"variants: {', '.join(VARIANTS)}")
    return MedLAM(**{**VARIANTS[variant], **opts})


def remap_medlam(raw) -> tuple[dict, dict]:
    """The official flat `module.`-prefixed state_dict -> ours (same names), fp16 upcast.
    Returns (state_dict, {"base", "patch"}) read from the shapes; refuses anything else by
    name: a SAM/MedSAM file is the likely mix-up, since MedLSAM ships both."""
    sd = strip_prefix(unwrap(raw), "module.")
    if any(k.startswith(SAM_PREFIXES) for k in sd):
        what = "image encoder" if any(k.startswith("image_encoder.") for k in sd) else "prompt encoder / mask decoder"
        raise CheckpointError(f"this file looks like a SAM/MedSAM {what} checkpoint ({len(sd)} tensors, e.g. "
                              f"{next(iter(sd))}), not MedLAM",
                              "give MedLAM's medlam.pth as the localiser weights and the SAM/MedSAM file as --sam")
    stem, fc1 = sd.get("conv0_1.model.conv1_1.Conv.weight"), sd.get("fc1.weight")
    if stem is None or fc1 is None or stem.ndim != 5 or fc1.ndim != 2:
        raise CheckpointError(f"not a MedLAM checkpoint: no conv0_1.model.conv1_1.Conv.weight / fc1.weight "
                              f"({len(sd)} tensors, e.g. {', '.join(list(sd)[:3])}){_looks_like(raw)}",
                              "MedLAM's weights are MedLSAM's checkpoint/medlam.pth")
    base = int(stem.shape[0]) // 2
    cells = int(fc1.shape[1]) // (16 * base)
    edge = round(cells ** (1 / 3))
    opts = {"base": base, "patch": 16 * edge, "in_channels": int(stem.shape[1])}
    if edge ** 3 != cells:
        raise CheckpointError(f"MedLAM fc1 reads {fc1.shape[1]} values: not a cubic patch for base {base}")
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    with torch.device("meta"):
        want = MedLAM(**opts).state_dict()
    problems = compare(want, sd)
    if any(problems):
        raise CheckpointError(f"MedLAM checkpoint does not match the architecture: {describe_mismatch(*problems)}",
                              "this is not the released medlam.pth (44 tensors); re-download it")
    return sd, opts


def _looks_like(raw) -> str:
    """'. It looks like ...' when another omedge family loads this file exactly."""
    try:
        from . import identify
        hits = identify(raw)
    except Exception:  # noqa: BLE001 - naming the file is a courtesy; the refusal stands either way
        return ""
    return f". It looks like a '{hits[0][0]}' checkpoint (variant {hits[0][1]})" if hits else ""


def load_medlam(path: str | Path, trust: bool = False) -> tuple[MedLAM, str]:
    """Strictly load medlam.pth through the safe reader; returns (eval module, variant)."""
    sd, opts = remap_medlam(read_checkpoint(path, trust=trust))
    variant = next((v for v, o in VARIANTS.items() if o["base"] == opts["base"] and o["patch"] == opts["patch"]),
                   "custom")
    model = MedLAM(**opts)
    model.load_state_dict(sd, strict=True)
    return model.eval(), variant
