"""Whole-volume segmentation finalises slices as the window moves: the same labels as
argmax over the full logits, with an accumulator of one patch depth."""
import tracemalloc

import numpy as np
import pytest

from omedge.errors import InputError
from omedge.parity import decisive_threshold, dice_scores, logit_scale, top2_margin
from omedge.runtime.volume import (
    FP16_SAFE,
    accumulator_bytes,
    choose_accumulator,
    class_argmax,
    memory_available,
    roll_axis,
    sliding_argmax,
    sliding_window,
)

K = 12


def fake_net(batch: np.ndarray) -> np.ndarray:
    """A deterministic stand-in for a segmentation network: K class maps from the input
    (smooth, with near-ties between classes), windows of (N, 1, d, h, w) -> (N, K, d, h, w)."""
    x = batch[:, :1]
    k = np.arange(K, dtype=np.float32).reshape(1, K, 1, 1, 1)
    return (np.sin(x * (1 + k) * 0.7) + 0.05 * k).astype(np.float32)


@pytest.mark.parametrize("shape, patch, step", [((1, 70, 40, 36), (24, 16, 16), 0.5),
                                                ((1, 20, 30, 30), (32, 16, 16), 0.5),   # shallower than a patch
                                                ((1, 53, 33, 29), (16, 16, 16), [0.33, 0.5, 1.0]),
                                                ((1, 20, 30, 70), (16, 16, 16), 0.5)])  # rolls along width
def test_same_labels_as_the_full_logits(shape, patch, step):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    want = class_argmax(sliding_window(x, fake_net, patch, step, batch_size=3))
    seen = []
    got = sliding_argmax(x, fake_net, patch, step, batch_size=3, progress=lambda d, n: seen.append((d, n)))
    assert got.shape == shape[1:] and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    assert seen[-1][0] == seen[-1][1]


def test_accumulator_is_one_patch_deep():
    """Peak numpy memory: the full-logits path holds K x D x H x W float32; the streaming
    one K x patch-depth x H x W, here a sixteenth of it."""
    x = np.random.default_rng(1).normal(size=(1, 256, 48, 48)).astype(np.float32)
    patch = (16, 48, 48)
    peaks = []
    for fn in (lambda: class_argmax(sliding_window(x, fake_net, patch, 0.5)),
               lambda: sliding_argmax(x, fake_net, patch, 0.5, accumulator=np.float32)):
        tracemalloc.start()
        fn()
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    full = K * 256 * 48 * 48 * 4
    assert peaks[0] > full
    assert peaks[1] < peaks[0] - 0.8 * full and peaks[1] < peaks[0] / 2, peaks


@pytest.mark.parametrize("shape, axis", [((1, 40, 48, 160), 2), ((1, 40, 160, 48), 1), ((1, 160, 40, 48), 0)])
def test_accumulator_rolls_along_the_axis_with_most_patches(shape, axis):
    """A CT is often wider than it is deep: the open rows follow the long axis, so the
    accumulator is one patch along it (a fifth of the volume here) whichever axis it is."""
    x = np.random.default_rng(4).normal(size=shape).astype(np.float32)
    patch = (32, 32, 32)
    assert roll_axis(shape[1:], patch) == axis
    peaks, labels = [], []
    for fn in (lambda: class_argmax(sliding_window(x, fake_net, patch, 0.5, batch_size=1)),
               lambda: sliding_argmax(x, fake_net, patch, 0.5, batch_size=1)):
        tracemalloc.start()
        labels.append(fn())
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    full = K * 40 * 48 * 160 * 4  # rolling along the 40-deep axis would keep 32/40 of it
    assert peaks[0] > full and peaks[1] < peaks[0] - 0.6 * full, (peaks, full)
    np.testing.assert_array_equal(labels[1], labels[0])


def test_float16_sums_keep_every_decisive_voxel():
    """The float16 accumulator (as nnU-Net v2's) against the exact float32 path on a net
    made of near-ties: a voxel may change only where the top-2 logits are within fp16's
    decisive margin (1% of the logit scale), and fewer than 0.5% of voxels do."""
    x = np.random.default_rng(2).normal(size=(1, 70, 40, 36)).astype(np.float32)
    patch, step = (24, 16, 16), 0.5
    logits = sliding_window(x, fake_net, patch, step)
    exact = class_argmax(logits)
    half = sliding_argmax(x, fake_net, patch, step, accumulator=np.float16)
    decisive = top2_margin(logits) > decisive_threshold(logit_scale(logits), "fp16")
    assert decisive.mean() > 0.9
    np.testing.assert_array_equal(half[decisive], exact[decisive])
    assert (half != exact).mean() < 0.005
    assert min(dice_scores(exact, half).values()) > 0.99


def test_large_logits_are_summed_in_float32():
    """Logits past FP16_SAFE would overflow float16 (inf, then any class): the accumulator
    widens and the labels stay those of the float32 path."""
    def loud(batch):
        return fake_net(batch) * np.float32(3 * FP16_SAFE)
    x = np.random.default_rng(3).normal(size=(1, 40, 30, 30)).astype(np.float32)
    want = sliding_argmax(x, loud, (16, 16, 16), 0.5, accumulator=np.float32)
    dice = dice_scores(want, sliding_argmax(x, loud, (16, 16, 16), 0.5, accumulator=np.float16))
    assert len(dice) >= 3 and min(dice.values()) > 0.999, dice


def test_float16_accumulator_halves_the_accumulator():
    x = np.random.default_rng(1).normal(size=(1, 64, 96, 96)).astype(np.float32)
    patch = (32, 96, 96)
    peaks = []
    for dtype in (np.float32, np.float16):
        tracemalloc.start()
        sliding_argmax(x, fake_net, patch, 0.5, batch_size=1, accumulator=dtype)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    acc32 = K * 32 * 96 * 96 * 4
    assert peaks[0] - peaks[1] > 0.4 * acc32, (peaks, acc32)


def test_auto_accumulator_takes_float16_only_where_float32_does_not_fit():
    """STU-Net-B sizes: 105 classes, 128^3 windows, a 160x256x256 volume at 1.5 mm; the
    float32 rows are 2.2 GB, the working windows 3.5 GB more."""
    shape, patch, gb = (160, 256, 256), (128, 128, 128), 2 ** 30
    assert accumulator_bytes(shape, patch, 105) == 105 * 160 * 128 * 256 * 4
    assert accumulator_bytes(shape, patch, 105, np.float16) * 2 == accumulator_bytes(shape, patch, 105)
    dtype, why = choose_accumulator(shape, patch, 105, "auto", available=16 * gb)
    assert dtype is np.float32 and "16.0 GB available" in why
    dtype, why = choose_accumulator(shape, patch, 105, "auto", available=5 * gb)
    assert dtype is np.float16 and "only 5.0 GB available" in why
    assert choose_accumulator(shape, patch, 105, "float32", available=1)[0] is np.float32  # asked for: as given
    assert choose_accumulator(shape, patch, None, "auto", available=1)[0] is np.float32    # cannot estimate
    with pytest.raises(InputError, match="auto, float32 or float16"):
        choose_accumulator(shape, patch, 105, "int8")
    with pytest.raises(InputError, match="auto, float32 or float16"):
        choose_accumulator(shape, patch, 105, "fp16-ish")  # not a numpy dtype at all: the same typed error
    assert memory_available() > 0  # this Linux machine's /proc/meminfo
