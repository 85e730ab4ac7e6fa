"""Parity metrics and gates (numpy only, so `omedge verify` runs on the device)."""
from __future__ import annotations

import numpy as np

# Gates per precision: the minimum per-sample cosine of every output, and for
# classifier logits the share of inputs whose top-1 class matches the torch fp32 model.
DEFAULT_GATES = {
    "fp32": {"cosine_min": 0.9999, "top1_agreement": 1.0},
    "fp16": {"cosine_min": 0.999, "top1_agreement": 0.99},
    "bf16": {"cosine_min": 0.999, "top1_agreement": 0.99},
    "int8": {"cosine_min": 0.99, "top1_agreement": 0.95},
}


# Whole-volume segmentation: per-class Dice against the torch fp32 pipeline (classes
# present in the reference label map).
DICE_GATES = {"fp32": 0.99, "fp16": 0.99, "bf16": 0.99, "int8": 0.95}


def gates_for(precision: str) -> dict:
    return dict(DEFAULT_GATES["int8" if precision.startswith("int8") else precision])


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(denom > 0, (a * b).sum(axis=1) / np.maximum(denom, 1e-300), 1.0)


def compare(reference: dict, candidate: dict, gates: dict) -> dict:
    """Compare outputs by name; returns metrics, the gates used and `passed`."""
    result = {"gates": gates, "outputs": {}, "passed": True, "failures": []}
    for name, ref in reference.items():
        if name not in candidate:
            result["passed"] = False
            result["failures"].append(f"output '{name}' missing")
            continue
        out = np.asarray(candidate[name], np.float32)
        ref = np.asarray(ref, np.float32)
        if out.shape != ref.shape:
            result["passed"] = False
            result["failures"].append(f"output '{name}' has shape {out.shape}, reference {ref.shape}")
            continue
        cos = cosine_rows(ref, out)
        m = {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
             "max_abs": float(np.abs(ref - out).max()),
             "ref_max_abs": float(np.abs(ref).max())}
        if m["cosine_min"] < gates["cosine_min"] or not np.isfinite(out).all():
            result["failures"].append(f"{name}: cosine {m['cosine_min']:.6f} < {gates['cosine_min']}")
        if name == "logits" and ref.ndim > 2:
            # segmentation logits (N, K, D, H, W): voxel agreement is reported here; the
            # gate is per-class Dice of the whole-volume pipeline
            m["voxel_agreement"] = float((ref.argmax(1) == out.argmax(1)).mean())
        elif name == "logits":
            m["top1_agreement"] = float((ref.argmax(-1) == out.argmax(-1)).mean())
            if m["top1_agreement"] < gates["top1_agreement"]:
                result["failures"].append(f"{name}: top-1 agreement {m['top1_agreement']:.3f} "
                                          f"< {gates['top1_agreement']}")
        result["outputs"][name] = m
    result["passed"] = not result["failures"]
    return result
