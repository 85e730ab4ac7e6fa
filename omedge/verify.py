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
    if manifest["model"]["task"] == "text-generation":
        return verify_llm(bundle, manifest, device)
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
        if "phantom" in stored.files:  # segmentation: the whole-volume pipeline again
            from .io.volume import Volume
            from .runtime.volume import volume_dice
            phantom = Volume(stored["phantom"].astype(np.float32), stored["phantom_affine"], "stored phantom")
            dice, failures = volume_dice(lambda b: p.run(b, batch_size=2)["logits"], phantom,
                                         stored["phantom_labels"], manifest["preprocess"], art["precision"])
            row["dice_min"] = round(dice["min"], 4)
            if failures:
                row["result"] = "FAIL: " + "; ".join(failures)
        row["cosine_min"] = round(min(m["cosine_min"] for m in result["outputs"].values()), 6)
        if "top1_agreement" in result["outputs"].get("logits", {}):
            row["top1_agreement"] = result["outputs"]["logits"]["top1_agreement"]
        runs.append(row)
    passed = bool(runs) and all(r["result"] == "pass" for r in runs)
    return {"bundle": str(bundle), "hashes": "ok", "files": len(manifest["files"]), "runs": runs,
            "skipped": skipped, "passed": passed}


def verify_llm(bundle: Path, manifest: dict, device: str) -> dict:
    """Re-run the stored prompt ids through llama.cpp; compare the argmax and the
    reference's top-8 logits stored at export."""
    from .runtime.llm import LLMPredictor
    stored = np.load(bundle / manifest["verification"]["file"])
    ids, offsets = stored["ids"], stored["offsets"]
    p = LLMPredictor(bundle, device=device, n_ctx=int(np.diff(offsets).max()) + 8, logits_all=True)
    agree, errs = [], []
    for i in range(len(offsets) - 1):
        seq = ids[offsets[i]:offsets[i + 1]].tolist()
        p.llm.reset()
        p.llm.eval(seq)
        logits = np.array(p.llm.scores[:len(seq)], dtype=np.float32)
        top_ids = stored["top_ids"][offsets[i]:offsets[i + 1]]
        agree.append(logits.argmax(-1) == top_ids[:, 0])
        errs.append(np.abs(np.take_along_axis(logits, top_ids, -1) - stored["top_logits"][offsets[i]:offsets[i + 1]]))
    art = p.artifact
    gate = art["parity"]["gate"]["min"]
    agreement = float(np.concatenate(agree).mean())
    row = {"artifact": art["name"], "backend": "llama.cpp", "device": p.backend.device,
           "argmax_agreement": agreement, "top8_logit_max_abs": float(np.concatenate(errs).max()),
           "gate": gate, "result": "pass" if agreement >= gate else f"FAIL: argmax agreement {agreement:.4f} < {gate}"}
    return {"bundle": str(bundle), "hashes": "ok", "files": len(manifest["files"]), "runs": [row],
            "skipped": p.skipped, "passed": row["result"] == "pass"}
