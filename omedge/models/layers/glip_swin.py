"""GLIP-T visual backbone (microsoft/GLIP maskrcnn_benchmark, "SWINT-FPN-RETINANET"), inference only.

Parameter and buffer names are the official ones below `module.backbone.`: `body.*` is the
Swin transformer (patch_embed, layers.N.blocks.M, layers.N.downsample, out norms norm1..norm3)
and `fpn.*` the RetinaNet FPN (fpn_inner2..4, fpn_layer2..4, top_blocks.p6/p7), so a GLIP
checkpoint loads strictly after its prefix is stripped.

Facts kept from the official code (swint.py, fpn.py, backbone/__init__.py, config/defaults.py):
- Swin v1, patch 4, patch_norm on, no absolute position embedding (SWINT.APE False), MLP ratio
  4, exact (erf) GELU, LayerNorm eps 1e-5, qkv with bias, q scaled by head_dim^-0.5.
- Every odd block of a stage is shifted by window // 2, even when the level is smaller than one
  window (unlike the classification Swin, nothing is clamped); the norm1 output is zero padded
  bottom/right to whole windows *before* the shift, and padded tokens are keys like any other:
  only the shift regions are masked, with -100.
- Stage 0's output (C2) is not normed (norm0 is Identity for *RETINANET) and the FPN ignores it;
  C3..C5 go through norm1..norm3, the FPN has no GN/ReLU (FPN.USE_GN/USE_RELU False), P6 is a
  stride-2 conv of P5 (in_channels == out_channels), P7 one of relu(P6).
The shift masks depend only on the feature sizes, i.e. on the input size: they are built in
forward from Python ints, so a fixed-size ONNX export stores them as constants."""
from __future__ import annotations

import torch
from torch import nn

from ..vit import Mlp  # fc1 -> GELU -> fc2, the official names
from torch.nn import functional as F

SWIN_SIZES = {
    "T": {"embed_dim": 96, "depths": (2, 2, 6, 2), "heads": (3, 6, 12, 24), "window": 7, "fpn_channels": 256},
    "tiny": {"embed_dim": 32, "depths": (2, 2, 2, 2), "heads": (1, 2, 4, 8), "window": 7, "fpn_channels": 32},
}
MASK_VALUE = -100.0  # the official fill for token pairs from different shift regions


def relative_position_index(window: int) -> torch.Tensor:
    """(w*w, w*w) int64 index into the (2w-1)^2 bias table: row offset * (2w-1) + column offset,
    each offset shifted to start at 0 (the buffer every GLIP checkpoint stores)."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def shift_mask(hp: int, wp: int, window: int, shift: int) -> torch.Tensor:
    """(windows, w*w, w*w) additive mask of a shifted stage padded to hp x wp: -100 between two
    tokens of a window that come from different regions of the cyclic shift. The regions are
    the bands [0, P-w), [P-w, P-s), [P-s, P) of each axis, in shifted coordinates."""
    def bands(size):
        coord = torch.arange(size)
        return (coord >= size - window).long() + (coord >= size - shift).long()

    region = bands(hp)[:, None] * 3 + bands(wp)[None, :]
    region = region.reshape(hp // window, window, wp // window, window).transpose(1, 2)
    region = region.reshape(-1, window * window)
    differ = region[:, None, :] != region[:, :, None]
    return torch.zeros(differ.shape).masked_fill(differ, MASK_VALUE)


def to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, Hp, Wp, C) -> (B * windows, w*w, C), windows in row-major order."""
    _, hp, wp, c = x.shape
    x = x.reshape(-1, hp // window, window, wp // window, window, c).transpose(2, 3)
    return x.reshape(-1, window * window, c)


def from_windows(x: torch.Tensor, window: int, hp: int, wp: int) -> torch.Tensor:
    """Inverse of to_windows."""
    c = x.shape[-1]
    x = x.reshape(-1, hp // window, wp // window, window, window, c).transpose(2, 3)
    return x.reshape(-1, hp, wp, c)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside w x w windows with the relative position bias;
    plain MatMul/Softmax so the ONNX graph has no fused attention op."""

    def __init__(self, dim: int, window: int, num_heads: int):
        super().__init__()
        self.num_heads, self.tokens = num_heads, window * window
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        """x: (B * windows, w*w, C); mask: (windows, w*w, w*w) or None."""
        n, c, heads = self.tokens, x.shape[-1], self.num_heads
        q, k, v = self.qkv(x).reshape(-1, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        attn = attn + bias.reshape(n, n, heads).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            attn = attn.reshape(-1, mask.shape[0], heads, n, n) + mask[None, :, None]
            attn = attn.reshape(-1, heads, n, n)
        x = attn.softmax(dim=-1).matmul(v).transpose(1, 2).reshape(-1, n, c)
        return self.proj(x)


class SwinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int, shift: int):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def attend(self, x, mask=None):
        """The (shifted) window attention branch of a (B, H, W, C) map, before the residual."""
        h, w, win, s = int(x.shape[1]), int(x.shape[2]), self.window, self.shift  # constants in a trace
        x = F.pad(self.norm1(x), (0, 0, 0, (-w) % win, 0, (-h) % win))
        hp, wp = x.shape[1], x.shape[2]
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        x = from_windows(self.attn(to_windows(x, win), mask if s else None), win, hp, wp)
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        return x[:, :h, :w]

    def forward(self, x, mask=None):
        x = x + self.attend(x, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> 4C channels (order (0,0), (1,0), (0,1), (1,1)), LayerNorm, 4C -> 2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x):
        x = F.pad(x, (0, 0, 0, int(x.shape[2]) % 2, 0, int(x.shape[1]) % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Official BasicLayer: blocks alternating plain / shifted windows, then an optional merge."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, downsample: bool):
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList(SwinBlock(dim, num_heads, window, window // 2 if i % 2 else 0)
                                    for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x):
        """(B, H, W, C) -> (stage output, input of the next stage)."""
        win = self.window
        hp, wp = -(-int(x.shape[1]) // win) * win, -(-int(x.shape[2]) // win) * win
        mask = shift_mask(hp, wp, win, win // 2).to(x.dtype).to(x.device)
        for block in self.blocks:
            x = block(x, mask)
        return x, (self.downsample(x) if self.downsample is not None else x)


class PatchEmbed(nn.Module):
    def __init__(self, embed_dim: int, patch: int = 4):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        """(B, 3, H, W), zero padded bottom/right to a multiple of the patch -> (B, H/4, W/4, C)."""
        p = self.patch
        x = F.pad(x, (0, -int(x.shape[3]) % p, 0, -int(x.shape[2]) % p))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinTransformer(nn.Module):
    """The body: returns [C2, C3, C4, C5] as (B, C, H, W); C2 is not normed (norm0 = Identity)."""

    def __init__(self, embed_dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window=7):
        super().__init__()
        self.patch_embed = PatchEmbed(embed_dim)
        self.layers = nn.ModuleList(
            SwinStage(embed_dim * 2 ** i, depth, heads[i], window, downsample=i < len(depths) - 1)
            for i, depth in enumerate(depths))
        self.norm0 = nn.Identity()
        for i in range(1, len(depths)):
            self.add_module(f"norm{i}", nn.LayerNorm(embed_dim * 2 ** i))
        self.num_features = [embed_dim * 2 ** i for i in range(len(depths))]

    def forward(self, x):
        x, outs = self.patch_embed(x), []
        for i, stage in enumerate(self.layers):
            out, x = stage(x)
            outs.append(getattr(self, f"norm{i}")(out).permute(0, 3, 1, 2))
        return outs


class LastLevelP6P7(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.p6 = nn.Conv2d(channels, channels, 3, 2, 1)
        self.p7 = nn.Conv2d(channels, channels, 3, 2, 1)

    def forward(self, p5):
        p6 = self.p6(p5)
        return [p6, self.p7(F.relu(p6))]


class FPN(nn.Module):
    """Top-down FPN over C3..C5 (lateral 1x1 + nearest upsampling to the lateral's size, then
    3x3 outputs), plus P6/P7 from P5."""

    def __init__(self, in_channels=(192, 384, 768), channels=256):
        super().__init__()
        self.levels = [2 + i for i in range(len(in_channels))]
        for level, cin in zip(self.levels, in_channels):
            self.add_module(f"fpn_inner{level}", nn.Conv2d(cin, channels, 1))
            self.add_module(f"fpn_layer{level}", nn.Conv2d(channels, channels, 3, 1, 1))
        self.top_blocks = LastLevelP6P7(channels)

    def forward(self, feats):
        """feats: [C3, C4, C5] -> [P3, P4, P5, P6, P7]."""
        last = getattr(self, f"fpn_inner{self.levels[-1]}")(feats[-1])
        results = [getattr(self, f"fpn_layer{self.levels[-1]}")(last)]
        for level, feat in zip(self.levels[-2::-1], feats[-2::-1]):
            lateral = getattr(self, f"fpn_inner{level}")(feat)
            size = (int(lateral.shape[-2]), int(lateral.shape[-1]))
            last = lateral + F.interpolate(last, size=size, mode="nearest")
            results.insert(0, getattr(self, f"fpn_layer{level}")(last))
        return results + self.top_blocks(results[-1])


class GlipSwinFPN(nn.Module):
    """GLIP's `backbone` (body + fpn): pixel_values (B, 3, H, W) -> [P3, P4, P5, P6, P7], level s
    of size ceil(H / s) x ceil(W / s) for s = 8, 16, 32, 64, 128, `fpn_channels` channels."""

    def __init__(self, embed_dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window=7, fpn_channels=256):
        super().__init__()
        self.body = SwinTransformer(embed_dim, tuple(depths), tuple(heads), window)
        self.fpn = FPN(tuple(self.body.num_features[1:]), fpn_channels)

    def forward(self, pixel_values):
        return self.fpn(self.body(pixel_values)[1:])
