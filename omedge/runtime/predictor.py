"""Predictor: a verified bundle + the best backend here. Each kind subclasses it with
its own entry points (predict, segment, stream, score, ...); this class only opens
the bundle, chooses the backend and runs graphs."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..bundle import bundle_file, verify_files
from ..errors import (
    BackendUnavailableError,
    BundleIntegrityError,
    InputError,
    OmedgeError,
)
from ..manifest import Manifest, read_manifest
from .backends import backend_class

DEVICES = ("auto", "cpu", "cuda", "gpu", "npu")
MODES = ("latency", "throughput")


def open_bundle(bundle) -> tuple[Path, Manifest]:
    """Manifest hash and schema first, then every file's hash, before anything loads.
    Done under the bundle's read lock, so an overwrite cannot swap files mid-check (a
    caller that then opens a backend holds `bundle.reading(path)` around both); a bundle
    that a killed overwrite left aside as `.X.omedge.old-PID` is put back first."""
    from ..bundle import reading, recover
    from ..errors import BundleIntegrityError
    path = Path(bundle)
    recover(path)
    try:
        with reading(path):
            manifest = read_manifest(path)
            verify_files(path, manifest)
    except OSError as e:
        raise BundleIntegrityError(f"could not read bundle {path}: {e.strerror or e}",
                                   "check the path and its permissions") from None
    return path, manifest


def _check_declared(art, backend, path) -> None:
    """The graph must have the inputs the manifest declares: requests are built from them."""
    graph = list(getattr(backend, "inputs", None) or [])
    missing = [n for n in art.inputs if graph and n not in graph]
    if missing:
        raise BundleIntegrityError(f"bundle {Path(path).name}: the manifest declares input(s) {missing} "
                                   f"that {art.entry} does not have (it has {graph})",
                                   "the manifest does not belong to this graph: copy the bundle again")


class Predictor:
    backends: tuple[str, ...] = ("auto", "onnxruntime", "openvino")
    role = "model"   # which graph of the bundle this predictor runs (SAM-like kinds open one per role)

    def __init__(self, bundle, device="auto", backend="auto", threads=None, artifact=None, mode="latency"):
        from .plan import plan
        self._check_choice("device", device, DEVICES)
        self._check_choice("backend", backend, self.backends)
        self._check_choice("mode", mode, MODES)
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise InputError(f"threads must be a positive integer, got {threads!r}")
        self.path, self.manifest = open_bundle(bundle)
        artifacts = self.manifest.artifacts_for(self.role)
        if artifact is not None:
            artifacts = [a for a in artifacts if a.name == artifact]
            if not artifacts:
                names = ", ".join(a.name for a in self.manifest.artifacts)
                raise InputError(f"bundle has no artifact '{artifact}'", f"it has: {names}")
        candidates, self.skipped = plan(artifacts, device, backend)
        self.backend, self.artifact = self._open_first(candidates, device, backend, threads, mode)
        self.graphs = {self.role: (self.backend, self.artifact)}
        for role in self.manifest.roles():
            if role != self.role:
                self.graphs[role] = self._open_role(role, device, backend, threads, mode)
        self.labels = self.manifest.labels
        self.input_name = self.manifest.inputs[0]["name"]

    def _check_choice(self, what, value, allowed):
        if value not in allowed:
            raise InputError(f"unknown {what} {value!r}: this bundle cannot honour it",
                             f"choose one of {', '.join(allowed)}")

    def backend_options(self, art, name: str, threads, mode) -> dict:
        """The options a backend opens with: the recipe's for it, then this call's (a kind's
        predictor adds its `runner_options`)."""
        return {**art.runtime.get(name, {}), "threads": threads, "mode": mode}

    def _open_first(self, candidates, device, backend, threads, mode):
        for art, name, dev in candidates:
            files = {"model": bundle_file(self.path, art.entry, self.manifest)}
            try:
                opened = backend_class(name)(files, dev, self.backend_options(art, name, threads, mode))
            except (OmedgeError, RuntimeError) as e:
                if device != "auto" and backend != "auto":
                    raise BackendUnavailableError(f"{name} could not open {art.name} on {dev}: {e}") from None
                self.skipped.append(f"{name} on {dev} ({art.name}): failed to start: {e}")
                continue
            _check_declared(art, opened, self.path)
            return opened, art
        raise BackendUnavailableError(
            f"nothing in {self.path.name} can run here with device={device}, backend={backend}",
            "; ".join(self.skipped) or "the bundle lists no artifacts")

    def _open_role(self, role, device, backend, threads, mode):
        """Another graph of a multi-graph bundle (SAM's decoder): its verified artifacts, the
        one exported beside the first graph's artifact first (its parity was measured fed by
        that one), on the first graph's backend and device when it can run there."""
        from .plan import plan
        arts = sorted(self.manifest.artifacts_for(role), key=lambda a: a.format != self.artifact.format)
        arts.sort(key=lambda a: a.name != self.artifact.name)
        first = self.backend.describe()
        candidates, skipped = plan(arts, device, backend)
        candidates.sort(key=lambda c: (c[1] != first.get("backend"), c[2] != first.get("device")))
        self.skipped += [f"{role}: {s}" for s in skipped]
        return self._open_first(candidates, device, backend, threads, mode)

    def run_graph(self, role: str, feeds: dict) -> dict:
        """One run of one graph of the bundle, feeds cast to the declared dtypes."""
        if role not in self.graphs:
            raise InputError(f"bundle has no graph '{role}'", f"it has: {', '.join(self.graphs)}")
        dtypes = {i["name"]: i["dtype"] for i in self.manifest.inputs}
        backend, art = self.graphs[role]
        out = backend.run({k: np.asarray(v).astype(dtypes.get(k, "float32"), copy=False) for k, v in feeds.items()})
        return named(out, art.outputs)

    def run_chain(self, feed: dict) -> dict:
        """Every graph of the bundle once, in run order, each fed from `feed` and the outputs
        of the graphs before it (as the exporter chained them); all outputs together."""
        have, out = dict(feed), {}
        for role in self.manifest.roles():
            _, art = self.graphs[role]
            missing = [n for n in art.inputs if n not in have]
            if missing:
                raise InputError(f"graph '{role}' needs {', '.join(missing)}, which neither the feed nor an "
                                 f"earlier graph gives")
            got = self.run_graph(role, {n: have[n] for n in art.inputs})
            have.update(got)
            out.update(got)
        return out

    def constant(self, name: str) -> np.ndarray:
        """A stored constant (e.g. class-text embeddings); its hash was checked at open."""
        if name not in self.manifest.constants:
            raise InputError(f"bundle has no constant '{name}'",
                             f"it has: {', '.join(self.manifest.constants) or 'none'}")
        rel = self.manifest.constants[name]["file"]
        path = bundle_file(self.path, rel, self.manifest)
        verify_files(self.path, self.manifest, only=[rel])  # read long after open: hash what is read now
        return np.load(path, allow_pickle=False)

    def run(self, batch, batch_size: int = 8) -> dict:
        """Preprocessed inputs (an array for the first graph input, or a dict of
        arrays), run in chunks of `batch_size` along axis 0."""
        feeds = batch if isinstance(batch, dict) else {self.input_name: batch}
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
        n = len(next(iter(feeds.values())))
        step = min(batch_size, self.backend.max_batch or batch_size)
        dtypes = {i["name"]: i["dtype"] for i in self.manifest.inputs}
        chunks = [{k: v[i:i + step].astype(dtypes.get(k, "float32"), copy=False) for k, v in feeds.items()}
                  for i in range(0, n, step)]
        parts = self.backend.run_many(chunks)
        if len(parts) == 1:  # no copy (a 3-D window's logits can be a GB)
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def describe(self) -> dict:
        """What really runs: read back from the backend session, not assumed."""
        m = self.manifest
        return {"bundle": str(self.path), "model": m.model["id"], "variant": m.model["variant"],
                "kind": m.kind, "weights": m.weights["source"], "artifact": self.artifact.name,
                "format": self.artifact.format, "precision": self.artifact.precision,
                **self.backend.describe(), "parity": self.artifact.parity.get("passed"),
                "signature": getattr(m, "signature", None), "skipped": self.skipped,
                **({"graphs": {role: {"artifact": art.name, **be.describe()}
                               for role, (be, art) in self.graphs.items()}} if len(self.graphs) > 1 else {})}


def named(outputs: dict, declared) -> dict:
    """Outputs under their declared names. OpenVINO reading an ONNX file may name an output
    tensor after a node it fused into it (a LayerNorm's Div); the order is the graph's."""
    if not declared or set(outputs) == set(declared) or len(outputs) != len(declared):
        return outputs
    return dict(zip(declared, outputs.values()))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
