"""Parity of one artifact on every installed backend that the recipe lists. The runtime
only uses backends in `verified_backends`, so what runs is what was measured. The
record shown is the first backend's that passed (else the first backend's).

Nothing is skipped silently: a backend that is not installed is named in the record
(`not_verified`), one that is installed but fails to load stops the export, and an
interrupt propagates (it is never read as "not installed")."""
from __future__ import annotations

from pathlib import Path

from ..errors import ExportError
from ..manifest import Artifact
from ..runtime.backends import backend_class, probe


def verify_artifact(art: Artifact, recipe, root: Path, kind, feeds: list[dict], reference: list[dict],
                    extra: dict, pre: dict, overrides: dict) -> None:
    def measure(backend, runner):
        return _verify_on(runner, art, recipe, kind, feeds, reference, extra, pre, overrides)
    verify_with(art, recipe, root, measure, kind.runner_options_for(pre))


def verify_with(art: Artifact, recipe, root: Path, measure, runner_options: dict | None = None) -> None:
    """Run `measure(backend, runner) -> parity record` on every backend of the recipe
    (multi-graph bundles measure end to end through it, exporters/graphs.py) and record
    the result in `art`; runners open with the kind's `runner_options_for` the bundle, as
    its predictor opens them."""
    results, absent = {}, {}
    for backend in recipe.backends:
        found = probe(backend)
        if found.get("broken"):
            raise ExportError(f"cannot verify {art.name} on {backend}: {found['reason']}", found["hint"])
        if not found["installed"]:
            absent[backend] = f"{found['reason']} -> {found['hint']}"
            continue
        # bf16 is verified even where this CPU only emulates it: slow, but the numbers are bf16's
        options = {**art.runtime.get(backend, {}), "allow_emulated_bf16": True,
                   **(runner_options or {})}  # as the kind's predictor opens it (volumes: no arena, one shape)
        runner = backend_class(backend)({"model": root / art.entry}, "cpu", options)
        result = measure(backend, runner)
        result["passed"] = not result["failures"]
        result["measured_with"] = runner.describe()
        del runner  # its session's memory is freed before the next backend opens
        results[backend] = result
    if not results:
        raise ExportError(f"no backend that runs {art.name} is installed ({', '.join(recipe.backends)})",
                          "pip install 'omedge[export]'")
    art.verified_backends = [b for b, r in results.items() if r["passed"]]
    chosen = dict(next((r for r in results.values() if r["passed"]), next(iter(results.values()))))
    chosen["backends"] = {b: {"passed": r["passed"], "failures": r["failures"]} for b, r in results.items()}
    for backend, why in absent.items():  # recorded, so the runtime and the reader know it was not measured
        chosen["backends"][backend] = {"passed": False, "failures": [], "not_verified": why}
    if absent:
        chosen["not_verified"] = absent
    chosen["passed"] = bool(art.verified_backends)
    chosen["gate_class"] = recipe.gate
    art.parity = chosen
    art.parity["peak_rss_mb"] = peak_rss_mb()


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, in MB (Linux VmHWM; ru_maxrss
    elsewhere), recorded so an export's memory need is known before the next site runs
    it: the whole export's peak, tracing and the torch reference included."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    try:
        import resource
        import sys
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KB on Linux
    return round(rss / (2 ** 20 if sys.platform == "darwin" else 1024), 1)


def _verify_on(runner, art, recipe, kind, feeds, reference, extra, pre, overrides) -> dict:
    runs = (runner.run(feed) for feed in feeds)  # batch 1, as the quantizer calibrated
    # a kind whose samples are large (a volume window's logits: 0.9 GB) compares each as it comes
    candidate = runs if kind.parity_streams else list(runs)
    result = kind.parity(reference, candidate, recipe.gate, overrides, feeds)
    checks, failures = kind.pipeline_check(lambda b: runner.run({art.inputs[0]: b}), extra, pre, recipe.gate)
    result.update(checks)
    result["failures"] += failures
    return result
