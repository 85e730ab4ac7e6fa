"""Segment Anything layers with the parameter names of facebookresearch/segment-anything.

Written from the published architecture so that `sam_vit_b_01ec64.pth` and
`medsam_vit_b.pth` load strictly with no renaming. Two things differ from the research
code on purpose, both for export: the decomposed relative positions are a gather of
fixed indices + broadcast MatMul (static at the export size), and the prompt encoder takes
points and labels as tensors, a box being two points labelled 2 and 3 and padding a
point labelled -1 (as the official ONNX export does), so one decoder graph serves
boxes, points and both with a dynamic number of points. The mask decoder is in
sam_decoder.py.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW map (eps 1e-6, as SAM's neck uses)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels)), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * ((x - u) / torch.sqrt(s + self.eps)) + self.bias[:, None, None]


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, act=nn.GELU):
        super().__init__()
        self.lin1, self.lin2, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), act()

    def forward(self, x):
        return self.lin2(self.act(self.lin1(x)))


def _rel_index(q: int, k: int) -> torch.Tensor:
    """Index into a [2*max(q,k)-1, C] table: relative offset of each (query, key) pair."""
    qc = torch.arange(q)[:, None] * max(k / q, 1.0)
    kc = torch.arange(k)[None, :] * max(q / k, 1.0)
    return ((qc - kc) + (k - 1) * max(q / k, 1.0)).long()


class EncoderAttention(nn.Module):
    """Multi-head attention with decomposed relative positions over a fixed (H, W) grid,
    on (b, H*W, C) tokens. Export-shaped: q, k, v are three projections from row slices of
    the official fused `qkv` weight, every tensor stays at rank 4 or less and every reshape
    target is a constant apart from the batch. The official (b, N, 3, heads, dh) split and
    the 5-D (.., h, w, h, w) bias add kept OpenVINO from fusing the attention and left
    NNCF's quantize-converts on high-rank tensors."""

    def __init__(self, dim: int, heads: int, grid: tuple[int, int]):
        super().__init__()
        self.dim, self.heads, self.grid = dim, heads, tuple(grid)
        self.scale = (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.randn(2 * grid[0] - 1, dim // heads) * 0.02)
        self.rel_pos_w = nn.Parameter(torch.randn(2 * grid[1] - 1, dim // heads) * 0.02)

    def project(self, x, part: int):
        """q, k or v (part 0, 1, 2) as (b, heads, N, dh)."""
        d, h = self.dim, self.heads
        rows = slice(part * d, (part + 1) * d)
        n = self.grid[0] * self.grid[1]
        return F.linear(x, self.qkv.weight[rows], self.qkv.bias[rows]).reshape(-1, n, h, d // h).transpose(1, 2)

    def rel_bias(self, q):
        """The decomposed position term for (b, heads, N, dh) queries, (b, heads, N, N):
        query row y meets key row ky through rel_pos_h[y - ky], column x meets kx through
        rel_pos_w[x - kx]. Each is one broadcast MatMul against a (rows, dh, rows) constant
        table (the official einsums), summed as (N, h, 1) + (N, 1, w)."""
        (gh, gw), dh = self.grid, self.dim // self.heads
        n = gh * gw
        rh = self.rel_pos_h[_rel_index(gh, gh)].transpose(1, 2)  # (gh, dh, gh)
        rw = self.rel_pos_w[_rel_index(gw, gw)].transpose(1, 2)  # (gw, dh, gw)
        q4 = q.reshape(-1, gh, gw, dh)
        rel_h = (q4 @ rh).reshape(-1, n, gh, 1)
        rel_w = (q4.transpose(1, 2) @ rw).transpose(1, 2).reshape(-1, n, 1, gw)
        return (rel_h + rel_w).reshape(-1, self.heads, n, n)

    def attend(self, q, k, v):
        """(b, heads, N, dh) q, k, v -> (b, N, C) before `proj`."""
        attn = (q * self.scale) @ k.transpose(-2, -1) + self.rel_bias(q)
        out = attn.softmax(dim=-1) @ v
        return out.transpose(1, 2).reshape(-1, self.grid[0] * self.grid[1], self.dim)

    def forward(self, x):
        return self.proj(self.attend(*(self.project(x, i) for i in range(3))))


class EncoderBlock(nn.Module):
    """Pre-norm ViT block on a (b, H, W, C) map of the fixed `grid`; windowed (window > 0,
    zero-padded to a multiple) or global. The window partition is two rank-4 reshapes
    around one transpose (the official 6-D permute does not export at rank <= 4)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, window: int, grid: tuple[int, int]):
        super().__init__()
        self.window, self.grid, self.dim = window, tuple(grid), dim
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = EncoderAttention(dim, heads, (window, window) if window else grid)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))

    def padded(self) -> tuple[int, int]:
        ws = self.window
        return -(-self.grid[0] // ws) * ws, -(-self.grid[1] // ws) * ws

    def partition(self, x):
        """(b, H, W, C) -> (b * windows, ws * ws, C), windows in row-major order."""
        (h, w), (hp, wp), ws, c = self.grid, self.padded(), self.window, self.dim
        x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
        x = x.reshape(-1, ws, wp // ws, ws * c).transpose(1, 2)  # (b * rows of windows, nw, ws, ws * C)
        return x.reshape(-1, ws * ws, c)

    def unpartition(self, x):
        """The inverse of `partition`, padding cropped."""
        (h, w), (hp, wp), ws, c = self.grid, self.padded(), self.window, self.dim
        x = x.reshape(-1, wp // ws, ws, ws * c).transpose(1, 2).reshape(-1, hp, wp, c)
        return x[:, :h, :w] if (hp, wp) != (h, w) else x

    def windowed(self, y):
        """Windowed attention with q, k, v projected on the unpadded map and `proj` after the
        unpartition: 16% fewer tokens through both, and the projections' INT8 input comes
        straight from norm1 (through the Pad, OpenVINO ran them on float activations, 13% of
        the INT8 encoder). The bias is added after the zero padding, so padded tokens still
        get qkv(0) = bias as in the official code."""
        a, d = self.attn, self.dim
        n, dh = self.window * self.window, d // a.heads
        q, k, v = (self.partition(F.linear(y, a.qkv.weight[i * d:(i + 1) * d])) + a.qkv.bias[i * d:(i + 1) * d]
                   for i in range(3))
        q, k, v = (t.reshape(-1, n, a.heads, dh).transpose(1, 2) for t in (q, k, v))
        return a.proj(self.unpartition(a.attend(q, k, v)))

    def forward(self, x):
        h, w = self.grid
        y = self.norm1(x)
        if self.window:
            y = self.windowed(y)
        else:
            y = self.attn(y.reshape(-1, h * w, self.dim)).reshape(-1, h, w, self.dim)
        x = x + y
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nn.Module):
    def __init__(self, img_size=1024, patch=16, dim=768, depth=12, heads=12, mlp_ratio=4.0, out_chans=256,
                 window=14, global_blocks=(2, 5, 8, 11)):
        super().__init__()
        grid = (img_size // patch, img_size // patch)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.randn(1, *grid, dim) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, mlp_ratio, 0 if i in global_blocks else window, grid)
                                    for i in range(depth))
        self.neck = nn.Sequential(nn.Conv2d(dim, out_chans, 1, bias=False), LayerNorm2d(out_chans),
                                  nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False), LayerNorm2d(out_chans))

    def forward(self, x):
        x = self.patch_embed.proj(x).permute(0, 2, 3, 1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features; the Gaussian matrix is a persistent buffer of the file."""

    def __init__(self, num_feats: int):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_feats))

    def encode(self, coords):  # coords in [0, 1]
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def grid(self, h: int, w: int):
        y = (torch.arange(h, dtype=torch.float32) + 0.5) / h
        x = (torch.arange(w, dtype=torch.float32) + 0.5) / w
        xy = torch.stack([x[None, :].expand(h, w), y[:, None].expand(h, w)], dim=-1)
        return self.encode(xy).permute(2, 0, 1)


class PromptEncoder(nn.Module):
    """Sparse prompt embeddings for labelled points (0 negative, 1 positive, 2/3 box
    corners, -1 padding) and the dense 'no mask' embedding. mask_downscaling is loaded
    (strict) but mask prompts are not exported."""

    def __init__(self, dim=256, grid=64, img_size=1024, mask_in_chans=16):
        super().__init__()
        self.grid, self.img_size = grid, img_size
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, 2, stride=2), LayerNorm2d(mask_in_chans // 4), nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, 2, stride=2), LayerNorm2d(mask_in_chans), nn.GELU(),
            nn.Conv2d(mask_in_chans, dim, 1))
        self.no_mask_embed = nn.Embedding(1, dim)

    def embed_points(self, coords, labels):
        """coords (B, N, 2) in the padded 1024 frame (x, y); labels (B, N) float."""
        emb = self.pe_layer.encode((coords + 0.5) / self.img_size)
        lab = labels[..., None]
        emb = emb * (lab != -1) + self.not_a_point_embed.weight * (lab == -1)
        for i, table in enumerate(self.point_embeddings):
            emb = emb + table.weight * (lab == i)
        return emb

    def dense_pe(self):
        return self.pe_layer.grid(self.grid, self.grid)[None]
