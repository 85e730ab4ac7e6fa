"""Bundles of several graphs (SAM: encoder + decoder; MedLSAM: localiser + encoder +
decoder), generic over roles: nothing here knows a role by name.

The protocol:
- `spec.graphs`: GraphSpec(role, inputs, outputs, quantize) in run order. An input of a
  later graph that an earlier graph outputs is *chained*: it is fed that output.
- the built torch module's `graph_modules() -> {role: module}`; each takes its role's
  inputs in declared order and returns a dict holding (at least) its declared outputs.
- the first graph's calibration / verification feeds are the kind's usual samples; the
  kind's `graph_feeds(role, samples, upstream, seed, purpose, model)` gives every later graph's
  own inputs (SAM's decoder: prompts), one feed per sample, from the torch outputs of the
  graphs before it. Verification and calibration use different seeds (held-out prompts).
- one artifact per (role x recipe). The reference is the torch fp32 chain. Verification
  is end to end: the recipe-k artifact of a later graph is fed the outputs of the
  recipe-k artifacts of the graphs before it, run on the same backend, and judged with
  the kind's `parity` on its own outputs (SAM: mask IoU of the candidate encoder +
  candidate decoder against torch).
- quantize="if-passes": an INT8 artifact of that graph that fails its gate is replaced by
  the fp32 artifact of the same format; its parity record says so (`fallback`).
  quantize="no": that graph is always the fp32 artifact of each format.
- parity.npz holds, per sample, every graph's own (non-chained) inputs and every graph's
  torch outputs, so `omedge verify` can rerun the chain on the device.
"""
from __future__ import annotations

import numpy as np

from ..formats import recipe as recipe_for
from ..manifest import Artifact
from ..parity import as_stored
from ..runtime.predictor import named


def _torch_chain(job, feeds: list[dict], seed: int, purpose: str):
    """({role: own feeds}, {role: torch outputs}) for the first graph's `feeds`."""
    import torch
    graphs, modules = job.graphs, job.model.graph_modules()
    own, outs = {graphs[0].role: feeds}, {}
    upstream = [{} for _ in feeds]
    for g in graphs:
        if g.role not in own:
            own[g.role] = job.kind.graph_feeds(g.role, feeds, upstream, seed, purpose, model=job.model)
            if job.kind.store_float16 and purpose == "verify":  # as parity.npz will keep them
                own[g.role] = [as_stored(f) for f in own[g.role]]
        outs[g.role] = []
        for i, feed in enumerate(own[g.role]):
            full = {**upstream[i], **feed}
            with torch.no_grad():
                got = modules[g.role](*(torch.from_numpy(np.ascontiguousarray(full[n])) for n in g.inputs))
            o = {k: got[k].numpy() for k in g.outputs}
            outs[g.role].append(o)
            upstream[i].update(o)
    return own, outs


def reference(job, seed: int) -> None:
    """Torch fp32 outputs of every graph on the verification (and calibration) samples."""
    job.graphs = job.spec.graphs_for(job.options)
    job.own, job.role_ref = _torch_chain(job, job.verify_feeds, seed + 3, "verify")
    job.role_calib = None
    if job.calib_feeds:
        own, outs = _torch_chain(job, job.calib_feeds, seed + 7, "calibrate")
        job.role_calib = {g.role: [{n: {**_merged(outs, i, g), **own[g.role][i]}[n] for n in g.inputs}
                                   for i in range(len(job.calib_feeds))] for g in job.graphs}
    n = len(job.verify_feeds)
    job.verify_feeds = [{k: v for g in job.graphs for k, v in job.own[g.role][i].items()} for i in range(n)]
    job.ref = [{k: v for g in job.graphs for k, v in job.role_ref[g.role][i].items()} for i in range(n)]
    job.extra = job.kind.pipeline_reference(_torch_runner(job), job.pre, seed)
    from . import _labels
    job.labels = _labels(None, job.spec, job.ref[0], job.options)


def _torch_runner(job):
    """run(role, feeds) over the torch graphs: the kind's whole-pipeline reference runs on it."""
    import torch
    modules, graphs = job.model.graph_modules(), {g.role: g for g in job.graphs}

    def run(role, feeds):
        with torch.no_grad():
            got = modules[role](*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in graphs[role].inputs))
        return {k: got[k].numpy() for k in graphs[role].outputs}
    return run


def _merged(outs: dict, i: int, upto) -> dict:
    """Sample i's outputs of every graph (the chained inputs come from these)."""
    return {k: v for role, per in outs.items() if role != upto.role for k, v in per[i].items()}


def _tensor(job, name: str) -> dict:
    return next(t for t in job.inputs + job.outputs if t["name"] == name)


def write(job, writer) -> tuple[list[Artifact], dict]:
    """Export each graph to ONNX fp32, build every recipe per graph, verify end to end."""
    import torch

    from .onnx import export_onnx
    modules = job.model.graph_modules()
    work = writer.dir / ".work"
    onnx_info, sources = {}, {}
    for g in job.graphs:
        job.log(f"exporting ONNX (fp32): {g.role}")
        full = {**_merged(job.role_ref, 0, g), **job.own[g.role][0]}
        example = tuple(torch.from_numpy(np.ascontiguousarray(full[n])) for n in g.inputs)
        sources[g.role] = work / f"{g.role}.onnx"
        onnx_info[g.role] = export_onnx(modules[g.role], example, sources[g.role],
                                        [_tensor(job, n) for n in g.inputs], [_tensor(job, n) for n in g.outputs],
                                        **({"opset": job.spec.onnx_opset} if job.spec.onnx_opset else {}))
    artifacts = []
    for r in job.recipes:
        start = len(artifacts)
        upstream: dict = {}  # backend -> [per sample: outputs of this recipe's earlier graphs]
        for g in job.graphs:
            if g.quantize == "no" and r.precision != "fp32":
                art = _fp32_instead(job, writer.dir, r, g, sources[g.role], upstream, artifacts,
                                    f"{g.role} is not quantized (its spec says so)")
                if art is not None:
                    artifacts.append(art)
                continue
            art = _artifact(job, writer.dir, r, g, sources[g.role], upstream)
            if not art.parity["passed"] and g.quantize == "if-passes" and r.precision != "fp32":
                reason = "; ".join(art.parity["failures"])
                job.log(f"{g.role} {art.name} failed ({reason}): keeping the fp32 {g.role} for {r.format}")
                _drop_files(writer.dir, art)
                art = _fp32_instead(job, writer.dir, r, g, sources[g.role], upstream, artifacts, reason)
            if art is not None:
                artifacts.append(art)
        chain = {a.role: a for a in artifacts[:start] if a.format == r.format and a.precision == "fp32"}
        chain.update({a.role: a for a in artifacts[start:]})   # this recipe's graphs, fp32 where it fell back
        if job.extra and len(chain) == len(job.graphs):
            _pipeline_check(job, writer.dir, r, chain)
    return artifacts, {"graphs": onnx_info, "order": [g.role for g in job.graphs]}


def _fp32_instead(job, root, r, g, source, upstream, artifacts, reason):
    """The fp32 artifact of r's format stands in for graph g: the one already built (None is
    returned; it feeds this recipe's later graphs), or a new one judged by r's gate."""
    fp32 = recipe_for(r.format, "fp32")
    kept = [a for a in artifacts if a.role == g.role and a.name == fp32.name]
    if kept:
        upstream.update(_outputs_of(job, root, kept[0], fp32, g, upstream))
        return None
    art = _artifact(job, root, fp32, g, source, upstream, gate=r.gate)
    art.parity["fallback"] = {"from": r.name, "reason": reason}
    return art


def _pipeline_check(job, root, r, chain: dict) -> None:
    """The kind's whole-pipeline check through this recipe's graphs on its first installed
    backend, recorded on the last graph's artifact (the end of the chain)."""
    from ..runtime.backends import backend_class, probe
    backend = next((b for b in r.backends if probe(b)["installed"]), None)
    if backend is None:
        return
    runners = {role: backend_class(backend)({"model": root / a.entry}, "cpu", dict(r.runtime.get(backend, {})))
               for role, a in chain.items()}

    def run(role, feeds):
        return named(runners[role].run(feeds), chain[role].outputs)
    job.log(f"checking the whole pipeline through {r.name} on {backend}")
    extra, failures = job.kind.pipeline_check(run, job.extra, job.pre, r.gate)
    last = chain[job.graphs[-1].role].parity
    last.update({**extra, "pipeline_backend": backend})
    last["failures"] = list(last["failures"]) + failures
    last["passed"] = not last["failures"]


def _artifact(job, root, r, g, source, upstream: dict, gate: str | None = None) -> Artifact:
    """Build and verify one graph of recipe `r`; gate: the chain's gate class when it is
    fed by lower-precision graphs (an fp32 decoder behind an INT8 encoder: INT8's)."""
    from .builders import build
    from .verify import verify_with
    job.log(f"building {r.name} ({g.role})")
    calib = (job.role_calib or {}).get(g.role)
    entry, files, quantization = build(r, source, root, g.role, calib)
    art = Artifact(name=r.name, role=g.role, format=r.format, precision=r.precision, entry=entry, files=files,
                   runtime={b: dict(o) for b, o in r.runtime.items()}, quantization=quantization,
                   inputs=list(g.inputs), outputs=list(g.outputs))
    n = len(job.own[g.role])
    job.log(f"verifying {art.name} ({g.role}) against torch fp32 on {n} inputs, fed by this recipe's earlier graphs")

    def measure(backend, runner):
        before = upstream.get(backend) or [_merged(job.role_ref, i, g) for i in range(n)]
        feeds = [{k: {**before[i], **job.own[g.role][i]}[k] for k in g.inputs} for i in range(n)]
        candidate = [named(runner.run(f), g.outputs) for f in feeds]
        upstream[backend] = [{**before[i], **candidate[i]} for i in range(n)]
        return job.kind.parity(job.role_ref[g.role], candidate, gate or r.gate, job.spec.parity, feeds)
    verify_with(art, r, root, measure)
    art.parity["gate_class"] = gate or r.gate
    if not art.parity["passed"]:
        job.log(f"WARNING: {art.name} ({g.role}) failed parity: {'; '.join(art.parity['failures'])}")
    return art


def _outputs_of(job, root, art, r, g, upstream) -> dict:
    """An already-built artifact of this graph stands in (an INT8 one fell back to it): run
    it on each of its backends so the later graphs of this recipe are fed by it."""
    from ..runtime.backends import backend_class, probe
    n, out = len(job.own[g.role]), {}
    for backend in r.backends:
        if not probe(backend)["installed"]:
            continue
        runner = backend_class(backend)({"model": root / art.entry}, "cpu", dict(r.runtime.get(backend, {})))
        before = upstream.get(backend) or [_merged(job.role_ref, i, g) for i in range(n)]
        feeds = [{k: {**before[i], **job.own[g.role][i]}[k] for k in g.inputs} for i in range(n)]
        out[backend] = [{**before[i], **named(runner.run(f), g.outputs)} for i, f in enumerate(feeds)]
    return out


def _drop_files(root, art: Artifact) -> None:
    for f in art.files:
        (root / f).unlink(missing_ok=True)
