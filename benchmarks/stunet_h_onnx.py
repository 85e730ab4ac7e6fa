"""STU-Net-H (1.46 B parameters, 5.8 GB of fp32 weights) through ONNX's external-data
path at its real size: export time and peak RSS, the files written, and parity of
onnxruntime and OpenVINO (f32) against torch on a small volume (seeded random weights;
a 128^3 window of H costs minutes on a laptop CPU, and the path under test is the
weights file, not the window size). Each step runs in its own process."""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

STEP = r"""
import json, sys, time
import numpy as np
step, folder = sys.argv[1], sys.argv[2]
shape = (1, 1, 32, 64, 64)
x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
t = time.perf_counter()
out = {}
if step == "export":
    import torch
    import omedge.models as models
    from omedge.exporters.onnx import export_onnx
    model = models.build(models.get_spec("stu-net"), "H", seed=0)
    out["parameters"] = sum(p.numel() for p in model.parameters())
    with torch.inference_mode():
        np.save(folder + "/ref.npy", model(torch.from_numpy(x))["logits"].numpy())
    t = time.perf_counter()
    out["record"] = export_onnx(model, torch.from_numpy(x), __import__("pathlib").Path(folder) / "model.onnx",
                                [i.to_dict() for i in models.get_spec("stu-net").inputs],
                                [o.to_dict() for o in models.get_spec("stu-net").outputs])
else:
    from omedge.parity import cosine_rows
    if step == "onnxruntime":
        import onnxruntime as ort
        got = ort.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"]).run(
            None, {"volume": x})[0]
    else:
        import openvino as ov
        core = ov.Core()
        got = core.compile_model(core.read_model(folder + "/model.onnx"), "CPU",
                                 {"INFERENCE_PRECISION_HINT": "f32"})({0: x})[0]
    ref = np.load(folder + "/ref.npy")
    out["cosine"] = float(cosine_rows(ref, got)[0])
    out["voxel_agreement"] = float((ref.argmax(1) == got.argmax(1)).mean())
out["seconds"] = time.perf_counter() - t
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
out["peak_rss_mb"] = int(hwm) / 1024
print(json.dumps(out))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.workdir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for step in ("export", "onnxruntime", "openvino"):
            r = subprocess.run([sys.executable, "-c", STEP, step, str(folder)], capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{step}: FAILED\n{r.stderr[-1500:]}")
                return 1
            res = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{step}: {json.dumps(res)}")
            if step == "export":
                print("files:", {p.name: f"{p.stat().st_size / 1e6:.1f} MB" for p in sorted(folder.iterdir())})


if __name__ == "__main__":
    sys.exit(main())
