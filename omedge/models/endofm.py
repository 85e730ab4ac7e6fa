"""Endo-FM (med-air/Endo-FM): TimeSformer-B/16 video encoder, video-DINO pretrained on
endoscopy clips; the PolypDiag release adds a 2-class linear classifier.

Input is a clip (B, C, T, H, W). Tokens are [CLS, patch n of frame t at 1 + n*T + t]
(patch-major, time fastest) as in the official `rearrange(..., 'b (h w t) m')`. Each
block attends over time per patch, then over space per frame (with a copy of CLS that
is averaged back over frames), then applies the MLP. Output: norm(x)[:, 0], 768-d.

Frame count: the released tables hold `time_embed` for 8 frames. For other clip
lengths the official code does not touch the checkpoint (its loaders call
`load_state_dict(strict=False)`); `VisionTransformer.forward_features` resizes the
table on every call with `F.interpolate(mode='nearest')`. Here `num_frames` (the clip
length the model is built for) is independent of the stored table length, so every
frame count loads the same file strictly; the nearest-neighbour frame indices are
fixed at build time, which keeps the exported graph a static Gather.
"""

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import CheckpointError, InputError
from .checkpoint import strip_prefix, unwrap
from ..spec import ModelSpec, TensorSpec, embedding_output, logits_output
from .vit import VIT_SIZES, Attention, Mlp, PatchEmbed, _init_weights

PRETRAIN_FRAMES = 8


class DividedSpaceTimeBlock(nn.Module):
    """TimeSformer 'divided_space_time' block, with the official parameter names."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6):
        super().__init__()
        self.temporal_norm1 = nn.LayerNorm(dim, eps=eps)
        self.temporal_attn = Attention(dim, heads)
        self.temporal_fc = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, frames: int):
        b, length, d = x.shape
        n = (length - 1) // frames
        cls, patches = x[:, :1], x[:, 1:]
        # Temporal: every patch position attends over its T frames.
        res = self.temporal_attn(self.temporal_norm1(patches.reshape(b * n, frames, d)))
        xt = patches + self.temporal_fc(res.reshape(b, n * frames, d))
        # Spatial: every frame attends over its N patches plus its own copy of CLS.
        xs = xt.reshape(b, n, frames, d).transpose(1, 2).reshape(b * frames, n, d)
        cls_per_frame = cls.expand(b, frames, d).reshape(b * frames, 1, d)
        res = self.attn(self.norm1(torch.cat([cls_per_frame, xs], dim=1)))
        res_cls = res[:, :1].reshape(b, frames, d).mean(dim=1, keepdim=True)
        res_patches = (
            res[:, 1:]
            .reshape(b, frames, n, d)
            .transpose(1, 2)
            .reshape(b, n * frames, d)
        )
        x = torch.cat([cls + res_cls, xt + res_patches], dim=1)
        return x + self.mlp(self.norm2(x))


class TimeSformer(nn.Module):
    """Endo-FM backbone; `head` (PolypDiag's `linear`) only when num_classes > 0.

    num_frames: clip length T the model takes.
    time_embed_frames: rows of the stored `time_embed` table (8 in every release)."""

    def __init__(
        self,
        img_size=224,
        patch=16,
        dim=768,
        depth=12,
        heads=12,
        mlp_ratio=4.0,
        eps=1e-6,
        num_frames=PRETRAIN_FRAMES,
        time_embed_frames=PRETRAIN_FRAMES,
        num_classes=0,
    ):
        super().__init__()
        self.num_frames = num_frames
        grid = img_size // patch
        self.patch_embed = PatchEmbed(patch, 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.time_embed = nn.Parameter(torch.zeros(1, time_embed_frames, dim))
        self.blocks = nn.ModuleList(
            [DividedSpaceTimeBlock(dim, heads, mlp_ratio, eps) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.head = nn.Linear(dim, num_classes) if num_classes else None
        # Same indices as the official F.interpolate(time_embed, size=T, mode='nearest').
        rows = torch.arange(time_embed_frames, dtype=torch.float32).view(1, 1, -1)
        index = F.interpolate(rows, size=num_frames, mode="nearest").flatten().long()
        self.register_buffer("time_index", index, persistent=False)
        self.resize_time = num_frames != time_embed_frames

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)
        for (
            block
        ) in self.blocks:  # the original starts every temporal branch as a no-op
            nn.init.zeros_(block.temporal_fc.weight)
            nn.init.zeros_(block.temporal_fc.bias)

    def features(self, video):
        b, c, t, h, w = video.shape
        if (
            not torch.jit.is_tracing() and t != self.num_frames
        ):  # traced sizes are tensors
            raise InputError(
                f"Endo-FM was built for {self.num_frames}-frame clips, got {t} frames",
                f"build it with num_frames={t}, or sample {self.num_frames} frames per clip",
            )
        x = self.patch_embed(
            video.transpose(1, 2).reshape(b * t, c, h, w)
        )  # (B*T, N, D)
        n, d = x.shape[1], x.shape[2]
        x = x + self.pos_embed[:, 1:]
        time = (
            self.time_embed[:, self.time_index] if self.resize_time else self.time_embed
        )
        x = (x.reshape(b, t, n, d).transpose(1, 2) + time.unsqueeze(1)).reshape(
            b, n * t, d
        )
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x, t)
        return self.norm(x)[:, 0]

    def forward(self, video):
        feats = self.features(video)
        if self.head is None:
            return {"embedding": feats}
        return {"embedding": feats, "logits": self.head(feats)}


def build(
    variant: str,
    num_classes: int = 0,
    num_frames: int = PRETRAIN_FRAMES,
    time_embed_frames: int = PRETRAIN_FRAMES,
):
    return TimeSformer(
        **VIT_SIZES[variant],
        num_frames=num_frames,
        time_embed_frames=time_embed_frames,
        num_classes=num_classes,
    )


def remap(raw):
    """endo_fm.pth (DINO dict: teacher backbone.*, DINO head dropped), polypdiag.pth
    (module.-prefixed backbone + `linear` classifier, renamed `head`), or a bare backbone."""
    if isinstance(raw, dict) and isinstance(raw.get("backbone_state_dict"), dict):
        sd = strip_prefix(dict(raw["backbone_state_dict"]), "module.")
        classifier = strip_prefix(dict(raw.get("state_dict") or {}), "module.")
        if "linear.weight" in classifier:
            sd["head.weight"], sd["head.bias"] = (
                classifier["linear.weight"],
                classifier["linear.bias"],
            )
    else:
        sd = strip_prefix(unwrap(raw, ("teacher", "model", "state_dict")), "module.")
        if any(
            k.startswith("backbone.") for k in sd
        ):  # DINO wrapper: backbone + projection head
            sd = {
                k[len("backbone.") :]: v
                for k, v in sd.items()
                if k.startswith("backbone.")
            }
    if "time_embed" not in sd:
        raise CheckpointError(
            "checkpoint has no time_embed: not a TimeSformer / Endo-FM video encoder"
        )
    options = {}
    if "head.weight" in sd:
        options["num_classes"] = int(sd["head.weight"].shape[0])
    if sd["time_embed"].shape[1] != PRETRAIN_FRAMES:
        options["time_embed_frames"] = int(sd["time_embed"].shape[1])
    return sd, options


OFFICIAL = {
    "transform": "clip 0: 8 frames by linspace over 32 * 8 / 30 s of source frames -> /255, (x - 0.45) / 0.225 "
    "-> short side 224 (F.interpolate bilinear, no antialias) -> spatial crop 0 of 3 (left / top)",
    "repo": "med-air/Endo-FM",
    "entry": "scripts/test_finetune_polypdiag.sh -> eval_finetune.py "
    "--test (UCF101 dataset class, val split, validate_network: one clip per video)",
    "sampling": {
        "file": "datasets/decoder.py (pyav_decode, get_start_end_idx, decode, "
        "temporal_sampling)",
        "why": "clip 0 of the video (clip_idx 0: start 0, not centred) spans "
        "32 * 8 / 30 * average_rate frames (256 at 30 fps); the frames are "
        "torch.linspace(0, span - 1, 8) (float32) clamped to the decoded "
        "frames and truncated by .long(): 0, 36, 72, 109, 145, 182, 218, 255",
    },
    "crop": {
        "file": "eval_finetune.py L43-47; datasets/ucf101.py __getitem__; "
        "datasets/transform.py uniform_crop",
        "why": "the val set is built with TEST.NUM_SPATIAL_CROPS = 1 (one view per "
        "video), then it is set to 3, so __getitem__ takes spatial index "
        "0 % 3 = 0 with scale = TEST_CROP_SIZE 224: the left crop of a landscape "
        "frame, the top one of a portrait frame",
    },
    "resize": {
        "file": "datasets/ucf101.py __getitem__ (tensor_normalize, then spatial_sampling); "
        "datasets/transform.py random_short_side_scale_jitter",
        "why": "uint8 -> /255 -> (x - 0.45) / 0.225 in float32 first, then short side "
        "to 224 (long side floor(long / short * 224)) by F.interpolate bilinear, "
        "align_corners=False, no antialiasing, then the crop",
    },
}

SPECS = [
    ModelSpec(
        id="endo-fm",
        title="Endo-FM endoscopy video encoder (TimeSformer-B/16, 8 frames; + PolypDiag classifier)",
        kind="video",
        inputs=(
            TensorSpec(
                "pixel_values",
                "NCTHW",
                shape=(None, 3, 8, 224, 224),
                dynamic={0: "batch"},
            ),
        ),
        outputs=(embedding_output(), logits_output()),
        primary_output="logits",
        variants=("B", "tiny"),
        default_variant="B",
        preprocess={
            "frames": 8,
            "sample_rate": 32,
            "fps": 30,
            "sampling": "linspace",
            "short_side": 224,
            "interpolation": "bilinear",
            "antialias": False,
            "crop": "uniform-0",
            "crop_size": 224,
            "order": "normalize, resize, crop",
            "mean": [0.45, 0.45, 0.45],
            "std": [0.225, 0.225, 0.225],
            "color": "RGB",
        },
        licence="Apache-2.0",
        source="https://github.com/med-air/Endo-FM",
        build=build,
        remap=remap,
        labels=["class_0", "class_1"],
        official=OFFICIAL,
        notes="Input is a clip (batch, channels, frames, height, width). Clips are sampled, scaled and "
        "cropped as the official PolypDiag evaluation does (8 frames over 256 frames at 30 fps, the "
        "left/top 224 crop); export with crop='center' for a centre crop. The PolypDiag release does not "
        "name its two classes, so they are class_0/class_1; pass --labels at export once known.",
    )
]
