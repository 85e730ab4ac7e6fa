"""`omedge bench BUNDLE --profile`: where a bundle's time goes, per graph node and per
op type, on the backend that really runs it.

Users who find a model slow need this before anything else: the slowest nodes, the
kernel each one ran (OpenVINO's exec type names the precision and ISA, e.g.
`brgemm_avx512_amx_I8` or `jit_avx2_FP32`, so a layer that fell back to fp32 shows),
and the share of the total. Both backends' own profilers are used (onnxruntime's
session trace, OpenVINO's PERF_COUNT), on the bundle's stored verification inputs.
Run side: no torch."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .bundle import bundle_file, reading
from .errors import InputError
from .runtime.backends import backend_class
from .runtime.plan import plan
from .runtime.predictor import open_bundle


def profile_bundle(bundle, backend: str = "auto", device: str = "cpu", artifact: str | None = None,
                   runs: int = 10, threads: int | None = None, top: int = 15) -> list[dict]:
    """One report per graph role: the artifact `load()` would choose here (or `artifact`),
    run `runs` times after a warm-up, with its nodes ranked by time."""
    path, manifest = open_bundle(bundle)
    reports = []
    roles = list(dict.fromkeys(a.role for a in manifest.artifacts))
    for role in roles:
        arts = [a for a in manifest.artifacts_for(role) if artifact in (None, a.name)]
        if not arts:
            continue
        candidates, skipped = plan(arts, device, backend)
        if not candidates:
            raise InputError(f"nothing in {path.name} can be profiled here with device={device}, backend={backend}",
                             "; ".join(skipped))
        art, name, dev = candidates[0]
        with reading(path):
            files = {"model": bundle_file(path, art.entry, manifest)}
            opened = backend_class(name)(files, dev, {**art.runtime.get(name, {}), "threads": threads,
                                                      "profile": True})
        feed = _feed(path, manifest, art)
        for _ in range(runs + 1):  # the first run (compilation, allocation) is left out
            opened.run(feed)
        reports.append(summarise(opened.profile(skip_runs=1), runs, top, role=role, artifact=art.name, backend=name,
                                 device=dev, describe=opened.describe()))
    return reports


def profile_backends(bundle, device: str = "cpu", runs: int = 10, threads: int | None = None,
                     top: int = 15) -> list[dict]:
    """`profile_bundle` on every backend the bundle is verified on, one after the other
    (each session is closed before the next starts, so their threads do not compete)."""
    import gc

    from .errors import UsageError
    from .manifest import read_manifest
    from .runtime.backends import TEXT_BACKENDS
    names = sorted({b for a in read_manifest(bundle).artifacts for b in a.verified_backends} - set(TEXT_BACKENDS))
    if not names:
        raise UsageError("--profile times ONNX / OpenVINO graphs node by node; this bundle has none",
                         "for a GGUF bundle, `omedge bench BUNDLE` reports prompt and decode tokens/s")
    reports = []
    for name in names:
        reports += profile_bundle(bundle, backend=name, device=device, runs=runs, threads=threads, top=top)
        gc.collect()
    return reports


def summarise(rows: list[dict], runs: int, top: int, **about) -> dict:
    """Per-run milliseconds: the `top` slowest nodes, and every op type with its share."""
    total = sum(r["ms"] for r in rows) or 1e-9
    nodes = sorted(rows, key=lambda r: -r["ms"])
    by_op: dict = {}
    for r in rows:
        o = by_op.setdefault(r["op"], {"op": r["op"], "ms": 0.0, "nodes": 0, "exec": set()})
        o["ms"] += r["ms"]
        o["nodes"] += 1
        if r.get("exec"):
            o["exec"].add(r["exec"])
    ops = sorted(by_op.values(), key=lambda o: -o["ms"])
    return {**about, "runs": runs, "total_ms_per_run": total / runs,
            "nodes": [{"node": r["node"], "op": r["op"], "exec": r.get("exec", ""), "ms": r["ms"] / runs,
                       "share": r["ms"] / total} for r in nodes[:top]],
            "ops": [{"op": o["op"], "nodes": o["nodes"], "ms": o["ms"] / runs, "share": o["ms"] / total,
                     "exec": sorted(o["exec"])[:4]} for o in ops]}


def _feed(path: Path, manifest, art) -> dict:
    """The first stored verification input when the bundle keeps one for this graph's
    inputs; else zeros of the declared shapes (dynamic axes 1)."""
    from .parity import load_samples
    try:
        with np.load(path / "parity.npz", allow_pickle=False) as stored:
            inputs, _ = load_samples(stored)
        if inputs and all(n in inputs[0] for n in art.inputs):
            return {n: inputs[0][n] for n in art.inputs}
    except (OSError, ValueError):
        pass
    specs = {i["name"]: i for i in manifest.inputs}
    feed = {}
    for n in art.inputs:
        spec = specs[n]
        shape = [s if isinstance(s, int) else 1 for s in spec["shape"]]
        feed[n] = np.zeros(shape, dtype=spec.get("dtype", "float32"))
    return feed


def render(reports: list[dict], console) -> None:
    """Tables for the CLI (rich)."""
    from rich.table import Table
    for rep in reports:
        d = rep["describe"]
        title = (f"{rep['artifact']} ({rep['role']}) on {rep['backend']}/{rep['device']}: "
                 f"{rep['total_ms_per_run']:.1f} ms per run in its nodes, {rep['runs']} runs"
                 + (f", precision {d['inference_precision']}" if d.get("inference_precision") else ""))
        t = Table(title=title)
        for col in ("node", "op", "kernel", "ms/run", "share"):
            t.add_column(col, justify="right" if col in ("ms/run", "share") else "left")
        for n in rep["nodes"]:
            t.add_row(n["node"][-60:], n["op"], n["exec"], f"{n['ms']:.2f}", f"{n['share']:.1%}")
        console.print(t)
        o = Table(title="by op type")
        for col in ("op", "nodes", "ms/run", "share", "kernels"):
            o.add_column(col, justify="right" if col in ("nodes", "ms/run", "share") else "left")
        for r in rep["ops"][:12]:
            o.add_row(r["op"], str(r["nodes"]), f"{r['ms']:.2f}", f"{r['share']:.1%}", ", ".join(r["exec"]))
        console.print(o)
