"""STU-Net (uni-medical/STU-Net): nnU-Net v1-based residual U-Net for CT, pretrained
on TotalSegmentator (background + 104 structures). Sizes S/B/L/H differ only in
width (base * [1, 2, 4, 8, 16, 16]) and residual blocks per stage.

Layout of the released network (nnunet/network_architecture/STUNet.py):
- 6 encoder stages; the first block of every stage (stage 0 included, at stride 1)
  has a 1x1 projection `conv3` (no norm) on the residual path, the others add x as is.
- block: conv3x3x3 -> InstanceNorm(affine) -> LeakyReLU -> conv3x3x3 -> InstanceNorm,
  + residual, then LeakyReLU (slope 0.01) after the add.
- 5 decoder steps: nearest upsampling by the stage stride, 1x1 conv, concatenation
  [upsampled, skip], then a stage of blocks. `seg_outputs.{u}` are 1x1 convs; training
  uses all five (deep supervision), deployment only the full-resolution `seg_outputs.4`.

Axis order: nnU-Net reads NIfTI through SimpleITK, so arrays are (z, y, x); the
TotalSegmentator plans have transpose_forward [0, 1, 2] and pool strides
[[2,2,2]]*4 + [[1,1,2]] (num_pool_per_axis [4, 4, 5]): only x is halved a fifth time,
hence inputs divisible by (16, 16, 32) in (D, H, W) = (z, y, x).

Checkpoints: nnU-Net v1 `*.model` ({'state_dict', 'optimizer_state_dict',
'plot_stuff', ...}), nnU-Net v2 fine-tuning files ({'network_weights', ...}), or a
bare state_dict; `module.` (DataParallel) is stripped. The strides are not stored in
the weights (a v2 fine-tuning plan may choose others): pass `strides` to override.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import CheckpointError, InputError
from .checkpoint import strip_prefix, unwrap
from ..spec import ModelSpec, TensorSpec

TOTALSEG_STRIDES = ((2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 1, 2))
WIDTH_MULTIPLIERS = (1, 2, 4, 8, 16, 16)
# variant -> (base width, residual blocks per stage), from STUNetTrainer_{small,base,large,huge}
SIZES = {"S": (16, 1), "B": (32, 1), "L": (64, 2), "H": (96, 3), "tiny": (4, 2)}
LEAKY_SLOPE = 0.01  # nn.LeakyReLU default, as in the official blocks

# label_orders.json of uni-medical/STU-Net: TotalSegmentator v1 classes, alphabetical.
TOTALSEG_LABELS = [
    "background", "adrenal_gland_left", "adrenal_gland_right", "aorta", "autochthon_left", "autochthon_right",
    "brain", "clavicula_left", "clavicula_right", "colon", "duodenum", "esophagus", "face", "femur_left",
    "femur_right", "gallbladder", "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left",
    "gluteus_medius_right", "gluteus_minimus_left", "gluteus_minimus_right", "heart_atrium_left",
    "heart_atrium_right", "heart_myocardium", "heart_ventricle_left", "heart_ventricle_right", "hip_left",
    "hip_right", "humerus_left", "humerus_right", "iliac_artery_left", "iliac_artery_right", "iliac_vena_left",
    "iliac_vena_right", "iliopsoas_left", "iliopsoas_right", "inferior_vena_cava", "kidney_left", "kidney_right",
    "liver", "lung_lower_lobe_left", "lung_lower_lobe_right", "lung_middle_lobe_right", "lung_upper_lobe_left",
    "lung_upper_lobe_right", "pancreas", "portal_vein_and_splenic_vein", "pulmonary_artery",
    *[f"rib_left_{i}" for i in (1, 10, 11, 12, 2, 3, 4, 5, 6, 7, 8, 9)],
    *[f"rib_right_{i}" for i in (1, 10, 11, 12, 2, 3, 4, 5, 6, 7, 8, 9)],
    "sacrum", "scapula_left", "scapula_right", "small_bowel", "spleen", "stomach", "trachea", "urinary_bladder",
    *[f"vertebrae_C{i}" for i in range(1, 8)], *[f"vertebrae_L{i}" for i in range(1, 6)],
    *[f"vertebrae_T{i}" for i in (1, 10, 11, 12, 2, 3, 4, 5, 6, 7, 8, 9)],
]
assert len(TOTALSEG_LABELS) == 105


class BasicResBlock(nn.Module):
    """Post-activation residual block; `project` adds the 1x1 (strided) conv3 shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride=(1, 1, 1), project: bool = False):
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, stride=stride, padding=1)
        self.norm1 = nn.InstanceNorm3d(out_ch, affine=True)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1)
        self.norm2 = nn.InstanceNorm3d(out_ch, affine=True)
        self.conv3 = nn.Conv3d(in_ch, out_ch, 1, stride=stride) if project else None

    def forward(self, x):
        y = F.leaky_relu(self.norm1(self.conv1(x)), LEAKY_SLOPE)
        y = self.norm2(self.conv2(y))
        shortcut = self.conv3(x) if self.conv3 is not None else x
        return F.leaky_relu(y + shortcut, LEAKY_SLOPE)


class NearestUpsample(nn.Module):
    """Nearest-neighbour upsampling by a stage stride, then a 1x1 conv (no transposed conv)."""

    def __init__(self, in_ch: int, out_ch: int, scale):
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, 1)
        self.scale = tuple(float(s) for s in scale)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))


def _stage(in_ch: int, out_ch: int, blocks: int, stride=(1, 1, 1)) -> nn.Sequential:
    return nn.Sequential(BasicResBlock(in_ch, out_ch, stride, project=True),
                         *[BasicResBlock(out_ch, out_ch) for _ in range(blocks - 1)])


class STUNet(nn.Module):
    """STU-Net with deep supervision off: forward returns the full-resolution logits.
    The four coarser `seg_outputs` stay as modules so that released files load strictly."""

    def __init__(self, base: int, blocks: int, num_classes: int = 105, in_channels: int = 1,
                 strides=TOTALSEG_STRIDES):
        super().__init__()
        dims = [base * m for m in WIDTH_MULTIPLIERS]
        self.strides = tuple(tuple(int(s) for s in st) for st in strides)
        assert len(self.strides) == len(dims) - 1
        self.divisible_by = tuple(math.prod(axis) for axis in zip(*self.strides))
        self.conv_blocks_context = nn.ModuleList(
            [_stage(in_channels, dims[0], blocks)]
            + [_stage(dims[d - 1], dims[d], blocks, self.strides[d - 1]) for d in range(1, len(dims))])
        up_dims = dims[::-1]  # deepest first
        self.upsample_layers = nn.ModuleList(
            NearestUpsample(up_dims[u], up_dims[u + 1], self.strides[-1 - u]) for u in range(len(self.strides)))
        self.conv_blocks_localization = nn.ModuleList(
            _stage(2 * up_dims[u + 1], up_dims[u + 1], blocks) for u in range(len(self.strides)))
        self.seg_outputs = nn.ModuleList(nn.Conv3d(up_dims[u + 1], num_classes, 1) for u in range(len(self.strides)))

    def forward(self, volume):
        spatial = volume.shape[2:]
        if not torch.jit.is_tracing() and any(int(s) % d for s, d in zip(spatial, self.divisible_by)):
            raise InputError(f"STU-Net needs D, H, W divisible by {self.divisible_by}, got {tuple(spatial)}",
                             "pad the volume (the sliding window patch 128^3 already is)")
        skips = []
        x = volume
        for stage in self.conv_blocks_context[:-1]:
            x = stage(x)
            skips.append(x)
        x = self.conv_blocks_context[-1](x)
        for up, stage, skip in zip(self.upsample_layers, self.conv_blocks_localization, reversed(skips)):
            x = stage(torch.cat([up(x), skip], dim=1))
        return {"logits": self.seg_outputs[-1](x)}


def build(variant: str, num_classes: int = 105, in_channels: int = 1, strides=TOTALSEG_STRIDES):
    base, blocks = SIZES[variant]
    return STUNet(base, blocks, num_classes=num_classes, in_channels=in_channels, strides=strides)


def remap(raw):
    sd = strip_prefix(unwrap(raw), "module.")
    head, stem = "seg_outputs.4.weight", "conv_blocks_context.0.0.conv1.weight"
    if head not in sd or stem not in sd:
        raise CheckpointError(f"checkpoint has no {stem} / {head}: not an STU-Net checkpoint")
    return sd, {"num_classes": int(sd[head].shape[0]), "in_channels": int(sd[stem].shape[1])}


SPECS = [ModelSpec(
    id="stu-net", title="STU-Net CT segmentation (nnU-Net residual U-Net; TotalSegmentator 104 classes)",
    kind="volume",
    inputs=(TensorSpec("volume", "NCDHW", shape=(None, 1, None, None, None),
                       dynamic={0: "batch", 2: "depth", 3: "height", 4: "width"},
                       multiple_of={2: 16, 3: 16, 4: 32}),),
    outputs=(TensorSpec("logits", "NCDHW", shape=(None, None, None, None, None),
                        dynamic={0: "batch", 2: "depth", 3: "height", 4: "width"}),), primary_output="logits", variants=("S", "B", "L", "H", "tiny"), default_variant="B",
    preprocess={"modality": "CT", "axis_order": "zyx", "target_spacing": [1.5, 1.5, 1.5],
                "patch_size": [128, 128, 128], "normalization": "zscore_per_image", "zscore_eps": 1e-8,
                "divisible_by": [16, 16, 32], "step": 0.5, "gaussian_sigma_scale": 0.125,
                "mirror_axes": [0, 1, 2]},
    licence="Apache-2.0", source="https://github.com/uni-medical/STU-Net",
    build=build, remap=remap,
    official={"repo": "uni-medical/STU-Net", "entry": "nnUNet_predict -t 101 -m 3d_fullres -tr STUNetTrainer_base "
              "(nnUNet-1.7.1 nnunet/inference/predict.py predict_from_folder; preprocessing/preprocessing.py "
              "GenericPreprocessor.resample_and_normalize L226-311)",
              "transform": "crop to non-zero -> resample to 1.5 mm (order 3) -> plans' 'nonCT' scheme: z-score "
                           "over the volume, (x - mean) / (std + 1e-8), no clipping -> sliding window 128^3, "
                           "step 0.5, Gaussian sigma patch/8, mirroring over (0, 1, 2) unless disabled",
              "labels": "label_orders.json (not the TotalSegmentator order)"},
    labels=TOTALSEG_LABELS,
    notes="Input (N, 1, D, H, W) in nnU-Net's (z, y, x) order at 1.5 mm, z-scored over the whole image "
          "(nnU-Net 'nonCT' scheme: no clipping). D, H, W must be multiples of 16, 16, 32. Labels are the "
          "105 TotalSegmentator classes of label_orders.json; a fine-tuned file (other class count, e.g. the "
          "tiny test variant) needs its own --labels.")]
