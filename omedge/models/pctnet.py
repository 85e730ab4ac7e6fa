"""PCT-Net (MIS-FM net/pct_net.py, Swin parts in net/transformer.py), inference only.

Conv blocks are pre-activation BatchNorm3d -> PReLU -> conv, with no shortcut:
- ConvBlock `conv_conv`: BN, PReLU, conv, BN, PReLU, Dropout, conv (indices 0..6).
- DownSample: MaxPool3d then `conv` = BN, PReLU, 3x3x3 (or 1x3x3) conv.
- UpCatBlock: `up` = BN, PReLU, ConvTranspose3d (kernel = stride = 2 or 1x2x2) on the
  coarse map, `conv` = BN, PReLU, conv on cat([fine, up(coarse)]).
- ConvLayer (heads): BN, PReLU, 1x1x1 conv.
- PatchEmbedding: proj conv -> conv0 (full res) -> down1 -> conv1 (1/2) -> down2 (1/4).
  `embeddings` holds three of them, one per `resolution_mode` (0: all 3D; 1: the full
  resolution level uses 1x3x3 convs and 1x2x2 pooling; 2: both fine levels do); only
  the mode's own one runs, but all three are in every checkpoint. `pred_heads` likewise.
- pyramid_ct: three levels (feature_chns[2:]) of ConvTransBlock = ConvBlock(x) +
  Swin(x) (x flattened to tokens), down3/down4 and up4/up3 between them.
- Swin layer: `depth` blocks, odd ones shifted by window // 2; pre-norm window attention
  with a relative position bias table, then a 4x GELU MLP. Windows are cubes of 6 (or
  the level's smallest side when that is <= 6, then unshifted); the levels are padded
  with zeros to multiples of the window after norm1, and the shift mask (-100) ignores
  the padding, as in the official code (the mask is stored per axis: see SwinBlock3D).
- Deep-supervision heads out_conv1 (pred head), out_conv2/out_conv3 (pyramid) exist in
  the files; inference uses pred_heads[mode].out_conv0 (full resolution) only.
- The LayerNorm `norm_layer` of each ConvTransBlock is never applied by the official
  forward; it is kept so that files load strictly.
The Swin blocks are sized at construction from `input_size` (official: [64, 128, 128]),
so the network only accepts that spatial size; batch may vary.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError, InputError
from ..spec import ModelSpec, TensorSpec
from .checkpoint import strip_prefix, unwrap
from .layers.swin3d import SwinLayer3D
from .misfm import OFFICIAL, PRETEXT_CLASSES

PCT_INPUT_SIZE = (64, 128, 128)
# variant -> (feature_chns of the 5 levels, Swin depths and heads of the 3 coarse levels)
PCT_SIZES = {"base": ((24, 48, 128, 256, 512), (2, 2, 2), (4, 8, 16)),  # demo/pctnet_*.cfg
             "tiny": ((4, 8, 8, 16, 32), (2, 2, 2), (1, 2, 4))}
PCT_WINDOW = 6
PCT_MODE = 1  # resolution_mode of the official configs (demo/pctnet_pretrain.cfg)
# resolution_mode -> (conv dims of levels 0/1, pooling dims of down1/down2, total downscale to level 2)
PCT_MODES = {0: ((3, 3), (3, 3), (4, 4, 4)), 1: ((2, 3), (2, 3), (2, 4, 4)), 2: ((2, 2), (2, 2), (1, 4, 4))}


def _conv(in_ch: int, out_ch: int, dim: int) -> nn.Conv3d:
    """3x3x3 conv, or 1x3x3 (in-plane) when dim == 2."""
    return (nn.Conv3d(in_ch, out_ch, (1, 3, 3), padding=(0, 1, 1)) if dim == 2
            else nn.Conv3d(in_ch, out_ch, 3, padding=1))


def _bn_act(channels: int) -> list[nn.Module]:
    return [nn.BatchNorm3d(channels), nn.PReLU()]


class PctConvBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dim: int = 3, dropout: float = 0.0):
        super().__init__()
        self.conv_conv = nn.Sequential(*_bn_act(in_ch), _conv(in_ch, out_ch, dim),
                                       *_bn_act(out_ch), nn.Dropout(dropout), _conv(out_ch, out_ch, dim))

    def forward(self, x):
        return self.conv_conv(x)


class PctDown(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, down_dim: int = 3, conv_dim: int = 3):
        super().__init__()
        self.pool = nn.MaxPool3d((1, 2, 2) if down_dim == 2 else 2)
        self.conv = nn.Sequential(*_bn_act(in_ch), _conv(in_ch, out_ch, conv_dim))

    def forward(self, x):
        return self.conv(self.pool(x))


class PctUpCat(nn.Module):
    """cat([fine, ConvTranspose(coarse)]) -> BN, PReLU, conv to the fine channels."""

    def __init__(self, fine_ch: int, coarse_ch: int, up_dim: int = 3, conv_dim: int = 3):
        super().__init__()
        k = (1, 2, 2) if up_dim == 2 else (2, 2, 2)
        self.up = nn.Sequential(*_bn_act(coarse_ch), nn.ConvTranspose3d(coarse_ch, fine_ch, k, stride=k))
        self.conv = nn.Sequential(*_bn_act(2 * fine_ch), _conv(2 * fine_ch, fine_ch, conv_dim))

    def forward(self, fine, coarse):
        return self.conv(torch.cat([fine, self.up(coarse)], dim=1))


class PctOutConv(nn.Module):
    def __init__(self, in_ch: int, num_classes: int):
        super().__init__()
        self.conv = nn.Sequential(*_bn_act(in_ch), nn.Conv3d(in_ch, num_classes, 1))

    def forward(self, x):
        return self.conv(x)


class ConvTransBlock(nn.Module):
    """ConvBlock(x) + Swin(x), both on the same input, at a fixed resolution."""

    def __init__(self, chns: int, resolution, depth: int, num_heads: int, window: int, dropout: float = 0.0):
        super().__init__()
        self.resolution = tuple(int(r) for r in resolution)
        self.conv = PctConvBlock(chns, chns, 3, dropout)
        self.trans = SwinLayer3D(chns, resolution, depth, num_heads, window)
        self.norm_layer = nn.LayerNorm(chns)  # unused by the official forward; in the files

    def forward(self, x):
        c = x.shape[1]
        tokens = self.trans(x.flatten(2).transpose(1, 2))
        return self.conv(x) + tokens.reshape(-1, *self.resolution, c).permute(0, 4, 1, 2, 3)


class PctEmbedding(nn.Module):
    """Levels 0 and 1 (convs) and the downsampling to level 2 (official PatchEmbedding)."""

    def __init__(self, in_ch: int, ch, conv_dims, down_dims):
        super().__init__()
        self.proj = _conv(in_ch, ch[0], conv_dims[0])
        self.conv0 = PctConvBlock(ch[0], ch[0], conv_dims[0])
        self.conv1 = PctConvBlock(ch[1], ch[1], conv_dims[1])
        self.down1 = PctDown(ch[0], ch[1], down_dims[0], conv_dims[1])
        self.down2 = PctDown(ch[1], ch[2], down_dims[1], 3)

    def forward(self, x):
        x0 = self.conv0(self.proj(x))
        x1 = self.conv1(self.down1(x0))
        return x0, x1, self.down2(x1)


class PyramidConvTrans(nn.Module):
    """Levels 2-4: ConvTrans encoder e2 -> e3 -> e4, decoder d3 -> d2."""

    def __init__(self, ch, resolution, depths, heads, window: int, num_classes: int, dropout: float = 0.2):
        super().__init__()
        res = [tuple(resolution)]
        for _ in range(2):
            res.append(tuple(r // 2 for r in res[-1]))
        self.down3, self.down4 = PctDown(ch[0], ch[1]), PctDown(ch[1], ch[2])
        self.up3, self.up4 = PctUpCat(ch[0], ch[1]), PctUpCat(ch[1], ch[2])
        for name, lvl in (("e2", 0), ("d2", 0), ("e3", 1), ("d3", 1), ("e4", 2)):
            setattr(self, f"convtrans_{name}",
                    ConvTransBlock(ch[lvl], res[lvl], depths[lvl], heads[lvl], window, dropout))
        self.out_conv2, self.out_conv3 = PctOutConv(ch[0], num_classes), PctOutConv(ch[1], num_classes)

    def forward(self, x2):
        x2 = self.convtrans_e2(x2)
        x3 = self.convtrans_e3(self.down3(x2))
        x4 = self.convtrans_e4(self.down4(x3))
        d3 = self.convtrans_d3(self.up4(x3, x4))
        return self.convtrans_d2(self.up3(x2, d3))


class PctPredictionHead(nn.Module):
    def __init__(self, ch, conv_dims, down_dims, num_classes: int):
        super().__init__()
        self.up1 = PctUpCat(ch[0], ch[1], down_dims[0], conv_dims[0])
        self.up2 = PctUpCat(ch[1], ch[2], down_dims[1], conv_dims[1])
        self.conv0 = PctConvBlock(ch[0], ch[0], conv_dims[0])
        self.conv1 = PctConvBlock(ch[1], ch[1], conv_dims[1])
        self.out_conv0, self.out_conv1 = PctOutConv(ch[0], num_classes), PctOutConv(ch[1], num_classes)

    def forward(self, x0, x1, x2):
        d1 = self.conv1(self.up2(x1, x2))
        return self.out_conv0(self.conv0(self.up1(x0, d1)))


class PCTNet(nn.Module):
    """PCT-Net for inference: full-resolution logits of pred_heads[resolution_mode]."""

    def __init__(self, channels=PCT_SIZES["base"][0], depths=(2, 2, 2), num_heads=(4, 8, 16),
                 num_classes: int = PRETEXT_CLASSES, in_channels: int = 1, resolution_mode: int = PCT_MODE,
                 input_size=PCT_INPUT_SIZE, window: int = PCT_WINDOW):
        super().__init__()
        if resolution_mode not in PCT_MODES:
            raise ValueError(f"resolution_mode must be 0, 1 or 2, got {resolution_mode}")
        _, _, scale = PCT_MODES[resolution_mode]
        self.input_size, self.resolution_mode = tuple(int(s) for s in input_size), resolution_mode
        if any(s % (4 * k) for s, k in zip(self.input_size, scale)):
            raise ValueError(f"input_size {self.input_size} must be divisible by {[4 * k for k in scale]} "
                             f"for resolution_mode {resolution_mode}")
        self.embeddings = nn.ModuleList(PctEmbedding(in_channels, channels[:3], cd, dd)
                                        for cd, dd, _ in PCT_MODES.values())
        self.pyramid_ct = PyramidConvTrans(channels[2:], [s // k for s, k in zip(self.input_size, scale)],
                                           depths, num_heads, window, num_classes)
        self.pred_heads = nn.ModuleList(PctPredictionHead(channels[:3], cd, dd, num_classes)
                                        for cd, dd, _ in PCT_MODES.values())

    def forward(self, volume):
        if not torch.jit.is_tracing() and tuple(int(s) for s in volume.shape[2:]) != self.input_size:
            raise InputError(f"PCT-Net is built for D, H, W = {self.input_size}, got {tuple(volume.shape[2:])}",
                             "feed patches of exactly that size (the sliding window does)")
        x0, x1, x2 = self.embeddings[self.resolution_mode](volume)
        x2 = self.pyramid_ct(x2)
        return {"logits": self.pred_heads[self.resolution_mode](x0, x1, x2)}


def build_pctnet(variant: str, num_classes: int = PRETEXT_CLASSES, in_channels: int = 1,
                 resolution_mode: int = PCT_MODE, input_size=PCT_INPUT_SIZE):
    channels, depths, heads = PCT_SIZES[variant]
    return PCTNet(channels, depths, heads, num_classes=num_classes, in_channels=in_channels,
                  resolution_mode=resolution_mode, input_size=input_size)


def remap_pctnet(raw):
    sd = strip_prefix(unwrap(raw), "module.")
    stem, head = "embeddings.0.proj.weight", "pred_heads.0.out_conv0.conv.2.weight"
    table = "pyramid_ct.convtrans_e4.trans.blocks.0.attn.relative_position_bias_table"
    if stem not in sd or head not in sd or table not in sd:
        raise CheckpointError(f"checkpoint has no {stem} / {head} / {table}: not a PCT-Net "
                              "(MIS-FM) checkpoint")
    options = {"num_classes": int(sd[head].shape[0]), "in_channels": int(sd[stem].shape[1])}
    # Only resolution_mode 0 changes a shape at the default input size: its coarsest level
    # (4 x 8 x 8) gets 4^3 windows, hence a (2*4-1)^3-row table. Modes 1 and 2 look alike.
    if sd[table].shape[0] == 7 ** 3:
        options["resolution_mode"] = 0
    return sd, options


SPECS = [ModelSpec(
    id="mis-fm-pctnet", title="MIS-FM PCT-Net 3D CT segmentation foundation model (Volume Fusion pretrained)",
    kind="volume",
    inputs=(TensorSpec("volume", "NCDHW", shape=(None, 1, *PCT_INPUT_SIZE), dynamic={0: "batch"}),),
    outputs=(TensorSpec("logits", "NCDHW", shape=(None, None, *PCT_INPUT_SIZE), dynamic={0: "batch"}),),
    primary_output="logits", variants=("base", "tiny"), default_variant="base",
    preprocess={"modality": "CT", "axis_order": "zyx", "normalization": "zscore_per_image",
                "zscore_eps": 1e-5, "patch_size": list(PCT_INPUT_SIZE), "step": [0.5, 0.5, 0.5],
                "gaussian_sigma_scale": 0.125, "fixed_input_size": list(PCT_INPUT_SIZE)},
    licence="Apache-2.0", source="https://github.com/openmedlab/MIS-FM",
    build=build_pctnet, remap=remap_pctnet, official=dict(OFFICIAL),
    notes="Input (N, 1, 64, 128, 128) exactly: the Swin blocks are built for that size, so only the batch "
          "axis may be dynamic and the ONNX export must keep D, H, W static (sliding window patches of "
          "64x128x128, volumes smaller than a patch are padded). SimpleITK (z, y, x) order at the image's own "
          "spacing, z-scored over the whole image ((x - mean) / (std + 1e-5)). resolution_mode (which of the "
          "three embedding / prediction branches runs) is 1 as in the official configs; 0 is read from the "
          "file, 2 must be asked for (build option). The pretraining file predicts the Volume Fusion "
          "classes; fine-tune it (PyMIC) for a real task and pass --labels.")]
