"""Whole-volume segmentation finalises slices as the window moves: the same labels as
argmax over the full logits, with an accumulator of one patch depth."""
import tracemalloc

import numpy as np
import pytest

from omedge.runtime.volume import class_argmax, sliding_argmax, sliding_window

K = 12


def fake_net(batch: np.ndarray) -> np.ndarray:
    """A deterministic stand-in for a segmentation network: K class maps from the input
    (smooth, with near-ties between classes), windows of (N, 1, d, h, w) -> (N, K, d, h, w)."""
    x = batch[:, :1]
    k = np.arange(K, dtype=np.float32).reshape(1, K, 1, 1, 1)
    return (np.sin(x * (1 + k) * 0.7) + 0.05 * k).astype(np.float32)


@pytest.mark.parametrize("shape, patch, step", [((1, 70, 40, 36), (24, 16, 16), 0.5),
                                                ((1, 20, 30, 30), (32, 16, 16), 0.5),   # shallower than a patch
                                                ((1, 53, 33, 29), (16, 16, 16), [0.33, 0.5, 1.0])])
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
               lambda: sliding_argmax(x, fake_net, patch, 0.5)):
        tracemalloc.start()
        fn()
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    full = K * 256 * 48 * 48 * 4
    assert peaks[0] > full
    assert peaks[1] < peaks[0] - 0.8 * full and peaks[1] < peaks[0] / 2, peaks
