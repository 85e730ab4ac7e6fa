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
from ..spec import ModelSpec, TensorSpec, embedding_output, logits_output
from .checkpoint import strip_prefix, unwrap
from .vit import VIT_SIZES, Attention, Mlp, PatchEmbed, _init_weights

PRETRAIN_FRAMES = 8


class DividedSpaceTimeBlock(nn.Module):
    """TimeSformer 'divided_space_time' block, with the official parameter names.

    The clip travels as CLS (B, 1, D) and patches (B*T, N, D), frame-major, with every size a
    build-time constant. The official patch-major token order (`1 + n*T + t`) costs two
    full-size transposes per block around the spatial attention, and sizes read off the
    input export as Shape -> Gather -> Concat chains; here the temporal attention's head
    split (a permute it needs anyway) does the regrouping. Token order is internal: only
    CLS leaves the model, so the last block computes only what CLS needs (`cls_only`)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.scale = (dim // heads) ** -0.5
        self.temporal_norm1 = nn.LayerNorm(dim, eps=eps)
        self.temporal_attn = Attention(dim, heads)
        self.temporal_fc = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def attend(self, q, k, v):
        """softmax(q k^T / sqrt(dh)) v, the scale folded into q as in vit.Attention."""
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v

    def project(self, attn: Attention, x, part: int):
        """One of q, k, v (part 0, 1, 2) from the official fused `qkv` weight. Three
        projections instead of one fused output: a (.., 3, heads, dh) reshape + permute +
        Gather ahead of the attention kept OpenVINO from fusing it and, in INT8, left a
        quantize-convert on the 6-D tensor that cost more than the projection itself."""
        d = self.dim
        rows = slice(part * d, (part + 1) * d)
        return F.linear(x, attn.qkv.weight[rows], attn.qkv.bias[rows])

    def temporal(self, patches, frames: int, n: int):
        """Every patch position attends over its T frames."""
        d, h = self.dim, self.heads
        x = self.temporal_norm1(patches)  # (B*T, N, D)
        q, k, v = (self.project(self.temporal_attn, x, i).reshape(-1, frames, n, h, d // h).permute(0, 2, 3, 1, 4)
                   for i in range(3))  # (B, N, H, T, dh)
        out = self.attend(q, k, v).permute(0, 3, 1, 2, 4).reshape(-1, n, d)
        return patches + self.temporal_fc(self.temporal_attn.proj(out))

    def spatial(self, cls, patches, frames: int, n: int, cls_only: bool):
        """Every frame attends over its N patches plus its own copy of CLS; the CLS copies'
        results are averaged over the frames. cls_only: queries from the CLS rows alone."""
        d, h = self.dim, self.heads
        x = self.norm1(torch.cat([cls.expand(-1, frames, -1).reshape(-1, 1, d), patches], dim=1))
        rows = 1 if cls_only else n + 1
        q = self.project(self.attn, x[:, :1] if cls_only else x, 0).reshape(-1, rows, h, d // h).transpose(1, 2)
        k, v = (self.project(self.attn, x, i).reshape(-1, n + 1, h, d // h).transpose(1, 2) for i in (1, 2))
        res = self.attn.proj(self.attend(q, k, v).transpose(1, 2).reshape(-1, rows, d))
        cls = cls + res[:, :1].reshape(-1, frames, d).mean(dim=1, keepdim=True)
        return cls, (None if cls_only else patches + res[:, 1:])

    def forward(self, cls, patches, frames: int, n: int, cls_only: bool = False):
        """(cls, patches) -> (cls, patches); patches is None after a cls_only block."""
        patches = self.temporal(patches, frames, n)
        cls, patches = self.spatial(cls, patches, frames, n, cls_only)
        cls = cls + self.mlp(self.norm2(cls))
        return cls, (None if cls_only else patches + self.mlp(self.norm2(patches)))


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
        self.num_frames, self.img_size, self.dim = num_frames, img_size, dim
        grid = img_size // patch
        self.tokens = grid * grid
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
        for block in self.blocks:  # the original starts every temporal branch as a no-op
            nn.init.zeros_(block.temporal_fc.weight)
            nn.init.zeros_(block.temporal_fc.bias)

    def features(self, video):
        """Sizes come from the build, not from `video.shape`: the exported graph then holds
        constant reshapes (only the batch is left to the runtime)."""
        t, n, d, size = self.num_frames, self.tokens, self.dim, self.img_size
        if not torch.jit.is_tracing():  # traced sizes are tensors
            self.check_clip(video.shape)
        frames = video.transpose(1, 2).reshape(-1, 3, size, size)
        x = self.patch_embed.proj(frames).reshape(-1, d, n).transpose(1, 2)  # (B*T, N, D)
        x = x + self.pos_embed[:, 1:]
        time = self.time_embed[:, self.time_index] if self.resize_time else self.time_embed
        patches = (x.reshape(-1, t, n, d) + time.reshape(1, t, 1, d)).reshape(-1, n, d)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(video.shape[0], -1, -1)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            cls, patches = block(cls, patches, t, n, cls_only=i == last)
        return self.norm(cls)[:, 0]

    def check_clip(self, shape):
        t, size = self.num_frames, self.img_size
        if len(shape) != 5 or shape[2] != t:
            got, n = (f"{shape[2]} frames", shape[2]) if len(shape) == 5 else (f"shape {tuple(shape)}", "N")
            raise InputError(f"Endo-FM was built for {t}-frame clips, got {got}",
                             f"build it with num_frames={n}, or sample {t} frames per clip")
        if tuple(shape[1:]) != (3, t, size, size):
            raise InputError(f"Endo-FM takes (batch, 3, {t}, {size}, {size}) clips, got {tuple(shape)}",
                             f"resize and crop the frames to {size}x{size} RGB")

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
