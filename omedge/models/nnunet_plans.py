"""nnU-Net v1 plans (`<checkpoint>.model.pkl` beside the `.model` file): the spacing,
window size, pooling and intensity scheme the network was trained with.

The file is a pickle, so it is read with an unpickler that only builds plain data
(dicts, lists, numpy arrays and scalars, OrderedDict); anything else is refused."""
from __future__ import annotations

import collections
import pickle
from pathlib import Path

from ..errors import CheckpointError
from . import safe_pickle

_BUILTINS = ("set", "frozenset", "tuple", "list", "dict", "int", "float", "str", "bytes", "bool", "complex")


class _PlainData(pickle.Unpickler):
    """Containers, OrderedDict and numpy values (through safe_pickle's stand-ins) only."""

    def find_class(self, module, name):
        stand_in = safe_pickle.names().get(f"{module}.{name}")
        if stand_in is not None:
            return stand_in
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 stores bytes
            import codecs
            return codecs.encode
        if module == "builtins" and name in _BUILTINS:
            import builtins
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


def read_plans(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = safe_pickle.materialise(_PlainData(f).load())
    except CheckpointError as e:
        raise CheckpointError(f"cannot read nnU-Net plans {path.name}: {e.message}", e.hint) from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError,
            KeyError, MemoryError, RecursionError) as e:
        raise CheckpointError(f"cannot read nnU-Net plans {path.name}: {e}",
                              "the file is damaged or holds more than plain data") from e
    return obj.get("plans", obj) if isinstance(obj, dict) else {}


def preprocess_from_plans(plans: dict, name: str = "the plans file") -> dict:
    """The manifest's preprocessing fields that the plans fix (3d_fullres stage); a plans
    file with missing or wrongly typed fields is a CheckpointError naming the field."""
    try:
        out = _from_plans(plans)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise CheckpointError(f"nnU-Net plans in {name} are damaged or not nnU-Net v1 plans "
                              f"({type(e).__name__}: {str(e)[:120]})",
                              "copy the plans .pkl again from the same release as the checkpoint") from None
    spacing, patch = out["target_spacing"], out["patch_size"]
    if len(spacing) != 3 or not all(0.05 <= s <= 20 for s in spacing):
        raise CheckpointError(f"nnU-Net plans in {name} give an implausible spacing {spacing} mm",
                              "expected three spacings between 0.05 and 20 mm")
    if len(patch) != 3 or not all(8 <= s <= 1024 for s in patch):
        raise CheckpointError(f"nnU-Net plans in {name} give an implausible patch size {patch}",
                              "expected three sizes between 8 and 1024 voxels")
    return out


def _from_plans(plans: dict) -> dict:
    if not isinstance(plans, dict):
        raise TypeError(f"plans are a {type(plans).__name__}, not a dict")
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
