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
    verify_with(art, recipe, root, measure)


def verify_with(art: Artifact, recipe, root: Path, measure) -> None:
    """Run `measure(backend, runner) -> parity record` on every backend of the recipe
    (multi-graph bundles measure end to end through it, exporters/graphs.py) and record
    the result in `art`."""
    results, absent = {}, {}
    for backend in recipe.backends:
        found = probe(backend)
        if found.get("broken"):
            raise ExportError(f"cannot verify {art.name} on {backend}: {found['reason']}", found["hint"])
        if not found["installed"]:
            absent[backend] = f"{found['reason']} -> {found['hint']}"
            continue
        # bf16 is verified even where this CPU only emulates it: slow, but the numbers are bf16's
        options = {**art.runtime.get(backend, {}), "allow_emulated_bf16": True}
        runner = backend_class(backend)({"model": root / art.entry}, "cpu", options)
        result = measure(backend, runner)
        result["passed"] = not result["failures"]
        result["measured_with"] = runner.describe()
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


def _verify_on(runner, art, recipe, kind, feeds, reference, extra, pre, overrides) -> dict:
    candidate = [runner.run(feed) for feed in feeds]  # batch 1, as the quantizer calibrated
    result = kind.parity(reference, candidate, recipe.gate, overrides, feeds)
    checks, failures = kind.pipeline_check(lambda b: runner.run({art.inputs[0]: b}), extra, pre, recipe.gate)
    result.update(checks)
    result["failures"] += failures
    return result
