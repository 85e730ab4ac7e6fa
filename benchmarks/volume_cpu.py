"""Whole-volume CT segmentation on this CPU, in one run: a 1.5 mm CT-like phantom of
256x256x160 voxels, nnU-Net sliding window (step 0.5, Gaussian sigma = patch/8, no
mirroring unless --tta) with torch fp32 eager and with omedge bundles. Each variant runs
in its own process (own peak RSS). An artifact that failed its export gate is refused by
the runtime; here it is still timed, straight on its backend, and marked as such. Prints
seconds, voxels/s, speed-up, peak RSS, the share of the machine's matmul ceiling for the row's precision, and
per-class Dice against torch fp32; for INT8, what accuracy-aware quantization did.

The weights: no STU-Net checkpoint can be downloaded here. A fully random 105-way head
has near-ties between classes at almost every voxel, so rounding alone flips ~1% of
voxels and no bundle could pass (or show) a Dice gate. The backbone stays random
(seed 0), but the full-resolution head `seg_outputs.4` is fitted, as a linear probe on
the backbone's features, to the phantom's 5 tissue classes: the logits then have the
decisive margins of a trained segmenter, and the Dice numbers mean what they would mean
for real weights. Speed does not depend on the values of the weights."""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import matmul_ceiling, precision_of

# Tissues of runtime.volume.synthetic_ct by HU level (levels closer than the phantom's
# noise are merged) -> the STU-Net class ids that stand for them (arbitrary but fixed:
# the names matter neither for speed nor for agreement)
TISSUE_LEVELS = ((-1000,), (-80,), (40, 60, 120), (250,), (700, 900))
TISSUE_CLASS = (0, 40, 68, 3, 74)

WORKER = r"""
import json, sys, time
import numpy as np
from omedge.io.volume import Volume
from omedge.runtime.volume import segment
target, npz, pre, artifact, out, mode, tta = sys.argv[1:8]
data = np.load(npz)
vol = Volume(data["ct"].astype(np.float32), data["affine"], "phantom")
pre = json.loads(pre)
if target.endswith(".model"):
    import torch
    import omedge.models as models
    torch.set_num_threads(int(sys.argv[8]))
    model = models.load(models.get_spec("stu-net"), target, "B")[0]
    def run(b):
        with torch.inference_mode():
            return model(torch.from_numpy(b))["logits"].numpy()
    info = {"backend": "torch " + torch.__version__, "precision": "fp32", "exec": "fp32", "gate": True}
    batch = 1
else:
    from pathlib import Path
    from omedge.bundle import read_manifest
    art = next(a for a in read_manifest(target).to_dict()["artifacts"] if a["name"] == artifact)
    if art["parity"]["passed"]:
        import omedge
        p = omedge.load(target, artifact=artifact, mode=mode)
        run = lambda b: p.run(b, batch_size=1)["logits"]
        d = p.describe()
    else:  # the runtime refuses it: measured for speed only, its Dice is in the table
        from omedge.runtime.backend import backend_class
        name = art.get("verified_backends", [None])[0] if art.get("verified_backends") else "openvino"
        r = backend_class(name)({"model": Path(target) / art["entry"]}, "cpu",
                                {**art["runtime"].get(name, {}), "mode": mode})
        run = lambda b: np.concatenate([o["logits"] for o in r.run_many([{"volume": x[None]} for x in b])])
        d = r.describe()
    info = {"backend": d["backend"], "precision": d["precision"] if "precision" in d else art["precision"],
            "exec": d.get("inference_precision"), "streams": d.get("streams"), "gate": art["parity"]["passed"]}
    batch = 2 if mode == "throughput" else 1
t = time.perf_counter()
if target.endswith(".model"):  # nnU-Net's own way: the whole volume's logits, then argmax
    from omedge.parity import logit_scale, top2_margin
    from omedge.runtime.volume import back_to_input, class_argmax, sliding_window, to_model_space
    x, _ = to_model_space(vol, pre)
    logits = sliding_window(x, run, pre["patch_size"], pre.get("step", 0.5), 1, tta == "tta",
                            pre.get("gaussian_sigma_scale", 0.125))
    labels = back_to_input(class_argmax(logits), vol)
    secs = time.perf_counter() - t
    np.save(out[:-4] + "-margin.npy", back_to_input(top2_margin(logits), vol))  # what the export gate uses
    info["logit_scale"] = logit_scale(logits)
    del logits
else:
    labels = segment(vol, run, pre, batch_size=batch, mirror=tta == "tta", accumulator=sys.argv[9])
    info["accumulator"] = sys.argv[9]
    secs = time.perf_counter() - t
np.save(out, labels)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({**info, "seconds": secs, "peak_rss_mb": int(hwm) / 1024}))
"""


def fit_phantom_head(model, pre, seed: int = 5, steps: int = 300):
    """Fit seg_outputs.4 (1x1 conv) to the phantom tissues by softmax regression on the
    backbone's full-resolution features (numpy, Adam, a voxel sample per class)."""
    import torch

    from omedge.runtime.volume import synthetic_ct, to_model_space
    phantom = synthetic_ct(seed=seed)  # 96x96x80 -> (80, 96, 96): divisible by (16, 16, 32)
    x, _ = to_model_space(phantom, pre)
    hu = phantom.data.transpose(2, 1, 0)
    levels = np.array([hu for group in TISSUE_LEVELS for hu in group], np.float32)
    group_of = np.array([g for g, group in enumerate(TISSUE_LEVELS) for _ in group])
    target = group_of[np.abs(hu[..., None] - levels).argmin(-1).ravel()]
    feats = {}
    hook = model.conv_blocks_localization[-1].register_forward_hook(lambda m, i, o: feats.update(f=o))
    with torch.inference_mode():
        model(torch.from_numpy(x[None]))
    hook.remove()
    f = feats["f"][0].flatten(1).T.numpy()  # (voxels, channels)
    rng = np.random.default_rng(seed)
    pick = np.concatenate([rng.choice(np.flatnonzero(target == c), min(20000, (target == c).sum()), replace=False)
                           for c in np.unique(target)])
    mu, sd = f[pick].mean(0), f[pick].std(0) + 1e-6
    z, y = (f[pick] - mu) / sd, target[pick]
    w, b = np.zeros((z.shape[1], len(TISSUE_LEVELS))), np.zeros(len(TISSUE_LEVELS))
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    onehot = np.eye(len(TISSUE_LEVELS))[y]
    for t in range(1, steps + 1):
        logits = z @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(y)
        for i, grad in enumerate((z.T @ g, g.sum(0))):
            m[i] = 0.9 * m[i] + 0.1 * grad
            v[i] = 0.999 * v[i] + 0.001 * grad ** 2
            step = 0.05 * (m[i] / (1 - 0.9 ** t)) / (np.sqrt(v[i] / (1 - 0.999 ** t)) + 1e-8)
            (w.__isub__ if i == 0 else b.__isub__)(step)
    accuracy = float(((z @ w + b).argmax(1) == y).mean())
    head = model.seg_outputs[-1]
    weight = np.zeros(head.weight.shape[:2], np.float32)
    bias = np.full(head.bias.shape, -30.0, np.float32)  # the other classes never win
    for k, c in enumerate(TISSUE_CLASS):
        weight[c] = w[:, k] / sd
        bias[c] = b[k] - (w[:, k] * mu / sd).sum()
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight).view_as(head.weight))
        head.bias.copy_(torch.from_numpy(bias))
    return accuracy


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="256,256,160")
    ap.add_argument("--formats", default="openvino")
    ap.add_argument("--precisions", default="fp32,int8", help="comma list of fp32, fp16, bf16, int8")
    ap.add_argument("--calib-size", type=int, default=8)
    ap.add_argument("--tta", action="store_true", help="8-way mirroring on every side (8x the work)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the machine's cores)")
    ap.add_argument("--accumulator", choices=("float32", "float16"), default="float32",
                    help="the bundles' class-score accumulator (torch keeps nnU-Net's full float32 logits)")
    ap.add_argument("--workdir", help="keep bundles and label maps here")
    ap.add_argument("--json")
    ap.add_argument("--plain-int8", action="store_true",
                    help="INT8 without accuracy control (plain nncf.quantize), for comparison")
    ap.add_argument("--int8-max-drop", type=float,
                    help="accuracy control's allowed drop of the window Dice (default: the volume kind's, 0.02)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep bundles already in --workdir from an earlier run (same seed, same fitted head)")
    args = ap.parse_args()
    import torch

    import omedge.models as models
    from omedge.bundle import read_manifest
    from omedge.parity import decisive_threshold, dice_scores
    from omedge.runtime.volume import dice_per_class, synthetic_ct
    shape = tuple(int(s) for s in args.shape.split(","))
    tag = ""
    if args.plain_int8:  # the volume kind without its quantization metric: what exports did before
        from omedge.kinds.volume import VolumeKind
        VolumeKind.quantization_metric = lambda self: None
        tag = "-plain"
    elif args.int8_max_drop is not None:
        from omedge.kinds.volume_parity import WindowDice
        WindowDice.max_drop = args.int8_max_drop
        tag = f"-drop{args.int8_max_drop:g}"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(args.workdir or tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        ct = synthetic_ct(shape, seed=11)
        np.savez(tmp / "ct.npz", ct=ct.data, affine=ct.affine)
        spec = models.get_spec("stu-net")
        model = models.build(spec, "B", seed=0)
        t = time.perf_counter()
        acc = fit_phantom_head(model, spec.preprocess)
        print(f"head fitted to the phantom tissues in {time.perf_counter() - t:.0f} s (voxel accuracy {acc:.3f})")
        ckpt = tmp / "stunet-b-phantom.model"  # nnU-Net v1 layout
        torch.save({"state_dict": model.state_dict(), "epoch": 0}, ckpt)
        del model
        runs = [("torch fp32 eager", str(ckpt), "-", "latency")]
        bundle = export_bundles(args, ckpt, tmp, tag, runs)
        pre = read_manifest(bundle).to_dict()["preprocess"]
        rows, ref = [], None
        for name, target, artifact, mode in runs:
            out = tmp / f"labels-{len(rows)}.npy"
            r = subprocess.run([sys.executable, "-c", WORKER, target, str(tmp / "ct.npz"), json.dumps(pre), artifact,
                                str(out), mode, "tta" if args.tta else "-", str(args.threads), args.accumulator],
                               capture_output=True, text=True)
            if r.returncode != 0:
                rows.append({"variant": name, "error": r.stderr.strip().splitlines()[-1][:200]})
                print(f"{name}: {rows[-1]['error']}")
                continue
            row = {"variant": name, **json.loads(r.stdout.strip().splitlines()[-1])}
            labels = np.load(out)
            if ref is None:
                ref, margin, scale = labels, np.load(str(out)[:-4] + "-margin.npy"), row["logit_scale"]
            dice = dice_per_class(ref, labels)
            row["dice_min"] = min(dice.values()) if dice else 1.0
            # the export gate's metric on this volume: voxels whose torch top-1/top-2 margin
            # is above the share of the logit scale that the row's precision may round away
            gate = next((g for g in ("int8", "bf16", "fp16") if g in name), "fp32")
            decisive = margin > decisive_threshold(scale, gate)
            gated = dice_scores(ref, labels, decisive)
            row["dice_decisive_min"] = min(gated.values()) if gated else 1.0
            row["decisive_voxel_share"] = float(decisive.mean())
            row["voxel_agreement"] = float((ref == labels).mean())
            row["voxels_per_s"] = float(np.prod(shape)) / row["seconds"]
            rows.append(row)
            print(f"{name}: {row['seconds']:.1f} s, Dice min {row['dice_min']:.4f} (all voxels), "
                  f"{row['dice_decisive_min']:.4f} (decisive: {row['decisive_voxel_share']:.1%} of voxels)")
    gflop = conv_gflop_per_window(pre["patch_size"])
    windows = n_windows(shape, pre)
    ceiling = matmul_ceiling(args.threads)
    base = rows[0]["seconds"]
    print(f"\nSTU-Net-B, phantom {shape} voxels at 1.5 mm, {windows} windows of {pre['patch_size']} (step 0.5)"
          f"{', 8-way TTA' if args.tta else ''}; {gflop:.0f} GFLOP per window; matmul ceiling (torch, G(FL)OP/s) "
          + ", ".join(f"{k} {v:.0f}" for k, v in ceiling.items()))
    print("| variant | runs on | export gate | seconds | Mvoxel/s | speed-up | peak RSS MB | GFLOP/s (share of "
          "its precision's ceiling) | Dice min, all voxels | Dice min, decisive voxels (the gate's metric) | "
          "voxel agreement |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | ERROR {r['error']} |")
            continue
        rate = gflop * windows * (8 if args.tta else 1) / r["seconds"]
        prec = precision_of(r["variant"], {"inference_precision": r.get("exec")})
        gate = "-" if r["variant"].startswith("torch") else ("passed" if r["gate"] else "FAILED (speed only)")
        print(f"| {r['variant']} | {r['backend']} {r.get('exec') or ''} | {gate} | {r['seconds']:.1f} | "
              f"{r['voxels_per_s'] / 1e6:.3f} | {base / r['seconds']:.2f}x | {r['peak_rss_mb']:.0f} | "
              f"{rate:.0f} ({rate / ceiling[prec]:.0%} of {prec}) | {r['dice_min']:.4f} | "
              f"{r['dice_decisive_min']:.4f} ({r['decisive_voxel_share']:.1%}) | {r['voxel_agreement']:.5f} |")
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=2)


def export_bundles(args, ckpt, tmp, tag: str, runs: list) -> Path:
    """Export (or with --reuse, keep) one bundle per precision; append its runs; return the last."""
    import omedge
    from omedge.bundle import read_manifest
    for precision in args.precisions.split(","):
        t = time.perf_counter()
        bundle = tmp / f"stunet-b-{precision}{tag if precision == 'int8' else ''}.omedge"
        if args.reuse and (bundle / "manifest.json").is_file():
            print(f"reusing {bundle} (its export time is not measured again)")
        else:
            bundle = omedge.export("stu-net", ckpt, variant="B", formats=args.formats.split(","),
                                   precision=precision, calib="synthetic" if precision == "int8" else None,
                                   calib_size=args.calib_size, out=bundle, overwrite=True, force=True, log=print)
            print(f"export {precision} took {time.perf_counter() - t:.0f} s")
        for a in read_manifest(bundle).to_dict()["artifacts"]:
            par = a["parity"]
            quantization_summary(a.get("quantization"))
            print(f"  {a['name']}: export gate {'passed' if par['passed'] else 'FAILED'}, window cosine "
                  f"{par['outputs']['logits']['cosine_min']:.6f}, phantom Dice min "
                  f"{par.get('volume_dice', {}).get('min', float('nan')):.4f}")
            runs.append((f"{a['format']} {a['precision']}", str(bundle), a["name"], "latency"))
            if a["format"] == "openvino" or "openvino" in a.get("verified_backends", []):
                runs.append((f"{a['format']} {a['precision']} 2 streams", str(bundle), a["name"], "throughput"))
    return bundle


def quantization_summary(q: dict | None) -> None:
    """What accuracy-aware INT8 did (kinds with a quantization metric): the metric before
    and after, the iterations, the layers it left in float."""
    ac = (q or {}).get("accuracy_control")
    if not ac:
        return
    print(f"  accuracy control: {ac['metric']}: float {ac['float']}, plain INT8 {ac['before']}, result {ac['after']} "
          f"(f32 float layers {ac['after_f32']}; target {ac['target']}, reached {ac['reached']}) after "
          f"{ac['iterations']} iterations, {ac['evaluations']} evaluations on {ac['validation_windows']} windows "
          f"{ac['validation_input']}, {ac['seconds']:.0f} s")
    print(f"  {len(q['float_layers'])} layers in float: {', '.join(q['float_layers'])}")


def n_windows(shape, pre) -> int:
    from omedge.runtime.volume import window_starts
    zyx = [int(round(s * 1.5 / t)) for s, t in zip(shape[::-1], pre["target_spacing"])]
    return int(np.prod([len(window_starts(max(s, p), p, 0.5)) for s, p in zip(zyx, pre["patch_size"])]))


def conv_gflop_per_window(patch) -> float:
    """Multiply-adds x 2 of every Conv3d in STU-Net-B on one patch, counted with hooks
    on a meta-device copy (no memory, no time)."""
    import torch

    import omedge.models as models
    total = []
    with torch.device("meta"):
        model = models.build(models.get_spec("stu-net"), "B")

    def count(m, i, o):
        total.append(2 * o.numel() * m.weight[0].numel())
    for m in model.modules():
        if isinstance(m, torch.nn.Conv3d):
            m.register_forward_hook(count)
    with torch.no_grad():
        model(torch.empty(1, 1, *patch, device="meta"))
    return sum(total) / 1e9


if __name__ == "__main__":
    main()
