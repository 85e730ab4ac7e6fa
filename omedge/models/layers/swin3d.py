"""3-D Swin transformer parts (MIS-FM net/transformer.py layout, inference only):
pre-norm window attention with a relative position bias table, shifted windows on odd
blocks, zero padding to whole windows, then a 4x GELU MLP."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..vit import Mlp as SwinMlp  # fc1 -> GELU -> fc2, the official names

class WindowAttention3D(nn.Module):
    """Multi-head self-attention inside cubic windows of w^3 tokens, plain matmul/softmax."""

    def __init__(self, dim: int, window: int, num_heads: int):
        super().__init__()
        self.num_heads, self.tokens = num_heads, window ** 3
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 3, num_heads))
        # Official flattening of the (ds, dh, dw) offsets, each shifted to [0, 2w-2]: strides
        # (3w-1, 2w-1, 1), not the collision-free ((2w-1)^2, 2w-1, 1). Trained tables are
        # indexed this way and the files store this buffer, so it is reproduced as is.
        grid = torch.stack(torch.meshgrid(*[torch.arange(window)] * 3, indexing="ij")).flatten(1)
        rel = grid[:, :, None] - grid[:, None, :] + (window - 1)
        self.register_buffer("relative_position_index",
                             rel[0] * (3 * window - 1) + rel[1] * (2 * window - 1) + rel[2])
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, masks=None):
        n, c, heads = self.tokens, x.shape[-1], self.num_heads
        q, k, v = self.qkv(x).reshape(-1, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        attn = attn + bias.reshape(n, n, heads).permute(2, 0, 1).unsqueeze(0)
        if masks is not None:  # per-axis shift masks (windows along s / h / w, n, n), see SwinBlock3D
            ms, mh, mw = masks
            attn = attn.reshape(-1, ms.shape[0], mh.shape[0], mw.shape[0], heads, n, n)
            attn = attn + ms[:, None, None, None] + mh[None, :, None, None] + mw[None, None, :, None]
            attn = attn.reshape(-1, heads, n, n)
        x = attn.softmax(dim=-1).matmul(v).transpose(1, 2).reshape(-1, n, c)
        return self.proj(x)


class SwinBlock3D(nn.Module):
    def __init__(self, dim: int, resolution, num_heads: int, window: int, shift: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.dim, self.resolution = dim, tuple(int(r) for r in resolution)
        if min(self.resolution) <= window:  # one window covers the level's smallest side: no shift
            window, shift = min(self.resolution), 0
        self.window, self.shift = window, shift
        self.padded = tuple(-(-r // window) * window for r in self.resolution)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention3D(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwinMlp(dim, int(dim * mlp_ratio))
        # Shifted-window mask, fixed by the input size (so not in the official files). The
        # official mask is one dense (windows, n, n) table, -100 where two tokens of a window
        # come from different regions of the cyclic shift (the region differs along at least
        # one axis). Here it is kept per axis and the three are added: -100 per differing
        # axis instead of -100 once. After the softmax either is exp(-100) ~ 4e-44 of the
        # weight of the token itself (always unmasked), so the results agree to float32
        # precision, and the ONNX graph stores 3 x (windows per axis, n, n) values instead
        # of windows^3 x n x n (e.g. 3.5 MB instead of 40 MB per shifted block at 36^3).
        for axis, name in enumerate(("s", "h", "w")):
            self.register_buffer(f"mask_{name}", self._axis_mask(axis) if shift else None, persistent=False)

    def _axis_mask(self, axis: int):
        """(windows along `axis`, w^3, w^3): -100 where tokens i, j of a window lie in different
        bands [0, P - w), [P - w, P - shift), [P - shift, P) of the padded axis (length P)."""
        w, s, size = self.window, self.shift, self.padded[axis]
        coord = torch.arange(size)
        band = (coord >= size - w).long() + (coord >= size - s).long()
        cells = torch.stack(torch.meshgrid(*[torch.arange(w)] * 3, indexing="ij")).flatten(1)[axis]  # (n,)
        token_band = band.reshape(size // w, w)[:, cells]  # (windows along axis, n)
        differ = token_band[:, :, None] != token_band[:, None, :]
        return torch.where(differ, torch.full(differ.shape, -100.0), torch.zeros(differ.shape))

    def _windows(self, x):
        """(B, S, H, W, C) padded grid -> (B * windows, w^3, C), windows in (s, h, w) order."""
        w, (s, h, ww), c = self.window, self.padded, x.shape[-1]
        x = x.reshape(-1, s // w, w, h // w, w, ww // w, w, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
        return x.reshape(-1, w ** 3, c)

    def _unwindows(self, x):
        w, (s, h, ww), c = self.window, self.padded, self.dim
        x = x.reshape(-1, s // w, h // w, ww // w, w, w, w, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
        return x.reshape(-1, s, h, ww, c)

    def forward(self, x):
        (s, h, w), c = self.resolution, self.dim
        y = self.norm1(x).reshape(-1, s, h, w, c)
        pads = [p - r for p, r in zip(self.padded, self.resolution)]
        if any(pads):
            y = F.pad(y, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift,) * 3, dims=(1, 2, 3))
        masks = (self.mask_s, self.mask_h, self.mask_w) if self.shift else None
        y = self._unwindows(self.attn(self._windows(y), masks))
        if self.shift:
            y = torch.roll(y, shifts=(self.shift,) * 3, dims=(1, 2, 3))
        if any(pads):
            y = y[:, :s, :h, :w]
        x = x + y.reshape(-1, s * h * w, c)
        return x + self.mlp(self.norm2(x))


class SwinLayer3D(nn.Module):
    def __init__(self, dim: int, resolution, depth: int, num_heads: int, window: int):
        super().__init__()
        self.blocks = nn.ModuleList(SwinBlock3D(dim, resolution, num_heads, window, (i % 2) * (window // 2))
                                    for i in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x
