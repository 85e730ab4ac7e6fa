"""`omedge verify`: hashes, then parity again on this machine, against the torch fp32
outputs stored in the bundle (so it needs no torch on the device)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .bundle import read_manifest, verify_files
from .parity import compare, gates_for


def verify(bundle, device: str = "cpu") -> dict:
    from .devices import plan
    from .runtime import load
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    verify_files(bundle, manifest)
    stored = np.load(bundle / manifest["verification"]["file"])
    inputs = stored["inputs"].astype(np.float32)
    reference = {k[4:]: stored[k] for k in stored.files if k.startswith("ref_")}
    candidates, skipped = plan(manifest["artifacts"], device)
    runs = []
    for art, backend, dev in candidates:
        p = load(bundle, device=dev, backend=backend, artifact=art["name"])
        result = compare(reference, p.run(inputs, batch_size=1), gates_for(art["precision"]))
        info = p.describe()
        row = {"artifact": art["name"], "backend": backend, "device": dev,
               "inference_precision": info.get("inference_precision"), "result":
               "pass" if result["passed"] else "FAIL: " + "; ".join(result["failures"]), "details": result}
        row["cosine_min"] = round(min(m["cosine_min"] for m in result["outputs"].values()), 6)
        if "logits" in result["outputs"]:
            row["top1_agreement"] = result["outputs"]["logits"]["top1_agreement"]
        runs.append(row)
    passed = bool(runs) and all(r["result"] == "pass" for r in runs)
    return {"bundle": str(bundle), "hashes": "ok", "files": len(manifest["files"]), "runs": runs,
            "skipped": skipped, "passed": passed}
