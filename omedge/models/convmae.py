"""DeblurringMIM ConvMAE-B (openmedlab/DeblurringMIM, `ConvViT` from Alpha-VL/ConvMAE):
thyroid-ultrasound encoder with two convolutional stages before a ViT stage.

stage 1: conv 4x4/4 -> 56x56x256, conv blocks | stage 2: conv 2x2/2 -> 28x28x384, conv
blocks | stage 3: conv 2x2/2 -> 14x14x768, Linear (`patch_embed4`), + pos_embed (no
CLS), ViT blocks. Classifier (fine-tuned file, `fc_norm` + `head`): fc_norm(mean of all
196 tokens) -> head, as `models_convvit.ConvViT(global_pool=True)`. Encoder only
(pretraining file, `norm`): mean of norm(x) tokens, as `vision_transformer.ConvViT`.

The pretraining encoder also adds the `stage{1,2}_output_decode` projections of the
conv stages to the ViT output before `norm`, to feed the MAE decoder; the fine-tuning
and segmentation code never use them, so they are dropped with the decoder.
"""
import torch
from torch import nn

from ..errors import CheckpointError
from ..spec import ModelSpec, embedding_output, image_input, logits_output
from .checkpoint import drop, strip_prefix, unwrap
from .deblurring import SPECS as MAE_SPECS
from .deblurring import head_options
from .vit import Block, _init_weights, sincos_pos_embed


def channel_norm(norm: nn.LayerNorm, x):
    """LayerNorm over the channels of an NCHW map, computed along axis 1 in place of the
    official permute -> LayerNorm -> permute back: the same function (mean and biased
    variance over C per pixel, then the per-channel affine).

    Why: the permuted form exported two Transposes per norm, each a copy of up to a
    56x56x256 map that OpenVINO could not fold into its channels-last convolution layout,
    with layout Reorders around them; and NNCF put its INT8 quantizer between the norm and
    the Transpose back, where OpenVINO runs it as a separate fp32 pass. Written as
    (x - mean) / sqrt(mean((x - mean)^2) + eps), OpenVINO's converter fuses it into one
    MVN over axis 1 (NNCF then quantizes only the norm's output, fused into the next conv),
    and the CPU runs it as reductions over the contiguous channels of its layout."""
    centred = x - x.mean(dim=1, keepdim=True)
    var = centred.pow(2).mean(dim=1, keepdim=True)
    return centred / torch.sqrt(var + norm.eps) * norm.weight[:, None, None] + norm.bias[:, None, None]


class ConvPatchEmbed(nn.Module):
    """Strided conv -> channel LayerNorm -> GELU. The official `nn.LayerNorm(embed_dim)`
    ignores the model's eps=1e-6 norm_layer, so it keeps torch's default 1e-5."""

    def __init__(self, in_chans: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(channel_norm(self.norm, self.proj(x)))


class ConvMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ConvBlock(nn.Module):
    """ConvMAE `CBlock`: a 5x5 depthwise conv between two 1x1 convs stands in for
    attention. Its norms are also plain `nn.LayerNorm(dim)` (eps 1e-5)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.conv2(self.attn(self.conv1(channel_norm(self.norm1, x))))
        return x + self.mlp(channel_norm(self.norm2, x))


class ConvViT(nn.Module):
    def __init__(self, dims=(256, 384, 768), depths=(2, 2, 11), heads=12, mlp_ratio=4.0, img_size=224,
                 eps=1e-6, num_classes=0):
        super().__init__()
        self.patch_embed1 = ConvPatchEmbed(3, dims[0], 4)
        self.patch_embed2 = ConvPatchEmbed(dims[0], dims[1], 2)
        self.patch_embed3 = ConvPatchEmbed(dims[1], dims[2], 2)
        self.patch_embed4 = nn.Linear(dims[2], dims[2])
        # Fixed sin-cos in pretraining, learned in fine-tuning; stored in both files.
        self.pos_embed = nn.Parameter(sincos_pos_embed(dims[2], img_size // 16, zero_rows=0))
        self.blocks1 = nn.ModuleList([ConvBlock(dims[0], mlp_ratio) for _ in range(depths[0])])
        self.blocks2 = nn.ModuleList([ConvBlock(dims[1], mlp_ratio) for _ in range(depths[1])])
        self.blocks3 = nn.ModuleList([Block(dims[2], heads, mlp_ratio, eps) for _ in range(depths[2])])
        if num_classes:
            self.fc_norm = nn.LayerNorm(dims[2], eps=eps)
        else:
            self.norm = nn.LayerNorm(dims[2], eps=eps)
        self.head = nn.Linear(dims[2], num_classes) if num_classes else None
        self.apply(_init_weights)

    def features(self, x):
        x = self.patch_embed1(x)
        for block in self.blocks1:
            x = block(x)
        x = self.patch_embed2(x)
        for block in self.blocks2:
            x = block(x)
        x = self.patch_embed3(x)  # (b, c, 14, 14) -> tokens; constant sizes, not a traced Shape chain
        x = x.reshape(-1, int(x.shape[1]), int(x.shape[2]) * int(x.shape[3])).transpose(1, 2)
        x = self.patch_embed4(x) + self.pos_embed
        for block in self.blocks3:
            x = block(x)
        if self.head is not None:
            return self.fc_norm(x.mean(dim=1))
        return self.norm(x).mean(dim=1)

    def forward(self, x):
        feats = self.features(x)
        if self.head is None:
            return {"embedding": feats}
        return {"embedding": feats, "logits": self.head(feats)}


CONVVIT_SIZES = {
    "B": {"dims": (256, 384, 768), "depths": (2, 2, 11), "heads": 12},
    "tiny": {"dims": (32, 48, 64), "depths": (1, 1, 2), "heads": 2},
}


def build(variant: str, num_classes: int = 0):
    return ConvViT(**CONVVIT_SIZES[variant], num_classes=num_classes)


def remap(raw):
    sd = strip_prefix(unwrap(raw), "module.")
    if "patch_embed4.weight" not in sd:
        raise CheckpointError("checkpoint has no patch_embed4: not a ConvMAE / ConvViT encoder")
    sd = drop(sd, r"decoder_", r"mask_token$", r"stage[12]_output_decode\.")
    return sd, head_options(sd, "ConvViT classifier (global_pool=True)")


SPECS = [ModelSpec(
    id="deblurring-convmae", title="DeblurringMIM ConvMAE-B thyroid ultrasound encoder (+ nodule classifier)",
    kind="image",
    inputs=(image_input(),), outputs=(embedding_output(), logits_output()),
    primary_output="logits", variants=("B", "tiny"), default_variant="B",
    preprocess=dict(MAE_SPECS[0].preprocess),
    licence="CC-BY-NC-4.0", source="https://github.com/openmedlab/DeblurringMIM",
    build=build, remap=remap, labels=["class_0", "class_1"], official=dict(MAE_SPECS[0].official),
    notes="Class order follows the training folders (ImageFolder, alphabetical); the release "
          "does not name them, so pass --labels at export, e.g. --labels benign,malignant. "
          "Encoder-only files give mean(norm(tokens)) without the pretraining-only "
          "stage1/2_output_decode fusion.")]
