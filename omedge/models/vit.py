"""Vision Transformer layers with timm's parameter names.

The official BROW / PathoDuet / DeblurringMIM checkpoints were saved from timm-style
modules, so matching the key names lets them load with a strict `load_state_dict`
and no renaming. timm itself is not used: it imports torchvision, which does not
install beside the CPU torch build, and the custom variants (PathoDuet's pretext
token, fixed sin-cos position tables) need small changes anyway.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        # Written out (not SDPA) so exported graphs keep plain MatMul/Softmax nodes that
        # every backend and quantizer understands.
        attn = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def sincos_pos_embed(dim: int, grid: int, zero_rows: int = 1, rows_first: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos table with `zero_rows` leading zero rows for the prefix tokens.

    Half the channels encode the patch column, half its row, each half [sin | cos]
    over geometric frequencies. MAE puts the column half first; MoCo v3 (PathoDuet)
    the row half (`rows_first`). Checkpoints store the table, so this only matters
    for randomly initialised models."""
    assert dim % 4 == 0, "sin-cos position table needs dim divisible by 4"
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    hh, ww = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def encode(pos):
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    halves = [encode(hh), encode(ww)] if rows_first else [encode(ww), encode(hh)]
    table = np.concatenate(halves, axis=1)
    table = np.concatenate([np.zeros((zero_rows, dim)), table], axis=0)
    return torch.from_numpy(table).float().unsqueeze(0)


class VisionTransformer(nn.Module):
    """ViT encoder covering the variants we deploy.

    prefix: names of the learned tokens put before the patches, in order
        (["cls_token"], or PathoDuet's ["pretext_token", "cls_token"]).
    pool: "cls" -> norm(x)[:, 0]; "avg" -> fc_norm(mean of patch tokens), timm's
        global_pool="avg" (then `norm` does not exist, as in the official files);
        "avg_norm" -> mean of norm(x) patch tokens (MAE pretraining encoders).
    fixed_pos: None for a learned table, or "mae" / "mocov3" for a frozen sin-cos
        table of that convention (still stored in the checkpoint as `pos_embed`).
    num_classes: a Linear `head` on the pooled feature; 0 means none.
    """

    def __init__(self, img_size=224, patch=16, dim=768, depth=12, heads=12, mlp_ratio=4.0,
                 eps=1e-6, prefix=("cls_token",), pool="cls", fixed_pos=None, num_classes=0):
        super().__init__()
        self.prefix = tuple(prefix)
        self.pool = pool
        grid = img_size // patch
        self.patch_embed = PatchEmbed(patch, 3, dim)
        for name in self.prefix:
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, dim)))
        n_pos = grid * grid + len(self.prefix)
        if fixed_pos:
            table = sincos_pos_embed(dim, grid, len(self.prefix), rows_first=fixed_pos == "mocov3")
            self.pos_embed = nn.Parameter(table, requires_grad=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, eps) for _ in range(depth)])
        if pool == "avg":
            self.fc_norm = nn.LayerNorm(dim, eps=eps)
        else:
            self.norm = nn.LayerNorm(dim, eps=eps)
        self.head = nn.Linear(dim, num_classes) if num_classes else None
        for name in self.prefix:
            nn.init.trunc_normal_(getattr(self, name), std=0.02)
        self.apply(_init_weights)

    def features(self, x):
        x = self.patch_embed(x)
        tokens = [getattr(self, name).expand(x.shape[0], -1, -1) for name in self.prefix]
        x = torch.cat(tokens + [x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        n = len(self.prefix)
        if self.pool == "cls":
            return self.norm(x)[:, self.prefix.index("cls_token")]
        if self.pool == "avg":
            return self.fc_norm(x[:, n:].mean(dim=1))
        return self.norm(x)[:, n:].mean(dim=1)

    def forward(self, x):
        feats = self.features(x)
        if self.head is None:
            return {"embedding": feats}
        return {"embedding": feats, "logits": self.head(feats)}


def _init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


VIT_SIZES = {
    "B": dict(dim=768, depth=12, heads=12),
    "tiny": dict(dim=64, depth=2, heads=2),
}
