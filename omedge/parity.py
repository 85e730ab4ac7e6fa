"""Parity metrics, gates and the stored verification samples (numpy only, so `omedge
verify` runs on the device). Each kind picks its metric; the numbers live here."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Tensor gates per gate class (formats.Recipe.gate): the minimum per-sample cosine of
# every output, and for classifier logits the share of samples whose top-1 class
# matches the torch fp32 model. A spec's `parity` overrides these per gate class.
TENSOR_GATES = {
    "fp32": {"cosine_min": 0.9999, "top1_agreement": 1.0},
    "fp16": {"cosine_min": 0.999, "top1_agreement": 0.99},
    "bf16": {"cosine_min": 0.999, "top1_agreement": 0.99},
    "int8": {"cosine_min": 0.99, "top1_agreement": 0.95},
}


def gates_for(gate: str, overrides: dict | None = None, table: dict = TENSOR_GATES) -> dict:
    return {**table[gate], **(overrides or {}).get(gate, {})}


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine. Two all-zero rows agree (1.0); a zero row against a non-zero one
    does not (0.0), so an artifact that outputs zeros cannot pass."""
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = (a * b).sum(axis=1) / np.maximum(na * nb, 1e-300)
    return np.where(both_zero, 1.0, np.where((na == 0) | (nb == 0), 0.0, cos))


def compare(reference: dict, candidate: dict, gates: dict, classify: tuple[str, ...] = ()) -> dict:
    """Outputs compared by name: cosine for all, top-1 agreement for `classify` ones."""
    result = {"gates": gates, "outputs": {}, "failures": []}
    for name, ref in reference.items():
        if name not in candidate:
            result["failures"].append(f"output '{name}' missing")
            continue
        out, ref = np.asarray(candidate[name], np.float32), np.asarray(ref, np.float32)
        if out.shape != ref.shape:
            result["failures"].append(f"output '{name}' has shape {out.shape}, reference {ref.shape}")
            continue
        if not np.isfinite(out).all():
            result["failures"].append(f"{name}: {int((~np.isfinite(out)).sum())} NaN/Inf values")
            continue
        cos = cosine_rows(ref, out)
        m = {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
             "max_abs": float(np.abs(ref - out).max()), "ref_max_abs": float(np.abs(ref).max())}
        if m["cosine_min"] < gates["cosine_min"]:
            result["failures"].append(f"{name}: cosine {m['cosine_min']:.6f} < {gates['cosine_min']}")
        if name in classify:
            m["top1_agreement"] = float((ref.argmax(-1) == out.argmax(-1)).mean())
            if m["top1_agreement"] < gates["top1_agreement"]:
                result["failures"].append(f"{name}: top-1 agreement {m['top1_agreement']:.3f} "
                                          f"< {gates['top1_agreement']}")
        result["outputs"][name] = m
    result["passed"] = not result["failures"]
    return result


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, np.float64).ravel()
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.bincount(inv, weights=r)
        return sums[inv] / counts[inv]
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else 1.0


def concat(samples: list[dict]) -> dict:
    return {k: np.concatenate([s[k] for s in samples]) for k in samples[0]}


def as_stored(feed: dict) -> dict:
    """A feed as parity.npz keeps it: float inputs rounded to float16 (and back to float32)."""
    return {k: v.astype(np.float16).astype(np.float32) if v.dtype.kind == "f" else v for k, v in feed.items()}


class SamplesOnDisk(Sequence):
    """Reference outputs too large to hold through an export (a volume window's 105-class
    logits: 0.9 GB each), moved to .npy files in `folder` and memory-mapped read-only
    only while a caller holds an item: the backend runs that verification makes then do
    not sit beside them in RAM (STU-Net-B: 1.8 GB of the export's peak)."""

    def __init__(self, folder: Path, samples: list[dict]):
        """Takes the samples out of `samples` one by one, so each is freed once written."""
        folder.mkdir()
        self.folder, self.names = folder, []
        while samples:
            sample = samples.pop(0)
            for j, value in enumerate(sample.values()):
                np.save(folder / f"{len(self.names)}.{j}.npy", np.asarray(value), allow_pickle=False)
            self.names.append(list(sample))
            del sample

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict:
        return {name: np.load(self.folder / f"{i}.{j}.npy", mmap_mode="r")
                for j, name in enumerate(self.names[i])}


def save_samples(path, inputs: list[dict], reference: list[dict], extra: dict | None = None, float16=True):
    """parity.npz: sample i's inputs as `in.i.NAME`, its torch outputs as `ref.i.NAME`."""
    arrays = {}
    for i, (feed, ref) in enumerate(zip(inputs, reference)):
        for k, v in feed.items():
            arrays[f"in.{i}.{k}"] = v.astype(np.float16) if float16 and v.dtype.kind == "f" else v
        for k, v in ref.items():
            arrays[f"ref.{i}.{k}"] = v
    np.savez_compressed(path, **arrays, **(extra or {}))


def load_samples(stored) -> tuple[list[dict], list[dict]]:
    """Inverse of save_samples; float16 inputs come back as float32. Anything but plain
    numeric arrays under `in.N.NAME` / `ref.N.NAME` keys (an object array, which
    np.load(allow_pickle=False) refuses, a bad key) is a damaged bundle."""
    inputs, reference = {}, {}
    for key in stored.files:
        part, _, rest = key.partition(".")
        if part in ("in", "ref"):
            i, _, name = rest.partition(".")
            arr = stored_array(stored, key)
            if not i.isdigit() or not name:
                raise _damaged(f"key '{key}' is not in.N.NAME / ref.N.NAME")
            if part == "in" and arr.dtype == np.float16:
                arr = arr.astype(np.float32)
            (inputs if part == "in" else reference).setdefault(int(i), {})[name] = arr
    order = sorted(inputs)
    if order != sorted(reference):
        raise _damaged("its inputs and reference outputs are not paired")
    return [inputs[i] for i in order], [reference[i] for i in order]


def stored_array(stored, key: str) -> np.ndarray:
    """One array of parity.npz: numeric (bool, int, float), never objects or strings."""
    try:
        arr = np.asarray(stored[key])
    except (ValueError, OSError, EOFError) as e:  # object arrays, truncated or corrupt members
        raise _damaged(f"'{key}' cannot be read without unpickling or is corrupt ({e})") from e
    if arr.dtype.kind not in "biuf":
        raise _damaged(f"'{key}' holds {arr.dtype} values, not numbers")
    return arr


def _damaged(what: str):
    from .errors import BundleIntegrityError
    return BundleIntegrityError(f"the bundle's verification data (parity.npz) is damaged: {what}",
                                "re-export the bundle, or copy it again from its source")


# Decisive voxels: a reference top-1 minus top-2 logit margin above this share of the
# reference logit scale (the RMS spread of the class scores). Below it the two leading
# classes are a near-tie that rounding of that precision may flip without being wrong
# (random 105-class heads make most voxels such ties); per precision, several times the
# relative error its gate allows.
DECISIVE_MARGIN = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 3e-2, "int8": 0.1}


def top2_margin(logits: np.ndarray, axis: int = 0, slab: int = 8) -> np.ndarray:
    """top-1 minus top-2 logit along `axis` (classes), a few slices of the next axis at a
    time (a 105-class volume is large)."""
    logits = np.moveaxis(logits, axis, 0)
    if logits.shape[0] < 2:
        return np.full(logits.shape[1:], np.inf, np.float32)
    out = np.empty(logits.shape[1:], np.float32)
    for z in range(0, logits.shape[1], slab):
        part = np.partition(logits[:, z:z + slab], -2, axis=0)
        out[z:z + slab] = part[-1] - part[-2]
    return out


def logit_scale(logits: np.ndarray, axis: int = 0) -> float:
    """RMS over voxels of the class scores' standard deviation: the unit of the margin."""
    logits = np.moveaxis(logits, axis, 0)
    var = sum(float(logits[:, z:z + 8].astype(np.float64).var(axis=0).sum()) for z in range(0, logits.shape[1], 8))
    return float(np.sqrt(var / max(1, int(np.prod(logits.shape[1:])))))


def decisive_share(gate: str) -> float:
    return DECISIVE_MARGIN.get(gate, DECISIVE_MARGIN["int8"])


def decisive_threshold(scale: float, gate: str) -> float:
    """The margin a voxel needs to count as decisive, in logits."""
    return float(decisive_share(gate) * scale)


def dice_scores(ref: np.ndarray, got: np.ndarray, mask: np.ndarray | None = None, min_voxels: int = 10) -> dict:
    """Dice per foreground class present in the reference (at least min_voxels), over the
    voxels in `mask` (all when None). Keys are the class ids as strings, as JSON keeps
    them, so the manifest reads back (and hashes) as written."""
    if mask is not None:
        ref, got = ref[mask], got[mask]
    out = {}
    ids, counts = np.unique(ref, return_counts=True)
    for i, c in zip(ids.tolist(), counts.tolist()):
        if i == 0 or c < min_voxels:
            continue
        a, b = ref == i, got == i
        out[str(int(i))] = float(2 * (a & b).sum() / (a.sum() + b.sum()))
    return out
