"""nnU-Net v1 plans (`<checkpoint>.model.pkl` beside the `.model` file): the spacing,
window size, pooling and intensity scheme the network was trained with.

The file is a pickle, so it is read with an unpickler that only builds plain data
(dicts, lists, numpy arrays and scalars, OrderedDict); anything else is refused."""
from __future__ import annotations

import collections
import pickle
from pathlib import Path

import numpy as np

from ..errors import CheckpointError

_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


def _multiarray():
    """numpy 2 renamed numpy.core to numpy._core; pickles of either numpy name one of them."""
    try:
        import numpy._core.multiarray as multiarray
    except ImportError:  # numpy 1
        import numpy.core.multiarray as multiarray
    return multiarray


class _PlainData(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("scalar", "_reconstruct"):
            return getattr(_multiarray(), name)
        if module == "builtins" and name in ("set", "frozenset", "tuple", "list", "dict", "int", "float", "str"):
            import builtins
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


def read_plans(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _PlainData(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise CheckpointError(f"cannot read nnU-Net plans {path.name}: {e}",
                              "the file is damaged or holds more than plain data") from e
    return obj.get("plans", obj) if isinstance(obj, dict) else {}


def preprocess_from_plans(plans: dict) -> dict:
    """The manifest's preprocessing fields that the plans fix (3d_fullres stage)."""
    stages = plans.get("plans_per_stage") or {}
    if not stages:
        raise CheckpointError("nnU-Net plans have no plans_per_stage")
    stage = stages[max(stages)]
    out = {"target_spacing": [float(s) for s in stage["current_spacing"]],
           "patch_size": [int(s) for s in stage["patch_size"]]}
    scheme = (plans.get("normalization_schemes") or {0: "nonCT"})[0]
    if scheme == "CT":  # clip to the training set's 0.5 / 99.5 percentiles, then its mean / sd
        props = plans["dataset_properties"]["intensityproperties"][0]
        out["normalization"] = "ct_window"
        out["ct_window"] = [float(props["percentile_00_5"]), float(props["percentile_99_5"]),
                            float(props["mean"]), float(props["sd"])]
    else:
        out["normalization"] = "zscore_per_image"
    out["plans"] = {"stage": int(max(stages)), "normalization_scheme": scheme,
                    "pool_op_kernel_sizes": [list(map(int, k)) for k in stage.get("pool_op_kernel_sizes", [])]}
    return out
