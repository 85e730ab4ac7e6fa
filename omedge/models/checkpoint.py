"""Reading checkpoints as untrusted input.

`torch.load(weights_only=True)` refuses anything but tensors and plain containers.
The official training files also hold an `argparse.Namespace` (MAE / DINO `args`)
and numpy scalars (nnU-Net `plot_stuff`), so exactly those globals are allow-listed.
Anything else needs the user's explicit `--trust-checkpoint`.
"""
from __future__ import annotations

import argparse
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError

SUFFIXES = {".pth", ".pt", ".bin", ".ckpt", ".model", ".safetensors"}


def _safe_globals():
    """Plain data types only. numpy 2 renamed `numpy.core` to `numpy._core`; files pickled
    under numpy 1 (the nnU-Net releases) name the old module, so both names are allowed."""
    allowed = [argparse.Namespace, np.dtype, np.ndarray]
    allowed += [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)]
    try:
        import numpy._core.multiarray as multiarray
        for fn in (multiarray.scalar, multiarray._reconstruct):
            allowed += [fn, (fn, f"numpy.core.multiarray.{fn.__name__}")]
    except (ImportError, AttributeError):  # numpy 1: the old names are the real ones
        import numpy.core.multiarray as multiarray
        allowed += [multiarray.scalar, multiarray._reconstruct]
    return allowed


def read_checkpoint(path: str | Path, trust: bool = False):
    """Return the raw object stored in a checkpoint file (a dict for all official files)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give the checkpoint file inside it "
                              f"({', '.join(sorted(SUFFIXES))})")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the copy is incomplete")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"cannot read safetensors file {path}: {e}",
                                  "the file is corrupt or truncated; copy it again and compare its sha256") from e
    if trust:
        warnings.warn(f"unpickling {path} with full trust (--trust-checkpoint): only do this for files you know")
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+) was not an allowed global", str(e))
        if not found:  # not a forbidden object: the bytes themselves are bad
            raise CheckpointError(f"cannot read checkpoint {path.name}: it is corrupt, truncated or not a "
                                  "PyTorch file", "copy the file again and compare its sha256") from e
        what = found.group(1)
        raise CheckpointError(
            f"{path.name} needs unsafe unpickling: it contains {what}, which could run code when loaded",
            "if you trust where this file came from, pass --trust-checkpoint "
            "(Python: trust_checkpoint=True); better, re-save its state_dict as .safetensors") from e
    except Exception as e:  # zip reader errors, EOF, bad magic number
        raise CheckpointError(f"cannot read checkpoint {path.name}: it is corrupt, truncated or not a "
                              f"PyTorch file ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                              "copy the file again and compare its sha256 with the published one") from e


WRAPPER_KEYS = ("teacher", "model", "state_dict", "network_weights", "model_state_dict")


def unwrap(obj, keys=WRAPPER_KEYS) -> dict:
    """Find the state_dict inside a training checkpoint dict."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state_dict",
                              "save model.state_dict() instead of the whole module")
    for key in keys:
        if isinstance(obj.get(key), dict):
            return obj[key]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"no tensors found in checkpoint; top-level keys: {sorted(obj)[:10]}")
    return tensors


def strip_prefix(sd: dict, *prefixes: str) -> dict:
    """Remove the first matching prefix from every key that has it (DataParallel's
    `module.`, DINO's `backbone.`, MoCo's `module.base_encoder.`...)."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    return sd


def drop(sd: dict, *patterns: str) -> dict:
    return {k: v for k, v in sd.items() if not any(re.match(p, k) for p in patterns)}


def compare(model_sd: dict, sd: dict) -> tuple[list, list, list]:
    """(missing, unexpected, shape mismatches) of `sd` against a model's state_dict."""
    missing = [k for k in model_sd if k not in sd]
    unexpected = [k for k in sd if k not in model_sd]
    shapes = [(k, tuple(sd[k].shape), tuple(model_sd[k].shape)) for k in model_sd
              if k in sd and tuple(sd[k].shape) != tuple(model_sd[k].shape)]
    return missing, unexpected, shapes


def describe_mismatch(missing, unexpected, shapes, limit=6) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:limit])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:limit])})")
    if shapes:
        parts.append("shape mismatches: " + "; ".join(f"{k} file {a} vs model {b}" for k, a, b in shapes[:limit]))
    return ", ".join(parts)
