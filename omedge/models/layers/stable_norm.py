"""InstanceNorm in a form that exports to numerically stable ONNX.

onnxruntime's InstanceNormalization kernel accumulates a whole 128^3 channel in one
pass and loses ~1e-4 relative precision; over STU-Net's 22 norms that flips near-tie
voxels; OpenVINO's MVN, or one ReduceMean over D, H, W, has the same problem.
`StableInstanceNorm` is the same function written as one reduction per spatial axis
(each a short, well-conditioned sum) and a two-pass variance, so the exported graph
holds only ReduceMean / ReduceSum / Sub / Mul / Add / Sqrt / Div (plus Shape /
Gather / Cast for the divisor of a dynamic axis). The torch reference keeps the
original modules: the swap is done only around the ONNX export.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.instancenorm import _InstanceNorm

SPATIAL_DIMS = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}


class StableInstanceNorm(nn.Module):
    """nn.InstanceNorm{1,2,3}d (instance statistics) computed axis by axis. It shares
    the original's affine parameters, so swapping it in copies no weights."""

    def __init__(self, norm: _InstanceNorm):
        super().__init__()
        self.spatial = SPATIAL_DIMS[type(norm)]
        self.eps = float(norm.eps)
        self.weight, self.bias = (norm.weight, norm.bias) if norm.affine else (None, None)

    def _mean(self, x):
        """Mean over the trailing spatial axes, one axis at a time (equal-sized slices,
        so the mean of means is the mean). Means and sum / n alternate: OpenVINO's
        ReduceMerge fuses adjacent reductions of one kind back into a single one, whose
        sequential sum over a blocked 128^3 layout is off by ~1e-4."""
        for i, axis in enumerate(range(x.dim() - 1, x.dim() - 1 - self.spatial, -1)):
            x = x.mean(dim=axis, keepdim=True) if i % 2 == 0 else x.sum(dim=axis, keepdim=True) / x.shape[axis]
        return x

    def forward(self, x):
        centred = x - self._mean(x)
        var = self._mean(centred * centred)  # two-pass: no E[x^2] - E[x]^2 cancellation
        y = centred / torch.sqrt(var + self.eps)
        if self.weight is None:
            return y
        shape = (-1,) + (1,) * self.spatial  # (C, 1, ..): broadcasts batched and unbatched input
        return y * self.weight.view(shape) + self.bias.view(shape)


def swappable(module: nn.Module) -> bool:
    """Plain InstanceNorm using instance statistics (nnU-Net / PyMIC style). Modules
    tracking running statistics, or subclasses with their own forward, are left alone."""
    return type(module) in SPATIAL_DIMS and not (module.track_running_stats and module.running_mean is not None)


@contextmanager
def stable_instance_norms(model: nn.Module):
    """Replace every swappable InstanceNorm of `model` by a StableInstanceNorm for the
    duration of the block and yield how many were replaced; the originals are put
    back afterwards, even on error (the caller's model is left as it was)."""
    swapped = []  # (parent, attribute name, original)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if swappable(child):
                swapped.append((parent, name, child))
    try:
        for parent, name, child in swapped:
            setattr(parent, name, StableInstanceNorm(child).train(child.training))  # Sequential indices too
        yield len(swapped)
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)
