"""`omedge verify`: manifest and file hashes, then parity again on this machine against
the torch fp32 outputs stored in the bundle (so it needs no torch on the device), with
the bundle kind's own metric."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import BackendUnavailableError
from .kinds import get_kind
from .runtime.predictor import open_bundle


def verify(bundle, device: str = "cpu") -> dict:
    from .bundle import reading
    with reading(bundle):  # an overwrite waits: the reference and the graphs come from one export
        return _verify(bundle, device)


def _verify(bundle, device: str) -> dict:
    from .bundle import bundle_file
    from .runtime.plan import plan
    path, manifest = open_bundle(bundle)
    kind = get_kind(manifest.kind)
    stored = np.load(bundle_file(path, manifest.verification["file"], manifest), allow_pickle=False)
    # one run per artifact of the first graph; a multi-graph kind's predictor opens the
    # other graphs beside it and its verify() runs the whole chain
    candidates, skipped = plan(manifest.artifacts_for(manifest.roles()[0]), device)
    runs = []
    for art, backend, dev in candidates:
        try:
            p = kind.open(path, device=dev, backend=backend, artifact=art.name, **kind.verify_options(stored))
        except BackendUnavailableError as e:  # a later graph of a forced bundle has no verified artifact here
            runs.append({"artifact": art.name, "backend": backend, "device": dev, "inference_precision": None,
                         "result": f"FAIL: cannot open: {e.message}", "summary": "", "details": {}})
            continue
        result = kind.verify(p, stored, manifest)
        runs.append({"artifact": art.name, "backend": backend, "device": dev,
                     "inference_precision": p.describe().get("inference_precision"),
                     "result": "pass" if result["passed"] else "FAIL: " + "; ".join(result["failures"]),
                     "summary": _summary(result), **_headline(result), "details": result})
    return {"bundle": str(Path(bundle)), "hashes": "ok", "files": len(manifest.files),
            "signature": getattr(manifest, "signature", None), "runs": runs,
            "skipped": skipped, "passed": bool(runs) and all(r["result"] == "pass" for r in runs)}


def _headline(result: dict) -> dict:
    """The gated figures as flat columns: worst cosine, top-1 agreement, Dice, Spearman."""
    outs = result.get("outputs", {}).values()
    row = {}
    for key, pick in (("cosine_min", min), ("top1_agreement", min), ("spearman_min", min), ("mask_iou_min", min)):
        values = [m[key] for m in outs if key in m]
        if values:
            row[key] = round(pick(values), 6)
    if "volume_dice" in result:
        row["dice_min"] = round(result["volume_dice"]["min"], 4)
    for key in ("argmax_agreement", "top8_logit_max_abs", "gate"):  # text generation
        if key in result:
            row[key] = result[key]
    return row


def _summary(result: dict) -> str:
    """The headline figures of a kind's parity record, for the table."""
    parts = []
    for name, met in result.get("outputs", {}).items():
        for key in ("cosine_min", "top1_agreement", "spearman_min", "abs_error_max_c", "mask_iou_min"):
            if key in met:
                parts.append(f"{name} {key} {met[key]:.6g}")
    if "volume_dice" in result:
        parts.append(f"Dice min {result['volume_dice']['min']:.4f}")
    if "argmax_agreement" in result:
        parts.append(f"argmax agreement {result['argmax_agreement']:.4f} (gate {result['gate']}), "
                     f"top-8 logit max abs {result['top8_logit_max_abs']:.3g}")
    return "; ".join(parts)
