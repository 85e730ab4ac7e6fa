"""`omedge bench`: one table of backend x precision with size, latency, throughput,
peak RSS and parity. Each variant runs in its own process, so peak RSS is its own and
two runtimes never spin threads against each other. Run side: no torch import here
(the torch baseline worker imports it only in its own process)."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .errors import OmedgeError
from .manifest import read_manifest


def _stats(times: list[float], batch: int) -> dict:
    t = np.asarray(times) * 1000
    return {"p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99)),
            "mean_ms": float(t.mean()), "throughput": float(batch * 1000 / t.mean())}


def _peak_rss_mb() -> float:
    """This process's own peak RSS. Linux carries ru_maxrss over an exec (the worker
    would report its parent's peak), so read the memory map's high-water mark."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, x, warmup, runs, seconds):
    for _ in range(warmup):
        fn(x)
    times, start = [], time.perf_counter()
    while len(times) < runs or (time.perf_counter() - start < seconds and len(times) < 10 * runs):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return times


def _stored(bundle):
    """The stored verification inputs of the first graph as one batch {name: array}, and the
    reference. Variable-length inputs (sequences) cannot be stacked: then the first sample."""
    from .parity import load_samples
    m = read_manifest(bundle)
    names = m.artifacts_for(m.roles()[0])[0].inputs
    inputs, reference = load_samples(np.load(Path(bundle) / "parity.npz", allow_pickle=False))
    return inputs, reference, _batch_of(inputs, names)


def _batch_of(feeds: list[dict], names) -> dict:
    if any(f[n].shape != feeds[0][n].shape for f in feeds for n in names):
        return {n: feeds[0][n] for n in names}
    return {n: np.concatenate([f[n] for f in feeds]) for n in names}


def _repeat(x: dict, n: int) -> dict:
    """The batch cycled to n items."""
    count = len(next(iter(x.values())))
    return {k: np.concatenate([v] * (n // count + 1))[:n] for k, v in x.items()}


def worker_bundle(bundle, artifact, backend, device, batch, runs, warmup, seconds, threads, mode="latency") -> dict:
    from .kinds import get_kind
    from .kinds.base import gate_class
    from .runtime import load
    p = load(bundle, device=device, backend=backend, threads=threads, artifact=artifact, mode=mode)
    inputs, reference, x_all = _stored(bundle)
    count = len(next(iter(x_all.values())))
    x = _repeat(x_all, batch)
    if mode == "throughput":  # many single-image requests in flight: items/s over a stream of inputs
        n_stream = count * max(1, 8 // count)
        stream = _repeat(x_all, n_stream)
        times = [t / n_stream for t in _timed(lambda a: p.run(a, batch_size=1), stream, 1, max(3, runs // 8),
                                                  seconds)]
    else:
        times = _timed(lambda a: p.run(a, batch_size=batch), x, warmup, runs, seconds)
    art, kind, graphs = p.artifact, get_kind(p.manifest.kind), {}
    if len(getattr(p, "graphs", {})) > 1:  # several graphs: the kind chains them (verify) and times the later ones
        parity = kind.verify(p, np.load(Path(bundle) / "parity.npz", allow_pickle=False), p.manifest)
        graphs = kind.bench_graphs(p, inputs, runs)
    else:
        candidate = [p.run(feed, batch_size=1) for feed in inputs]
        parity = kind.parity(reference, candidate, gate_class(art), {}, inputs)
    size = sum((Path(bundle) / f).stat().st_size for f in art.files)
    return {"variant": f"{art.format} {art.precision}" + (" (throughput)" if mode == "throughput" else ""),
            "artifact": art.name, "mode": mode,
            "runtime": p.describe(), "size_mb": size / 1e6, **_stats(times, batch),
            "peak_rss_mb": _peak_rss_mb(), "parity": parity, **({"graphs": graphs} if graphs else {})}


def worker_torch(model_id, variant, weights, seed, batch, runs, warmup, seconds, threads, bundle) -> dict:
    import torch
    from .kinds import get_kind
    from .models import build, get_spec, load
    if threads:
        torch.set_num_threads(threads)
    spec = get_spec(model_id)
    # random weights: the same build options as the bundle's export (MIU-VL's canvas and text folder)
    options = read_manifest(bundle).model.get("options", {}) if bundle else {}
    model = load(spec, weights, variant)[0] if weights else build(spec, variant, seed=seed, **options)
    if bundle:
        inputs, reference, x_all = _stored(bundle)
    else:
        names = spec.graphs_for(spec.default_options)[0].inputs
        x_all = _batch_of(get_kind(spec.kind).synthetic_samples(4, 0, spec.preprocess, spec.inputs[0].name), names)
    count = len(next(iter(x_all.values())))

    def as_torch(batch):  # the forward takes the first graph's inputs in declared order
        return tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in batch.values())
    x = as_torch(_repeat(x_all, batch))
    with torch.inference_mode():
        times = _timed(lambda a: model(*a), x, warmup, runs, seconds)
        outs = {k: v.numpy() for k, v in model(*as_torch(x_all)).items()}
    parity = None
    if bundle:
        names = set(reference[0])  # a multi-graph bundle's torch forward is its first graph
        candidate = [{k: v[i:i + 1] for k, v in outs.items() if k in names} for i in range(count)]
        reference = [{k: v for k, v in r.items() if k in outs} for r in reference]
        parity = get_kind(spec.kind).parity(reference, candidate, "fp32", {}, inputs)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"variant": "torch fp32 eager", "artifact": "-", "runtime": {"backend": "torch", "version":
            torch.__version__, "device": "cpu", "threads": torch.get_num_threads()}, "size_mb": size / 1e6,
            **_stats(times, batch), "peak_rss_mb": _peak_rss_mb(), "parity": parity}


def worker_volume(bundle, artifact, backend, device, volume, threads, labels_out) -> dict:
    from .runtime import load
    p = load(bundle, device=device, backend=backend, threads=threads, artifact=artifact)
    t = time.perf_counter()
    labels, vol = p.segment(volume)
    seconds = time.perf_counter() - t
    np.save(labels_out, labels)
    art = p.artifact
    return {"variant": f"{art.format} {art.precision}", "artifact": art.name, "runtime": p.describe(),
            "size_mb": sum((Path(bundle) / f).stat().st_size for f in art.files) / 1e6, "seconds": seconds,
            "voxels_per_s": float(np.prod(vol.data.shape)) / seconds, "peak_rss_mb": _peak_rss_mb()}


def bench_volume(bundle, volume, device="cpu", threads=None, timeout=3600) -> list[dict]:
    """Whole-volume segmentation time of every artifact x backend; Dice against the first."""
    from .runtime.plan import plan
    from .runtime.volume import dice_per_class
    candidates, _ = plan(read_manifest(bundle).artifacts, device)
    rows, first = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for i, (art, backend, dev) in enumerate(candidates):
            out = Path(tmp) / f"{i}.npy"
            row = _run_worker(["worker-volume", str(bundle), art.name, backend, dev, str(volume),
                               str(threads or 0), str(out)], timeout)
            row["backend"] = backend
            if "error" not in row:
                labels = np.load(out)
                first = labels if first is None else first
                dice = dice_per_class(first, labels)
                row["dice_min_vs_first"] = min(dice.values()) if dice else 1.0
            rows.append(row)
    return rows


def _run_worker(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, "-m", "omedge.bench", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit {proc.returncode}"}
    return json.loads(lines[-1])


def bench_bundle(bundle, device="cpu", batch=1, runs=20, warmup=3, seconds=5.0, threads=None,
                 timeout=900, modes=("latency",)) -> list[dict]:
    """Every artifact of the bundle on every backend that can run it on `device`, in
    each mode ("latency": one request at a time; "throughput": several in flight)."""
    from .runtime.plan import plan
    m = read_manifest(bundle)
    candidates, skipped = plan(m.artifacts_for(m.roles()[0]), device)  # the later graphs open beside the first
    rows = []
    for art, backend, dev in candidates:
        for mode in modes:
            if mode == "throughput" and backend != "openvino":
                continue  # onnxruntime's session already spreads one request over all cores
            args = ["worker-bundle", str(bundle), art.name, backend, dev, str(batch), str(runs), str(warmup),
                    str(seconds), str(threads or 0), mode]
            row = _run_worker(args, timeout)
            row.setdefault("variant", f"{art.format} {art.precision}")
            row.setdefault("artifact", art.name)
            row["backend"] = backend
            rows.append(row)
    for art in m.artifacts_for(m.roles()[0]):  # kept with --force but failed its gate: say so, do not time it
        if not (art.parity or {}).get("passed", True):
            rows.append({"variant": f"{art.format} {art.precision}", "artifact": art.name,
                         "error": "failed its parity gate at export (not used): "
                                  + "; ".join(art.parity.get("failures", []))[:200]})
    return rows


def bench_torch(model_id, variant, weights=None, seed=0, batch=1, runs=20, warmup=3, seconds=5.0,
                threads=None, bundle=None, timeout=900) -> dict:
    args = ["worker-torch", model_id, variant, str(weights or ""), str(seed), str(batch), str(runs),
            str(warmup), str(seconds), str(threads or 0), str(bundle or "")]
    row = _run_worker(args, timeout)
    row["backend"] = "torch"
    return row


def bench_model(model_id, weights=None, variant=None, calib=None, precisions=("fp32", "bf16", "int8"),
                formats=("onnx", "openvino"), batch=1, runs=20, warmup=3, seconds=5.0, threads=None,
                workdir=None, modes=("latency",), calib_size: int = 64, log=lambda m: None,
                **export_options) -> list[dict]:
    """Export the usual variants of a model, then bench them beside torch fp32 eager.
    export_options: the kind's own export options (MIU-VL: text_encoder, image_size)."""
    from .exporters import export
    from .models import get_spec
    spec = get_spec(model_id)
    variant = variant or spec.default_variant
    with tempfile.TemporaryDirectory(prefix="omedge-bench-") as scratch:
        tmp = Path(workdir or scratch)
        rows, first_bundle = [], None
        for precision in precisions:
            fmts = [f for f in formats if not (precision == "bf16" and f == "onnx")]
            if precision == "bf16" and not native_bf16():
                rows.append({"variant": "openvino bf16", "backend": "openvino", "error":
                             "skipped: this CPU has no native bf16 (AVX512-BF16/AMX); emulated it is ~100x slower"})
                continue
            log(f"exporting {model_id} {variant} {precision} ({', '.join(fmts)})")
            try:
                b = export(model_id, weights, variant=variant, formats=fmts, precision=precision,
                           calib=(calib or "synthetic") if precision == "int8" else None, calib_size=calib_size,
                           random_weights=weights is None, out=tmp / f"{model_id}-{precision}.omedge",
                           overwrite=True, force=True, **export_options)
            except OmedgeError as e:
                rows.append({"variant": f"{precision}", "error": str(e)})
                continue
            first_bundle = first_bundle or b
            log(f"benchmarking {b.name}")
            rows += bench_bundle(b, batch=batch, runs=runs, warmup=warmup, seconds=seconds, threads=threads,
                                 modes=modes)
        log("benchmarking torch fp32 eager")
        rows.insert(0, bench_torch(model_id, variant, weights, 0, batch, runs, warmup, seconds, threads,
                                   first_bundle))
    return rows


def native_bf16() -> bool:
    try:
        from .runtime.backends.ov import native_bf16 as openvino_native_bf16
    except ImportError:
        return False
    return openvino_native_bf16()


def add_ratios(rows: list[dict]) -> list[dict]:
    base = next((r for r in rows if r.get("backend") == "torch" and "throughput" in r), None)
    for r in rows:
        if base and "throughput" in r:
            r["speedup_vs_torch"] = r["throughput"] / base["throughput"]
    return rows


def main(argv: list[str]):
    worker, *a = argv
    if worker == "worker-bundle":
        bundle, artifact, backend, device, batch, runs, warmup, seconds, threads, mode = a
        out = worker_bundle(bundle, artifact, backend, device, int(batch), int(runs), int(warmup),
                            float(seconds), int(threads) or None, mode)
    elif worker == "worker-volume":
        bundle, artifact, backend, device, volume, threads, labels_out = a
        out = worker_volume(bundle, artifact, backend, device, volume, int(threads) or None, labels_out)
    else:
        model_id, variant, weights, seed, batch, runs, warmup, seconds, threads, bundle = a
        out = worker_torch(model_id, variant, weights or None, int(seed), int(batch), int(runs), int(warmup),
                           float(seconds), int(threads) or None, bundle or None)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
