"""Reading checkpoints as untrusted input.

`torch.load(weights_only=True)` refuses anything but tensors and plain containers.
The official training files also hold an `argparse.Namespace` (MAE / DINO `args`)
and numpy scalars (nnU-Net `plot_stuff`), so exactly those globals are allow-listed.
Anything else needs the user's explicit `--trust-checkpoint`.
"""
from __future__ import annotations

import argparse
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError
from . import safe_pickle

SUFFIXES = {".pth", ".pt", ".bin", ".ckpt", ".model", ".safetensors"}


def _safe_globals():
    """Plain data only: numpy's names map to stand-ins that rebuild arrays from raw bytes
    (`safe_pickle`), never to numpy's own reconstructors."""
    stand_ins = safe_pickle.names()
    return [argparse.Namespace, safe_pickle.SafeDType, safe_pickle.RawArray, safe_pickle.NdarrayName,
            *((obj, name) for name, obj in stand_ins.items())]


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
            return safe_pickle.materialise(torch.load(path, map_location="cpu", weights_only=True))
    except pickle.UnpicklingError as e:
        what = _code_in(str(e)) or _code_opcode(path)
        if what is None:  # not a forbidden object: the bytes themselves are bad
            raise CheckpointError(f"cannot read checkpoint {path.name}: it is corrupt, truncated or not a "
                                  "PyTorch file", "copy the file again and compare its sha256") from e
        raise CheckpointError(
            f"{path.name} was refused: it contains code or objects that could run code when loaded ({what})",
            "if you trust where this file came from, pass --trust-checkpoint "
            "(Python: trust_checkpoint=True); better, re-save its state_dict as .safetensors") from None
    except CheckpointError:
        raise
    except Exception as e:  # zip reader errors, EOF, bad magic number
        raise CheckpointError(f"cannot read checkpoint {path.name}: it is corrupt, truncated or not a "
                              f"PyTorch file ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                              "copy the file again and compare its sha256 with the published one") from e


# What torch's weights-only unpickler says when a file asks for more than plain data
# (the operands are the opcodes that import or call: c i o b R NEWOBJ NEWOBJ_EX STACK_GLOBAL).
_CODE_SIGNS = (r"GLOBAL ([\w.]+) was not an allowed global", r"unsupported GLOBAL ([\w.]+)",
               r"Unsupported global: GLOBAL ([\w.]+)", r"reduce for unrecognized function (\S+)",
               r"(Unsupported operand (?:99|105|111|98|82|129|146|147)\b)", r"(Can only (?:build|create) [^.\n]+)",
               r"(Only persistent_load of storage[^.\n]*)", r"(Unsupported class [^\n]+)")


def _code_opcode(path: Path) -> str | None:
    """The first instruction of the file's pickle that imports a name, if any: torch may
    stop at an instruction it does not support before it reaches the import."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        else:
            data = path.read_bytes()[:1 << 20]
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST") and not str(arg).startswith(_PLAIN_MODULES):
                return f"{str(arg).replace(' ', '.')} ({op.name})"
            if op.name in ("STACK_GLOBAL", "OBJ"):
                return f"an object built by {op.name}"
    except Exception:  # noqa: BLE001 - unreadable bytes: the caller reports corruption
        return None
    return None


_PLAIN_MODULES = ("torch ", "collections OrderedDict", "_codecs encode", "argparse Namespace", "numpy")


def _code_in(message: str) -> str | None:
    for pattern in _CODE_SIGNS:
        found = re.search(pattern, message)
        if found:
            return found.group(1)[:120]
    return None


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
