"""GLIP's VLDyHead (microsoft/GLIP maskrcnn_benchmark/modeling/rpn/vldyhead.py) at inference,
with the official module names below `rpn.head.`, for the GLIP-T / MIU-VL config
(EARLY_FUSE_ON, MHA-B fusion, USE_FUSED_FEATURES_DOT_PRODUCT, DyReLU, DyFuse, DCNv2, GN 16,
layer scale and every CLAMP_* flag on).

Each of the NUM_CONVS layers is [VLFuse, BertEncoderLayer, DyConv] in `dyhead_tower`.
The DCNv2 convolution is written in plain torch (grid_sample) for the reference and
exported as ONNX `DeformConv` (opset 19, with bias and mask) through a `symbolic`.
`cls_logits` is not built: at inference the official post-processor reads only its
channel count (the label range), never its values; the grounding scores are the
dot-product logits."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CLAMP = 50000.0  # every GLIP clamp is +-50000 (fp16 range)
TEXT_MASK = -9e15  # BiMultiHeadAttention's fill for padded tokens
# NUM_CONVS, fusion MHA width/heads (fixed 2048/8 in VLFuse.init_configs) per size
HEAD_SIZES = {"T": {"num_convs": 6, "fuse_dim": 2048, "fuse_heads": 8},
              "tiny": {"num_convs": 2, "fuse_dim": 64, "fuse_heads": 8}}


class _DeformConvFn(torch.autograd.Function):
    """Modulated deformable conv (DCNv2), 3x3, one offset group, dilation 1. The torch
    forward is the reference; `symbolic` makes the exported graph one DeformConv node."""

    @staticmethod
    def forward(ctx, x, weight, offset, bias, mask, stride: int, padding: int):
        if torch.onnx.is_in_onnx_export():
            # only the shape is needed: the symbolic is the graph, and TorchScript's peephole
            # pass fails on the sub-block recorded for the sampling code
            return x.new_zeros(x.shape[0], weight.shape[0], offset.shape[2], offset.shape[3])
        return deform_conv2d(x, weight, offset, bias, mask, stride, padding)

    @staticmethod
    def symbolic(g, x, weight, offset, bias, mask, stride, padding):
        return g.op("DeformConv", x, weight, offset, bias, mask, strides_i=[stride, stride],
                    pads_i=[padding] * 4, dilations_i=[1, 1], group_i=1, offset_group_i=1)


def deform_conv2d(x, weight, offset, bias, mask, stride: int = 1, padding: int = 1):
    """torchvision.ops.deform_conv2d semantics (and maskrcnn_benchmark's CUDA kernel):
    offset channels are (dy, dx) pairs per kernel tap in row-major tap order, the mask one
    value per tap; a tap samples x bilinearly with zeros outside (a corner outside counts 0).
    Kernel 3x3 (all GLIP uses)."""
    if tuple(weight.shape[-2:]) != (3, 3):
        raise ValueError(f"deform_conv2d: 3x3 kernels only, got {tuple(weight.shape[-2:])}")
    n, c, h, w = x.shape
    o = weight.shape[0]
    ho, wo = offset.shape[-2:]
    taps_y = torch.tensor([0.0, 0, 0, 1, 1, 1, 2, 2, 2], dtype=x.dtype).view(1, 9, 1, 1)
    taps_x = torch.tensor([0.0, 1, 2, 0, 1, 2, 0, 1, 2], dtype=x.dtype).view(1, 9, 1, 1)
    base_y = (torch.arange(ho, dtype=x.dtype) * stride - padding).view(1, 1, -1, 1) + taps_y
    base_x = (torch.arange(wo, dtype=x.dtype) * stride - padding).view(1, 1, 1, -1) + taps_x
    off = offset.reshape(n, 9, 2, ho, wo)
    py, px = base_y + off[:, :, 0], base_x + off[:, :, 1]
    # grid_sample(align_corners=False) maps pixel p to (2p + 1) / size - 1
    grid = torch.stack(((2 * px + 1) / w - 1, (2 * py + 1) / h - 1), dim=-1).reshape(n, -1, wo, 2)
    cols = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    cols = cols.reshape(n, c, 9, ho, wo) * mask.reshape(n, 1, 9, ho, wo)
    out = torch.einsum("nckhw,ock->nohw", cols, weight.reshape(o, c, 9))
    return out + bias.view(1, o, 1, 1)


class ModulatedDeformConv(nn.Module):
    """maskrcnn_benchmark.layers.ModulatedDeformConv: `weight` [out, in, 3, 3] and `bias`."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(cout, cin, 3, 3))
        self.bias = nn.Parameter(torch.zeros(cout))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x, offset, mask):
        return _DeformConvFn.apply(x, self.weight, offset, self.bias, mask, self.stride, 1)


class Conv3x3Norm(nn.Module):
    def __init__(self, cin, cout, stride, groups=16):
        super().__init__()
        self.conv = ModulatedDeformConv(cin, cout, stride)
        self.bn = nn.GroupNorm(groups, cout)

    def forward(self, x, offset, mask):
        return self.bn(self.conv(x, offset, mask))


class HSigmoid(nn.Module):
    def forward(self, x):
        return F.relu6(x + 3) / 6


class DYReLU(nn.Module):
    """DyReLU-B (K2, with bias): two per-channel lines from the pooled input, max of the two."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.fc = nn.Sequential(nn.Linear(channels, channels // 4), nn.ReLU(), nn.Linear(channels // 4, channels * 4),
                                HSigmoid())

    def forward(self, x):
        y = self.fc(x.mean(dim=(2, 3))).view(x.shape[0], 4 * self.channels, 1, 1)
        a1, b1, a2, b2 = torch.split(y, self.channels, dim=1)
        return torch.max(x * ((a1 - 0.5) * 2.0 + 1.0) + (b1 - 0.5), x * ((a2 - 0.5) * 2.0) + (b2 - 0.5))


def _fit(t, hw):
    """The CUDA kernel reads the offset/mask memory of each image as [taps, H_out, W_out]
    without a shape check, so for the coarser level (l + 1) it takes the first
    taps*H_out*W_out values of level l's map. The same is done here, for parity."""
    if tuple(t.shape[-2:]) == tuple(hw):
        return t
    n, c = t.shape[:2]
    return t.reshape(n, -1)[:, :c * hw[0] * hw[1]].reshape(n, c, hw[0], hw[1])


class DyConv(nn.Module):
    """DyConv[1] on level l, DyConv[2] (stride 2) on l-1, DyConv[0] on l+1 upsampled
    (align_corners=True), all with level l's offsets; scale-attention mean; DyReLU."""

    def __init__(self, channels):
        super().__init__()
        self.DyConv = nn.ModuleList([Conv3x3Norm(channels, channels, s) for s in (1, 1, 2)])
        self.AttnConv = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, 1, 1), nn.ReLU())
        self.h_sigmoid = HSigmoid()
        self.relu = DYReLU(channels)
        self.offset = nn.Conv2d(channels, 27, 3, padding=1)

    def forward(self, feats):
        out = []
        for level, feature in enumerate(feats):
            om = self.offset(feature)
            offset, mask = om[:, :18], om[:, 18:].sigmoid()
            hw = feature.shape[-2:]
            fea = [self.DyConv[1](feature, offset, mask)]
            if level > 0:
                fea.append(self.DyConv[2](feats[level - 1], offset, mask))
            if level < len(feats) - 1:
                up_hw = feats[level + 1].shape[-2:]
                up = self.DyConv[0](feats[level + 1], _fit(offset, up_hw), _fit(mask, up_hw))
                fea.append(F.interpolate(up, size=tuple(hw), mode="bilinear", align_corners=True))
            res = torch.stack(fea)
            attn = self.h_sigmoid(torch.stack([self.AttnConv(f) for f in fea]))
            out.append(self.relu((res * attn).mean(dim=0)))
        return out


class BiMultiHeadAttention(nn.Module):
    """utils/fuse_helper.py: image queries attend to tokens (padding masked) and tokens
    attend to all image locations, from one score matrix, with GLIP's clamps."""

    def __init__(self, v_dim, l_dim, embed_dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, embed_dim // heads
        self.scale = self.head_dim ** -0.5
        self.v_proj, self.l_proj = nn.Linear(v_dim, embed_dim), nn.Linear(l_dim, embed_dim)
        self.values_v_proj, self.values_l_proj = nn.Linear(v_dim, embed_dim), nn.Linear(l_dim, embed_dim)
        self.out_v_proj, self.out_l_proj = nn.Linear(embed_dim, v_dim), nn.Linear(embed_dim, l_dim)

    def _split(self, t):  # [B, L, E] -> [B, heads, L, d]
        return t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def _merge(self, t):
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], self.heads * self.head_dim)

    def forward(self, v, lang, text_mask):
        q = self._split(self.v_proj(v) * self.scale)
        scores = (q @ self._split(self.l_proj(lang)).transpose(-1, -2)).clamp(-CLAMP, CLAMP)
        scores_l = scores.transpose(-1, -2)
        scores_l = (scores_l - scores_l.max(dim=-1, keepdim=True)[0]).clamp(-CLAMP, CLAMP)
        # the official fill leaves the valid entries at 1 (a uniform shift: softmax unchanged)
        m = text_mask.to(v.dtype)
        pad = torch.where(m == 0, torch.full_like(m, TEXT_MASK), m)[:, None, None, :]
        attn_v = (scores + pad).softmax(dim=-1)
        out_v = self._merge(attn_v @ self._split(self.values_l_proj(lang)))
        out_l = self._merge(scores_l.softmax(dim=-1) @ self._split(self.values_v_proj(v)))
        return self.out_v_proj(out_v), self.out_l_proj(out_l)


class BiAttentionBlock(nn.Module):
    """BiAttentionBlockForCheckpoint: pre-LayerNorm, layer scale 1/NUM_CONVS. Note the
    residual adds to the *normalised* inputs, as the official single_attention_call does."""

    def __init__(self, v_dim, l_dim, embed_dim, heads, num_convs):
        super().__init__()
        self.layer_norm_v, self.layer_norm_l = nn.LayerNorm(v_dim), nn.LayerNorm(l_dim)
        self.attn = BiMultiHeadAttention(v_dim, l_dim, embed_dim, heads)
        self.gamma_v = nn.Parameter(torch.full((v_dim,), 1.0 / num_convs))
        self.gamma_l = nn.Parameter(torch.full((l_dim,), 1.0 / num_convs))

    def forward(self, v, lang, text_mask):
        v, lang = self.layer_norm_v(v), self.layer_norm_l(lang)
        dv, dl = self.attn(v, lang, text_mask)
        return v + self.gamma_v * dv, lang + self.gamma_l * dl


class VLFuse(nn.Module):
    """All five levels flattened into one image sequence for the bi-attention."""

    def __init__(self, v_dim, l_dim, embed_dim, heads, num_convs):
        super().__init__()
        self.b_attn = BiAttentionBlock(v_dim, l_dim, embed_dim, heads, num_convs)

    def forward(self, feats, lang, text_mask):
        sizes = [f.shape[-2:] for f in feats]
        v = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], dim=1)
        v, lang = self.b_attn(v, lang, text_mask)
        v, out, start = v.transpose(1, 2), [], 0
        for h, w in sizes:
            out.append(v[:, :, start:start + h * w].reshape(v.shape[0], v.shape[1], h, w))
            start += h * w
        return out, lang


class _SelfAttention(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))

    def forward(self, x, additive_mask):
        b, n, _ = x.shape
        q, k, v = (m(x).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
                   for m in (self.query, self.key, self.value))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)).clamp(-CLAMP, CLAMP) + additive_mask
        return (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)


class _DenseNorm(nn.Module):
    def __init__(self, cin, hidden, eps):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(cin, hidden), nn.LayerNorm(hidden, eps=eps)


class _Attention(nn.Module):
    def __init__(self, hidden, heads, eps):
        super().__init__()
        self.self, self.output = _SelfAttention(hidden, heads), _DenseNorm(hidden, hidden, eps)

    def forward(self, x, additive_mask):
        return self.output.LayerNorm(self.output.dense(self.self(x, additive_mask)) + x)


class BertEncoderLayer(nn.Module):
    """rpn/modeling_bert.py's BERT layer with GLIP's clamps (scores, intermediate, output)."""

    def __init__(self, hidden, heads, intermediate, eps=1e-12, act="gelu"):
        super().__init__()
        from transformers.activations import ACT2FN
        self.attention = _Attention(hidden, heads, eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(hidden, intermediate)
        self.act = ACT2FN[act]
        self.output = _DenseNorm(intermediate, hidden, eps)

    def forward(self, x, text_mask):
        additive = (1.0 - text_mask.to(x.dtype))[:, None, None, :] * torch.finfo(x.dtype).min
        a = self.attention(x, additive)
        h = self.act(self.intermediate.dense(a).clamp(-CLAMP, CLAMP)).clamp(-CLAMP, CLAMP)
        h = self.output.dense(h).clamp(-CLAMP, CLAMP)
        return self.output.LayerNorm(h + a).clamp(-CLAMP, CLAMP)


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.scale


class VLDyHead(nn.Module):
    """forward(features P3..P7, token hidden states [B, T, L], attention mask [B, T]) ->
    (box regression [B, N, 4], centerness logits [B, N], dot-product logits [B, N, T])."""

    def __init__(self, channels, lang, num_convs, fuse_dim, fuse_heads, gn_groups=16, levels=5):
        super().__init__()
        tower = []
        for _ in range(num_convs):
            tower += [VLFuse(channels, lang["hidden"], fuse_dim, fuse_heads, num_convs),
                      BertEncoderLayer(lang["hidden"], lang["heads"], lang["intermediate"], lang["eps"], lang["act"]),
                      DyConv(channels)]
        self.dyhead_tower = nn.Sequential(*tower)
        self.bbox_pred, self.centerness = nn.Conv2d(channels, 4, 1), nn.Conv2d(channels, 1, 1)
        self.dot_product_projection_image = nn.Identity()
        self.dot_product_projection_text = nn.Linear(lang["hidden"], channels)
        self.log_scale = nn.Parameter(torch.zeros(1))
        self.bias_lang = nn.Parameter(torch.zeros(lang["hidden"]))
        self.bias0 = nn.Parameter(torch.tensor([-math.log(99.0)]))  # prior 0.01
        self.scales = nn.ModuleList([Scale() for _ in range(levels)])

    def forward(self, feats, hidden, text_mask):
        feats = list(feats)
        for i in range(0, len(self.dyhead_tower), 3):
            fuse, bert, dyconv = self.dyhead_tower[i:i + 3]
            feats, hidden = fuse(feats, hidden, text_mask)
            hidden = bert(hidden, text_mask)
            feats = dyconv(feats)
        emb = F.normalize(hidden, p=2, dim=-1)
        tokens = self.dot_product_projection_text(emb / 2.0)
        token_bias = emb @ self.bias_lang + self.bias0  # [B, T]
        boxes, centers, logits = [], [], []
        for level, x in enumerate(feats):
            boxes.append(self.scales[level](self.bbox_pred(x)).flatten(2).transpose(1, 2))
            centers.append(self.centerness(x).flatten(1))
            q = self.dot_product_projection_image(x).flatten(2).transpose(1, 2)
            dot = q @ tokens.transpose(-1, -2) / self.log_scale.exp() + token_bias[:, None, :]
            logits.append(dot.clamp(-CLAMP, CLAMP))
        return torch.cat(boxes, 1), torch.cat(centers, 1), torch.cat(logits, 1)
