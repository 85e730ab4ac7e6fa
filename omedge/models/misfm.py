"""MIS-FM (openmedlab/MIS-FM): FMUNet, a 3D U-Net pretrained on CT by Volume Fusion.

FMUNet is PyMIC's `FMUNetV3` renamed (MIS-FM net/fmunet.py), used with res_mode 0, i.e.
every convolution 3D. Blocks are pre-activation: InstanceNorm(affine) -> LeakyReLU
(0.01) -> Dropout -> conv, with `x = block(x) + x` for each of `depth` convs.
- `project`: 3x3x3 conv from the input channels to 32.
- encoder: en_conv{0..4} residual stacks; down{0..3} = IN -> LReLU -> 3x3x3 conv stride 2.
- decoder: de_conv4 on the bottleneck, then upcat{3..0}: the low-resolution map goes
  IN -> LReLU -> 1x1 conv -> trilinear x2 (align_corners=True), is concatenated AFTER the
  skip ([skip, upsampled]), then IN -> LReLU -> 3x3x3 conv; then de_conv{3..0}.
- out_layers.{0..3}: IN -> LReLU -> 3x3x3 conv heads; training may use all four
  (multiscale_pred), inference uses out_layers.0 (full resolution) only.
Four stride-2 downsamplings: D, H, W must be multiples of 16.

Checkpoints: PyMIC dicts {'iteration', 'model_state_dict', 'optimizer_state_dict',
'valid_pred'?}. The pretraining file (fmunet_abk1k_volf.pt) has a 5-class Volume
Fusion head; the official fine-tuning loader keeps only keys whose name and shape
match. Deployed as is, the file's head shapes define num_classes.

PCT-Net (MIS-FM net/pct_net.py + net/transformer.py), the other release, lives in
omedge/models/pctnet.py ('mis-fm-pctnet').
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError, InputError
from ..spec import ModelSpec, TensorSpec
from .checkpoint import strip_prefix, unwrap

# variant -> (feature channels per level, convs per residual stack)
SIZES = {"base": ((32, 64, 128, 256, 512), 2), "tiny": ((4, 8, 8, 16, 16), 2)}
DIVISIBLE_BY = 16  # 2 ** number of stride-2 downsamplings
PRETEXT_CLASSES = 5  # Volume Fusion pretraining head


def _norm_act(channels: int) -> list[nn.Module]:
    return [nn.InstanceNorm3d(channels, affine=True), nn.LeakyReLU()]


class ResConv(nn.Module):
    """`depth` pre-activation 3x3x3 convs, each with its own identity shortcut."""

    def __init__(self, channels: int, depth: int, dropout: float = 0.0):
        super().__init__()
        self.conv_list = nn.ModuleList(
            # Dropout (identity at inference) keeps the official Sequential index of the conv: 3.
            nn.Sequential(*_norm_act(channels), nn.Dropout(dropout), nn.Conv3d(channels, channels, 3, padding=1))
            for _ in range(depth))

    def forward(self, x):
        for conv in self.conv_list:
            x = conv(x) + x
        return x


class DownSample(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.down = nn.Sequential(*_norm_act(in_ch), nn.Conv3d(in_ch, out_ch, 3, padding=1, stride=2))

    def forward(self, x):
        return self.down(x)


class UpCatConv(nn.Module):
    """low -> IN, LReLU, 1x1 conv, trilinear x2; cat [high, up(low)]; IN, LReLU, 3x3x3 conv."""

    def __init__(self, low_ch: int, high_ch: int, out_ch: int):
        super().__init__()
        self.up = nn.Sequential(*_norm_act(low_ch), nn.Conv3d(low_ch, high_ch, 1),
                                nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True))
        self.conv = nn.Sequential(*_norm_act(2 * high_ch), nn.Conv3d(2 * high_ch, out_ch, 3, padding=1))

    def forward(self, low, high):
        return self.conv(torch.cat([high, self.up(low)], dim=1))


class Encoder(nn.Module):
    def __init__(self, ch, depth: int, dropout: float):
        super().__init__()
        for i in range(5):  # no dropout at the two finest levels, as in the original
            setattr(self, f"en_conv{i}", ResConv(ch[i], depth, dropout if i >= 2 else 0.0))
        for i in range(4):
            setattr(self, f"down{i}", DownSample(ch[i], ch[i + 1]))

    def forward(self, x):
        features = [self.en_conv0(x)]
        for i in range(4):
            features.append(getattr(self, f"en_conv{i + 1}")(getattr(self, f"down{i}")(features[-1])))
        return features


class Decoder(nn.Module):
    def __init__(self, ch, depth: int, dropout: float):
        super().__init__()
        for i in range(4):
            setattr(self, f"upcat{i}", UpCatConv(ch[i + 1], ch[i], ch[i]))
        for i in range(5):
            setattr(self, f"de_conv{i}", ResConv(ch[i], depth, dropout if i >= 2 else 0.0))

    def forward(self, features):
        x = self.de_conv4(features[4])
        for i in (3, 2, 1, 0):
            x = getattr(self, f"de_conv{i}")(getattr(self, f"upcat{i}")(x, features[i]))
        return x


class FMUNet(nn.Module):
    """FMUNet for inference: returns the full-resolution head's logits. The three
    coarser heads stay as modules so that released files load strictly."""

    def __init__(self, channels=SIZES["base"][0], depth: int = 2, num_classes: int = PRETEXT_CLASSES,
                 in_channels: int = 1, dropout: float = 0.2):
        super().__init__()
        self.project = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        self.encoder = Encoder(channels, depth, dropout)
        self.decoder = Decoder(channels, depth, dropout)
        self.out_layers = nn.ModuleList(
            nn.Sequential(*_norm_act(channels[i]), nn.Conv3d(channels[i], num_classes, 3, padding=1))
            for i in range(4))

    def forward(self, volume):
        if not torch.jit.is_tracing() and any(int(s) % DIVISIBLE_BY for s in volume.shape[2:]):
            raise InputError(f"FMUNet needs D, H, W divisible by {DIVISIBLE_BY}, got {tuple(volume.shape[2:])}",
                             "pad the volume (the sliding window patch 64x128x128 already is)")
        return {"logits": self.out_layers[0](self.decoder(self.encoder(self.project(volume))))}


def build(variant: str, num_classes: int = PRETEXT_CLASSES, in_channels: int = 1):
    channels, depth = SIZES[variant]
    return FMUNet(channels, depth, num_classes=num_classes, in_channels=in_channels)


def remap(raw):
    sd = strip_prefix(unwrap(raw), "module.")
    head, stem = "out_layers.0.2.weight", "project.weight"
    if head not in sd or stem not in sd or not any(k.startswith("encoder.en_conv0.") for k in sd):
        raise CheckpointError(f"checkpoint has no {stem} / encoder.en_conv0 / {head}: not an FMUNet "
                              "(MIS-FM / PyMIC) checkpoint")
    return sd, {"num_classes": int(sd[head].shape[0]), "in_channels": int(sd[stem].shape[1])}


OFFICIAL = {"repo": "openmedlab/MIS-FM", "entry": "net_run.py test demo/{fmunet,pctnet}_pretrain.cfg (PyMIC 0.5.0)",
            "transform": "SimpleITK NIfTI at its own spacing (no resampling) -> NormalizeWithMeanStd on channel 0: "
                         "(x - mean) / (std + 1e-5) over the volume -> sliding window [64, 128, 128], "
                         "stride [32, 64, 64]"}

SPECS = [ModelSpec(
    id="mis-fm", title="MIS-FM FMUNet 3D CT segmentation foundation model (Volume Fusion pretrained)",
    kind="volume",
    inputs=(TensorSpec("volume", "NCDHW", shape=(None, 1, None, None, None),
                       dynamic={0: "batch", 2: "depth", 3: "height", 4: "width"},
                       multiple_of={2: 16, 3: 16, 4: 16}),),
    outputs=(TensorSpec("logits", "NCDHW", shape=(None, None, None, None, None),
                        dynamic={0: "batch", 2: "depth", 3: "height", 4: "width"}),), primary_output="logits", variants=("base", "tiny"), default_variant="base",
    preprocess={"modality": "CT", "axis_order": "zyx", "normalization": "zscore_per_image",
                "zscore_eps": 1e-5, "patch_size": [64, 128, 128], "step": [0.5, 0.5, 0.5],
                "gaussian_sigma_scale": 0.125, "divisible_by": [16, 16, 16]},
    licence="Apache-2.0", source="https://github.com/openmedlab/MIS-FM",
    build=build, remap=remap, official=OFFICIAL,
    notes="Input (N, 1, D, H, W), SimpleITK (z, y, x) order at the image's own spacing, z-scored over the "
          "whole image ((x - mean) / (std + 1e-5)). D, H, W must be multiples of 16. The pretraining file "
          "predicts the 5 Volume Fusion classes; fine-tune it (PyMIC) for a real task and pass --labels.")]
