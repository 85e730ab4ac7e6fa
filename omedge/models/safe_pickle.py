"""numpy values in untrusted pickles, rebuilt from their raw bytes.

Official training files hold numpy arrays and scalars (nnU-Net's `plot_stuff`, its
plans). Allow-listing numpy's own `_reconstruct` / `ndarray.__setstate__` is not safe:
a forged state (an object dtype over raw bytes) gives an array of wild pointers that
crashes the process when printed. So the unpicklers map numpy's names to the
stand-ins below, which accept only plain numeric dtypes and exactly-sized byte
buffers, and `materialise` swaps them for real arrays after loading.
"""
from __future__ import annotations

import argparse

import numpy as np

from ..errors import CheckpointError

PLAIN_KINDS = "biufc"   # bool, int, uint, float, complex: no objects, no structs, no pointers
NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")


def _refuse(what: str):
    raise CheckpointError(f"the checkpoint holds a forged or unsupported numpy value: {what}",
                          "only plain numeric numpy arrays are read without --trust-checkpoint")


class SafeDType:
    """Stands in for `numpy.dtype(spec, align, copy)`; BUILD gives it the byte order."""

    def __init__(self, spec, align=False, copy=False):
        if not isinstance(spec, str) or len(spec) > 8:
            _refuse(f"dtype {spec!r}")
        try:
            self.dtype = np.dtype(spec)
        except TypeError:
            _refuse(f"dtype {spec!r}")
        if self.dtype.kind not in PLAIN_KINDS or self.dtype.fields is not None or self.dtype.subdtype:
            _refuse(f"dtype {spec!r}")

    def __setstate__(self, state):
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else "|"
        if order not in ("<", ">", "|", "="):
            _refuse(f"byte order {order!r}")
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)


def _as_dtype(dtype) -> np.dtype:
    if not isinstance(dtype, SafeDType):
        _refuse(f"dtype given as {type(dtype).__name__}")
    return dtype.dtype


class RawArray:
    """Stands in for `_reconstruct(ndarray, (0,), b'b')`; BUILD gives it
    (version, shape, dtype, fortran_order, raw bytes)."""

    def __init__(self, *_):
        self.array = None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            _refuse("array state")
        _, shape, dtype, fortran, raw = state
        dtype = _as_dtype(dtype)
        if not (isinstance(shape, tuple) and all(isinstance(s, int) and s >= 0 for s in shape)):
            _refuse(f"array shape {shape!r}")
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != int(np.prod(shape)) * dtype.itemsize:
            _refuse("array data whose size does not match its shape")
        flat = np.frombuffer(bytes(raw), dtype=dtype)
        self.array = flat.reshape(shape, order="F" if fortran else "C").copy()


class NdarrayName:
    """What the name `numpy.ndarray` resolves to: only `_reconstruct`'s first argument."""


def scalar(dtype, raw=b""):
    dtype = _as_dtype(dtype)
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != dtype.itemsize:
        _refuse("scalar data whose size does not match its dtype")
    return np.frombuffer(bytes(raw), dtype=dtype)[0]


def names() -> dict:
    """Qualified name -> stand-in, for both numpy 1 and numpy 2 module names."""
    table = {"numpy.dtype": SafeDType, "numpy.ndarray": NdarrayName}
    for module in NUMPY_MODULES:
        table[f"{module}._reconstruct"] = RawArray
        table[f"{module}.scalar"] = scalar
    return table


def materialise(obj, depth: int = 0):
    """The loaded object with every stand-in replaced by the numpy value it describes."""
    if depth > 200:
        raise CheckpointError("the checkpoint is nested too deeply to be plain data")
    if isinstance(obj, RawArray):
        if obj.array is None:
            _refuse("an array without data")
        return obj.array
    if isinstance(obj, SafeDType):
        return obj.dtype
    if isinstance(obj, dict):  # in place: a state_dict's OrderedDict keeps its `_metadata`
        for k, v in obj.items():
            obj[k] = materialise(v, depth + 1)
    elif isinstance(obj, list):
        obj[:] = [materialise(v, depth + 1) for v in obj]
    elif isinstance(obj, tuple):
        return tuple(materialise(v, depth + 1) for v in obj)
    elif isinstance(obj, argparse.Namespace):
        for k, v in vars(obj).items():
            setattr(obj, k, materialise(v, depth + 1))
    return obj
