"""GLIP-T backbone (Swin-T + RetinaNet FPN): official-layout states load strictly, the level
sizes follow ceil(H / stride), the shifted-window attention equals a token-by-token reference
that masks by shift region, and a fixed-size ONNX export runs in onnxruntime like torch."""
import time
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.nn import functional as F

from omedge.models.layers.glip_swin import SWIN_SIZES, GlipSwinFPN, shift_mask
from tests.glip_swin_data import (
    SIZES,
    official_backbone_keys,
    official_relative_position_index,
    synth_backbone_state,
)

PREFIX = "module.backbone."
STRIDES = (8, 16, 32, 64, 128)


def loaded(size: str, seed: int = 0) -> GlipSwinFPN:
    """The module with a synthesised official state, `module.backbone.` stripped, loaded strictly."""
    state = synth_backbone_state(PREFIX, size, seed)
    model = GlipSwinFPN(**SWIN_SIZES[size]).eval()
    model.load_state_dict({k[len(PREFIX):]: v for k, v in state.items()}, strict=True)
    return model


def level_shapes(channels, h, w):
    return [(1, channels, -(-h // s), -(-w // s)) for s in STRIDES]


@pytest.mark.parametrize("size", ["tiny", "T"])
def test_state_names_shapes_dtypes_are_the_official_ones(size):
    keys = official_backbone_keys(**SIZES[size])
    model = GlipSwinFPN(**SWIN_SIZES[size])
    own = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    assert own == keys
    index = [k for k in keys if k.endswith("relative_position_index")]
    assert len(index) == sum(SIZES[size]["depths"])  # 12 persistent int64 buffers for GLIP-T
    expected = official_relative_position_index(SIZES[size]["window"])
    assert all(torch.equal(model.state_dict()[k], expected) for k in index)
    loaded(size)  # strict load of the synthesised file layout


def test_tiny_levels_are_p3_to_p7_with_ceil_sizes():
    model = loaded("tiny")
    channels = SIZES["tiny"]["fpn_channels"]
    with torch.no_grad():
        for h, w in ((256, 320), (250, 333)):  # the fixed canvas, and one that needs every padding
            out = model(torch.randn(1, 3, h, w))
            assert [tuple(o.shape) for o in out] == level_shapes(channels, h, w)
            assert all(torch.isfinite(o).all() and o.std() > 0.1 for o in out)


def test_batch_items_do_not_mix():
    model, x = loaded("tiny", seed=1), torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        both = model(x)
        single = model(x[1:])
    for a, b in zip(both, single):
        torch.testing.assert_close(a[1:], b, rtol=1e-4, atol=1e-5)


def reference_attend(block, x):
    """Token by token: after the zero padding to whole windows, token p attends to token q iff
    their cyclically shifted positions lie in the same window and in the same shift region
    (band [0, P-w), [P-w, P-s) or [P-s, P) of each axis); masked pairs are dropped outright.
    The bias is table[(dy + w - 1) * (2w - 1) + dx + w - 1] for the shifted offset (dy, dx)."""
    attn, win, s = block.attn, block.window, block.shift
    _, h, w, c = x.shape
    y = F.pad(block.norm1(x), (0, 0, 0, (-w) % win, 0, (-h) % win))[0]
    hp, wp = y.shape[:2]
    heads = attn.num_heads
    q, k, v = attn.qkv(y.reshape(-1, c)).reshape(-1, 3, heads, c // heads).unbind(1)  # (tokens, heads, d)
    rows, cols = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
    sy, sx = ((rows - s) % hp).flatten(), ((cols - s) % wp).flatten()

    def band(p, size):
        return (p >= size - win).long() + (p >= size - s).long() if s else torch.zeros_like(p)

    window_id = (sy // win) * (wp // win) + sx // win
    region = band(sy, hp) * 3 + band(sx, wp)
    out = torch.zeros(hp * wp, heads, c // heads)
    for p in range(hp * wp):
        keep = (window_id == window_id[p]) & (region == region[p])
        dy, dx = sy[p] - sy[keep], sx[p] - sx[keep]
        bias = attn.relative_position_bias_table[(dy + win - 1) * (2 * win - 1) + dx + win - 1]  # (keys, heads)
        logits = torch.einsum("hd,khd->hk", q[p] * attn.scale, k[keep]) + bias.T
        out[p] = torch.einsum("hk,khd->hd", logits.softmax(-1), v[keep])
    return attn.proj(out.reshape(hp, wp, c))[:h, :w][None]


def test_shifted_stage_matches_the_region_reference():
    """Stage 0 of the tiny model (window 7; block 1 shifted by 3) on a 10 x 17 map, padded to
    14 x 21: the shift regions, the padding keys and the bias offsets all matter."""
    stage = loaded("tiny", seed=2).body.layers[0]
    assert [b.shift for b in stage.blocks] == [0, 3]
    x = torch.randn(1, 10, 17, 32)
    with torch.no_grad():
        want = x
        for block in stage.blocks:
            want = want + reference_attend(block, want)
            want = want + block.mlp(block.norm2(want))
        got, merged = stage(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert merged.shape == (1, 5, 9, 64)
        shifted = stage.blocks[1]
        masked = shifted.attend(x, shift_mask(14, 21, 7, 3))
        torch.testing.assert_close(masked, reference_attend(shifted, x), rtol=1e-5, atol=1e-5)
        unmasked = shifted.attend(x, torch.zeros(6, 49, 49))  # the mask is not a no-op
        assert (unmasked - masked).abs().max() > 1e-2


def test_onnx_export_at_a_fixed_size_matches_torch(tmp_path):
    model, x = loaded("tiny", seed=3), torch.randn(1, 3, 256, 320)
    path = tmp_path / "glip_swin_tiny.onnx"
    names = [f"p{i}" for i in range(3, 8)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings: the Python-int sizes become constants, as intended
        want = [o.numpy() for o in model(x)]
        torch.onnx.export(model, (x,), str(path), input_names=["pixel_values"], output_names=names,
                          opset_version=17, dynamo=False, do_constant_folding=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(names, {"pixel_values": x.numpy()})
    for g, w in zip(got, want):
        assert g.shape == w.shape
        err = np.abs(g - w).max() / np.abs(w).max()
        print(f"onnxruntime vs torch, {g.shape}: max abs err / max abs output {err:.1e}")
        assert err < 1e-4


def test_glip_t_parameter_count_and_512x640_forward_time():
    model = loaded("T")
    n_official = sum(int(np.prod(shape)) for shape, dtype in official_backbone_keys(**SIZES["T"]).values()
                     if dtype == torch.float32)
    n_body = sum(p.numel() for name, p in model.named_parameters() if name.startswith("body."))
    assert sum(p.numel() for p in model.parameters()) == n_official
    assert 27.4e6 < n_body < 27.6e6  # Swin-T without its classifier: ~27.5 M
    x = torch.randn(1, 3, 512, 640)
    with torch.no_grad():
        model(x)
        start = time.perf_counter()
        out = model(x)
        seconds = time.perf_counter() - start
    print(f"GLIP-T backbone+FPN: {n_official} parameters (body {n_body}); 512x640 forward {seconds:.2f} s")
    assert [tuple(o.shape) for o in out] == level_shapes(256, 512, 640)
    assert seconds < 30.0  # ~1 s on 2 free cores; generous for a shared machine


@pytest.mark.slow
def test_glip_t_at_the_official_800x1344_canvas():
    model = loaded("T", seed=4)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 800, 1344))
    assert [tuple(o.shape) for o in out] == level_shapes(256, 800, 1344)
    assert [o.shape[-2:] for o in out] == [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]
    assert all(torch.isfinite(o).all() for o in out)
