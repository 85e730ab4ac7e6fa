"""Segment Anything layers with the parameter names of facebookresearch/segment-anything.

Written from the published architecture so that `sam_vit_b_01ec64.pth` and
`medsam_vit_b.pth` load strictly with no renaming. Two things differ from the research
code on purpose, both for export: the decomposed relative positions are a gather of
fixed indices + broadcast MatMul (static at the export size), and the prompt encoder takes
points and labels as tensors, a box being two points labelled 2 and 3 and padding a
point labelled -1 (as the official ONNX export does), so one decoder graph serves
boxes, points and both with a dynamic number of points.
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


class Attention(nn.Module):
    """Decoder attention with an optional downscaled internal width."""

    def __init__(self, dim: int, heads: int, downsample: int = 1):
        super().__init__()
        inner = dim // downsample
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, q, k, v):
        """The official attention: the decoder's self-attention over its few tokens."""
        q, k, v = (layer(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for layer, x in ((self.q_proj, q), (self.k_proj, k), (self.v_proj, v)))
        out = ((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])).softmax(dim=-1) @ v
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def _head_mask(self, x):
        """(heads, inner): 1 where channel r belongs to head h."""
        inner = self.q_proj.out_features
        return torch.eye(self.heads, dtype=x.dtype).repeat_interleave(inner // self.heads, dim=1)

    def tokens_over_image(self, tokens, image_k, image_v, projected: bool = False):
        """forward(tokens, image_k, image_v) for a few tokens over the 4096 image tokens,
        without projecting the image tokens: per head, scores = (q_h Wk_h / sqrt d) image_k^T
        (q_h . bk_h is the same for every image token, so the softmax drops it) and
        out_h = (P_h image_v) Wv_h^T + bv_h (P's rows sum to 1). The k and v projections of
        4096 x 256 tokens (0.27 GMAC per prompt) become two (8 n) x 256 x 4096 products.
        projected: image_k / image_v are already through k_proj / v_proj (the cached first
        block); the same block-diagonal rows then spare splitting them into heads."""
        b, n, _ = tokens.shape
        q = self.q_proj(tokens)
        inner, mask = q.shape[-1], self._head_mask(tokens)
        rows = (q[:, None] * mask[None, :, None]).reshape(b, self.heads * n, inner)  # row (head, token)
        a = (rows if projected else rows @ self.k_proj.weight) / math.sqrt(inner // self.heads)
        # scores as (b, 4096, 8 n), normalised over the image tokens: OpenVINO would fuse
        # the (8 n, 4096) form into its attention kernel, 2x slower here than two matmuls
        p = (image_k @ a.transpose(1, 2)).softmax(dim=1).transpose(1, 2)
        y = p @ image_v if projected else (p @ image_v) @ self.v_proj.weight.t()
        out = (y.reshape(b, self.heads, n, inner) * mask[None, :, None]).sum(1)
        return self.out_proj(out if projected else out + self.v_proj.bias)

    def image_over_tokens(self, image, tokens_k, tokens_v, projected: bool = False):
        """forward(image, tokens_k, tokens_v) for the 4096 image tokens over a few tokens:
        the tokens' keys as a block-diagonal (inner, heads * n) matrix give every head's
        scores in one product (q Wq folded into it unless `projected`), and the out
        projection is applied to the few values first, so no 4096-token tensor is projected,
        split into heads or transposed."""
        b, n, _ = tokens_k.shape
        k, v = self.k_proj(tokens_k), self.v_proj(tokens_v)
        inner, mask = k.shape[-1], self._head_mask(tokens_k)
        kb = (k.transpose(1, 2)[:, :, None] * mask.t()[None, :, :, None]).reshape(b, inner, self.heads * n)
        kb = kb / math.sqrt(inner // self.heads)
        if projected:
            s = image @ kb
        else:
            s = image @ (self.q_proj.weight.t() @ kb) + (self.q_proj.bias @ kb)[:, None]
        p = s.unflatten(-1, (self.heads, n)).softmax(dim=-1).flatten(-2)
        vb = (v[:, None] * mask[None, :, None]).reshape(b, self.heads * n, inner)  # row (head, token)
        return p @ (vb @ self.out_proj.weight.t()) + self.out_proj.bias


class TwoWayBlock(nn.Module):
    def __init__(self, dim, heads, mlp_dim, downsample=2, skip_first_pe=False):
        super().__init__()
        self.skip_first_pe = skip_first_pe
        self.self_attn = Attention(dim, heads)
        self.cross_attn_token_to_image = Attention(dim, heads, downsample)
        self.cross_attn_image_to_token = Attention(dim, heads, downsample)
        self.mlp = MLPBlock(dim, mlp_dim, nn.ReLU)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.LayerNorm(dim) for _ in range(4))

    def image_side(self, keys, key_pe) -> dict:
        """The projections of the image tokens that no prompt changes in the first block:
        (keys + pe) -> k and keys -> v of token->image, (keys + pe) -> q of image->token."""
        k = keys + key_pe
        return {"image_k": self.cross_attn_token_to_image.k_proj(k),
                "image_v": self.cross_attn_token_to_image.v_proj(keys),
                "image_q": self.cross_attn_image_to_token.q_proj(k)}

    def forward(self, queries, keys, query_pe, key_pe, image_side: dict | None = None):
        """image_side: `image_side(keys, key_pe)` computed beforehand (first block only)."""
        if self.skip_first_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q = queries + query_pe
        if image_side is None:
            k = keys + key_pe  # the keys do not change before the image->token attention below
            queries = self.norm2(queries + self.cross_attn_token_to_image.tokens_over_image(q, k, keys))
        else:
            attn = self.cross_attn_token_to_image.tokens_over_image(q, image_side["image_k"], image_side["image_v"],
                                                                   True)
            queries = self.norm2(queries + attn)
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        if image_side is None:
            keys = self.norm4(keys + self.cross_attn_image_to_token.image_over_tokens(k, q, queries))
        else:
            attn = self.cross_attn_image_to_token.image_over_tokens(image_side["image_q"], q, queries, True)
            keys = self.norm4(keys + attn)
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth=2, dim=256, heads=8, mlp_dim=2048):
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(dim, heads, mlp_dim, 2, i == 0) for i in range(depth))
        self.final_attn_token_to_image = Attention(dim, heads, 2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image, image_pe, tokens, image_side: dict | None = None):
        keys, key_pe = image.flatten(2).permute(0, 2, 1), image_pe.flatten(2).permute(0, 2, 1)
        queries = tokens
        for i, layer in enumerate(self.layers):
            queries, keys = layer(queries, keys, tokens, key_pe, image_side if i == 0 else None)
        q, k = queries + tokens, keys + key_pe
        return self.norm_final_attn(queries + self.final_attn_token_to_image.tokens_over_image(q, k, keys)), keys


class MLP(nn.Module):
    def __init__(self, dim_in, hidden, dim_out, n_layers):
        super().__init__()
        sizes = [hidden] * (n_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip([dim_in] + sizes, sizes + [dim_out]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskDecoder(nn.Module):
    """Two-way transformer over [IoU token, 4 mask tokens, prompt tokens] and the image."""

    def __init__(self, dim=256, heads=8, mlp_dim=2048, depth=2, n_masks=4):
        super().__init__()
        self.n_masks = n_masks
        self.transformer = TwoWayTransformer(depth, dim, heads, mlp_dim)
        self.iou_token, self.mask_tokens = nn.Embedding(1, dim), nn.Embedding(n_masks, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, 2, stride=2), LayerNorm2d(dim // 4), nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, 2, stride=2), nn.GELU())
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(n_masks))
        self.iou_prediction_head = MLP(dim, dim, n_masks, 3)

    def image_side(self, image, image_pe, dense) -> dict:
        """The first block's prompt-independent projections of one image (batch 1): a third
        of the decoder's matmul work, done once per image instead of once per prompt."""
        keys, key_pe = (image + dense).flatten(2).permute(0, 2, 1), image_pe.flatten(2).permute(0, 2, 1)
        return self.transformer.layers[0].image_side(keys, key_pe)

    def forward(self, image, image_pe, sparse, dense, image_side: dict | None = None):
        """All 4 masks and scores; the run side picks 0 (single) or 1..3 (multimask)."""
        b = sparse.shape[0]
        if image_side is not None:
            image_side = {k: v.expand(b, -1, -1) for k, v in image_side.items()}
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight])[None].expand(b, -1, -1)
        tokens = torch.cat([out_tokens, sparse], dim=1)
        # image and positions stay batch 1 (broadcast against the prompts): their token
        # layout is computed once per run, and for the constant positions at export time
        src = image + dense
        _, c, h, w = src.shape
        hs, src = self.transformer(src, image_pe, tokens, image_side)
        hyper = self.hypernetworks(hs[:, 1:1 + self.n_masks])
        return self.masks_channels_last(src, hyper, h, w), self.iou_prediction_head(hs[:, 0])

    def hypernetworks(self, mask_tokens):
        """The 4 per-mask MLPs on (b, 4, dim) mask tokens as 3 batched matmuls (one per
        layer, the 4 weights stacked) instead of 12 one-row products: -> (b, 4, dim // 8)."""
        x = mask_tokens.transpose(0, 1)                           # (4, b, dim)
        mlps = self.output_hypernetworks_mlps
        for i in range(len(mlps[0].layers)):
            weight = torch.stack([m.layers[i].weight.t() for m in mlps])
            bias = torch.stack([m.layers[i].bias for m in mlps])[:, None]
            x = x @ weight + bias
            x = F.relu(x) if i < len(mlps[0].layers) - 1 else x
        return x.transpose(0, 1)

    def masks_channels_last(self, tokens, hyper, h: int, w: int):
        """output_upscaling + the hypernetwork product on (b, h*w, c) tokens, channels last:
        a 2x2 stride-2 transposed convolution is one matmul per pixel (its 4 outputs side by
        side), the channel LayerNorm a plain LayerNorm on the last axis; pixels are put in
        place once, on the 4-channel masks (ConvTranspose and NCHW transposes of the 256-
        channel map cost a third of the decoder on onnxruntime)."""
        up1, norm, act1, up2, act2 = self.output_upscaling
        b = tokens.shape[0]
        x = act1(F.layer_norm(_deconv2x2(up1, tokens), (up1.out_channels,), norm.weight, norm.bias, norm.eps))
        x = act2(_deconv2x2(up2, x))                               # (b, h*w*16, c2), pixel order i j di dj ei ej
        m = (x @ hyper.transpose(1, 2)).reshape(b, h, w, 2, 2, 2, 2, self.n_masks)
        return m.permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(b, self.n_masks, 4 * h, 4 * w)


def _deconv2x2(conv: nn.ConvTranspose2d, x):
    """ConvTranspose2d(kernel 2, stride 2) on (b, pixels, in) -> (b, pixels * 4, out): the
    weight (in, out, 2, 2) as (in, [di, dj, out])."""
    cin, cout = conv.in_channels, conv.out_channels
    weight = conv.weight.permute(0, 2, 3, 1).reshape(cin, 4 * cout)
    y = F.linear(x.reshape(-1, cin), weight.t(), conv.bias.repeat(4))
    return y.reshape(x.shape[0], -1, cout)
