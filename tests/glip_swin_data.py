"""The GLIP-T backbone part of an official checkpoint, written from the structure of
microsoft/GLIP (maskrcnn_benchmark/modeling/backbone/swint.py, fpn.py, backbone/__init__.py
"SWINT-FPN-RETINANET", config defaults) and independently of omedge's module: the names,
shapes and dtypes are spelled out here loop by loop, and the relative_position_index buffers
are computed pair by pair in plain Python.

`synth_backbone_state` gives fan-in-scaled random float32 weights (a GLIP file stores its
weights in float32 even after AMP training) plus the int64 index buffers, under
`module.backbone.` by default as in GLIP's Checkpointer files."""
from __future__ import annotations

import torch

SIZES = {  # MODEL.SWINT defaults (EMBED_DIM 96, DEPTHS, NUM_HEADS, WINDOW_SIZE 7), BACKBONE.OUT_CHANNELS 256
    "T": {"embed_dim": 96, "depths": (2, 2, 6, 2), "heads": (3, 6, 12, 24), "window": 7, "fpn_channels": 256},
    "tiny": {"embed_dim": 32, "depths": (2, 2, 2, 2), "heads": (1, 2, 4, 8), "window": 7, "fpn_channels": 32},
}
F32, I64 = torch.float32, torch.int64


def official_relative_position_index(window: int) -> torch.Tensor:
    """index[i, j] for tokens i = (yi, xi), j = (yj, xj) of a window, row-major:
    (yi - yj + w - 1) * (2w - 1) + (xi - xj + w - 1)."""
    coords = [(y, x) for y in range(window) for x in range(window)]
    rows = [[(yi - yj + window - 1) * (2 * window - 1) + (xi - xj + window - 1) for (yj, xj) in coords]
            for (yi, xi) in coords]
    return torch.tensor(rows, dtype=I64)


def _linear(keys, name, cin, cout, bias=True):
    keys[f"{name}.weight"] = ((cout, cin), F32)
    if bias:
        keys[f"{name}.bias"] = ((cout,), F32)


def _norm(keys, name, dim):
    keys[f"{name}.weight"] = ((dim,), F32)
    keys[f"{name}.bias"] = ((dim,), F32)


def _conv(keys, name, cin, cout, k):
    keys[f"{name}.weight"] = ((cout, cin, k, k), F32)
    keys[f"{name}.bias"] = ((cout,), F32)


def official_backbone_keys(embed_dim, depths, heads, window, fpn_channels) -> dict:
    """{name below `backbone.`: (shape, dtype)} of GLIP's SWINT-FPN-RETINANET backbone."""
    keys: dict = {}
    _conv(keys, "body.patch_embed.proj", 3, embed_dim, 4)
    _norm(keys, "body.patch_embed.norm", embed_dim)  # patch_norm=True; APE False: no absolute_pos_embed
    for i, depth in enumerate(depths):
        dim = embed_dim * 2 ** i
        for j in range(depth):
            block = f"body.layers.{i}.blocks.{j}"
            _norm(keys, f"{block}.norm1", dim)
            keys[f"{block}.attn.relative_position_bias_table"] = (((2 * window - 1) ** 2, heads[i]), F32)
            keys[f"{block}.attn.relative_position_index"] = ((window * window, window * window), I64)
            _linear(keys, f"{block}.attn.qkv", dim, 3 * dim)
            _linear(keys, f"{block}.attn.proj", dim, dim)
            _norm(keys, f"{block}.norm2", dim)
            _linear(keys, f"{block}.mlp.fc1", dim, 4 * dim)
            _linear(keys, f"{block}.mlp.fc2", 4 * dim, dim)
        if i < len(depths) - 1:
            _linear(keys, f"body.layers.{i}.downsample.reduction", 4 * dim, 2 * dim, bias=False)
            _norm(keys, f"body.layers.{i}.downsample.norm", 4 * dim)
    for i in range(1, len(depths)):  # norm0 is nn.Identity for *-RETINANET bodies
        _norm(keys, f"body.norm{i}", embed_dim * 2 ** i)
    for level in (2, 3, 4):  # in_channels_list [0, C3, C4, C5]: fpn_inner1/fpn_layer1 are skipped
        _conv(keys, f"fpn.fpn_inner{level}", embed_dim * 2 ** (level - 1), fpn_channels, 1)
        _conv(keys, f"fpn.fpn_layer{level}", fpn_channels, fpn_channels, 3)
    _conv(keys, "fpn.top_blocks.p6", fpn_channels, fpn_channels, 3)  # in = OUT_CHANNELS: built on P5
    _conv(keys, "fpn.top_blocks.p7", fpn_channels, fpn_channels, 3)
    return keys


def _random(name: str, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    """Fan-in-scaled weights, small biases, norms around (1, 0), bias tables of trained size."""
    if name.endswith("relative_position_bias_table"):
        return torch.randn(shape, generator=gen) * 0.5
    if len(shape) == 1:
        is_norm_weight = name.endswith(".weight")
        return (1.0 if is_norm_weight else 0.0) + torch.randn(shape, generator=gen) * 0.1
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return torch.randn(shape, generator=gen) * fan_in ** -0.5


def synth_backbone_state(prefix: str = "module.backbone.", size: str = "tiny", seed: int = 0) -> dict:
    """A GLIP checkpoint's backbone tensors for `size` ("T" or "tiny") under `prefix`."""
    cfg = SIZES[size]
    gen = torch.Generator().manual_seed(seed)
    index = official_relative_position_index(cfg["window"])
    state = {}
    for name, (shape, dtype) in official_backbone_keys(**cfg).items():
        value = index.clone() if dtype == I64 else _random(name, shape, gen)
        assert tuple(value.shape) == shape and value.dtype == dtype
        state[prefix + name] = value
    return state
