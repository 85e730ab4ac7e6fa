"""SAM's mask decoder (two-way transformer, output upscaling, hypernetworks) with the
parameter names of facebookresearch/segment-anything, written for export: the cross
attentions never project or split the 4096 image tokens into heads (their projections
are folded onto the few prompt tokens), and the upscaling runs channels last."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .sam import LayerNorm2d, MLPBlock


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
        kb = (kb / math.sqrt(inner // self.heads)).transpose(1, 2)             # (b, heads * n, inner)
        # scores as (b, heads * n, 4096), each head's n normalised along axis 2: a softmax
        # over groups of n on the last axis ran 4x slower on OpenVINO (0.9 vs 0.2 ms)
        if projected:
            s = kb @ image.transpose(1, 2)
        else:
            s = (kb @ self.q_proj.weight) @ image.transpose(1, 2) + (kb @ self.q_proj.bias)[..., None]
        p = s.unflatten(1, (self.heads, n)).softmax(dim=2).flatten(1, 2)
        vb = (v[:, None] * mask[None, :, None]).reshape(b, self.heads * n, inner)  # row (head, token)
        return p.transpose(1, 2) @ (vb @ self.out_proj.weight.t()) + self.out_proj.bias


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

    def forward(self, keys, key_pe, tokens, image_side: dict | None = None):
        """keys, key_pe: the image and its positions as (1, h*w, dim) tokens."""
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
        """What no prompt changes, once per image (batch 1) instead of once per prompt: the
        image (+ the no-mask embedding) as (1, h*w, dim) tokens, the decoder's layout (its
        NCHW -> token transpose cost a tenth of a prompt), and the first block's projections
        of them (a third of the decoder's matmul work)."""
        keys, key_pe = tokens_of(image + dense), tokens_of(image_pe)
        return {"image_tokens": keys, **self.transformer.layers[0].image_side(keys, key_pe)}

    def forward(self, keys, key_pe, sparse, h: int, w: int, image_side: dict | None = None):
        """All 4 masks and scores; the run side picks 0 (single) or 1..3 (multimask).
        keys, key_pe: the image (+ dense embedding) and its positions as (1, h*w, dim)
        tokens; they stay batch 1, broadcast against the prompts."""
        b = sparse.shape[0]
        if image_side is not None:
            image_side = {k: v.expand(b, -1, -1) for k, v in image_side.items()}
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight])[None].expand(b, -1, -1)
        tokens = torch.cat([out_tokens, sparse], dim=1)
        hs, src = self.transformer(keys, key_pe, tokens, image_side)
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


def tokens_of(image):
    """(b, c, h, w) -> (b, h*w, c)."""
    return image.flatten(2).transpose(1, 2)


def _deconv2x2(conv: nn.ConvTranspose2d, x):
    """ConvTranspose2d(kernel 2, stride 2) on (b, pixels, in) -> (b, pixels * 4, out): the
    weight (in, out, 2, 2) as (in, [di, dj, out])."""
    cin, cout = conv.in_channels, conv.out_channels
    weight = conv.weight.permute(0, 2, 3, 1).reshape(cin, 4 * cout)
    y = F.linear(x.reshape(-1, cin), weight.t(), conv.bias.repeat(4))
    return y.reshape(x.shape[0], -1, cout)
