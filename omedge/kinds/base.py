"""What every kind provides. The exporter, predictor, CLI, verify and bench call these
hooks and never ask which kind they hold.

Samples are lists of feeds: one dict {input name: array with a batch axis of 1} per
calibration or verification sample, so kinds with variable-length inputs fit too.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np

from ..errors import InputError, UsageError


class Kind:
    name = ""
    min_verify = 4                # verification samples at the least
    max_verify: int | None = None  # and at the most (3-D patches are large)
    store_float16 = True          # verification inputs stored as float16 (rounded before the reference)
    # samples too large to hold twice (volume windows): the export keeps the torch reference on
    # disk and hands parity() the backend's outputs one at a time
    parity_streams = False
    runner_options: Mapping = MappingProxyType({})
    cli_predict_help = ""
    # `omedge batch`: the file suffixes a folder of this kind's inputs is listed by (none:
    # the kind is not batched), whether sub-folders are items (DICOM series), and whether
    # each item writes a file (label maps) instead of returning arrays
    batch_suffixes: tuple[str, ...] = ()
    batch_folders_are_items = False
    batch_writes_files = False
    # `omedge pack`: the package extras (pyproject) this kind needs on the run side
    run_extras: tuple[str, ...] = ()

    # -- build side ---------------------------------------------------------------
    def export_request(self, spec, preprocess: dict, options: dict) -> tuple[dict, list[dict], dict]:
        """(preprocess, input tensor dicts, build options) for kind-specific export
        options (video: frames). The default accepts none."""
        if options:
            raise UsageError(f"{', '.join(options)} do not apply to {spec.id}: it is an {self.name} model",
                             "frames apply to video models, plans to volume models")
        return preprocess, [i.to_dict() for i in spec.inputs], {}

    def folder_samples(self, source, pre: dict, limit: int | None, name: str) -> tuple[list[dict], list[str]]:
        """Calibration / verification samples read from the user's folder or file."""
        raise UsageError(f"{self.name} models take no calibration folder")

    def synthetic_samples(self, n: int, seed: int, pre: dict, name: str) -> list[dict]:
        raise NotImplementedError

    def holdout(self, samples: list[dict], names: list[str], wanted: int):
        """Every k-th sample (at most a quarter, at least one) verifies; the rest calibrates."""
        if len(samples) < 2:
            raise InputError(f"need at least 2 calibration samples (one is held out for verification), "
                             f"got {len(samples)}")
        wanted = max(1, min(wanted, len(samples) // 4))
        k = max(2, len(samples) // wanted)
        held = [i for i in range(k - 1, len(samples), k)][:wanted]
        keep = [i for i in range(len(samples)) if i not in held]
        return [samples[i] for i in keep], [samples[i] for i in held], [names[i] for i in held]

    def model_request(self, spec, preprocess: dict, model) -> tuple[dict, dict]:
        """(preprocess, {tensor name: shape}) once the model is built, for facts the variant
        fixes (SAM: the image size). The default changes nothing."""
        return preprocess, {}

    def graph_feeds(self, role: str, samples: list[dict], upstream: list[dict], seed: int, purpose: str,
                    model=None) -> list[dict]:
        """Multi-graph bundles: the inputs of graph `role` that no earlier graph outputs (SAM's
        decoder: prompts), one feed per sample of the first graph. upstream[i]: the earlier
        graphs' torch outputs for sample i; purpose: "verify" or "calibrate"; model: the
        built torch module (CITE's text graph is fed its own tokenised class names)."""
        raise NotImplementedError(f"{self.name} models have one graph")

    def bench_graphs(self, predictor, inputs: list[dict], runs: int) -> dict:
        """Multi-graph bundles: latency of the graphs after the first (`omedge bench`)."""
        return {}

    def pipeline_reference(self, run_torch, pre: dict, seed: int) -> dict:
        """Arrays for a whole-pipeline check stored in parity.npz (volumes: a phantom)."""
        return {}

    def pipeline_check(self, run, stored: dict, pre: dict, gate: str) -> tuple[dict, list[str]]:
        return {}, []

    def quantization_metric(self):
        """The metric static INT8 must keep (volumes: window Dice), for NNCF's accuracy-aware
        quantization, or None: plain post-training quantization. An object with `name`,
        `output` (the output it reads), `max_drop`, `items`, `ranking_items`,
        `max_iterations`, `budget_s`, `validation_feeds(calib, input shape) -> feeds`,
        `reference(float output) -> label` and `score(labels, outputs) -> (metric, per-item
        metrics)`; the float model scores 1.0 against its own labels (kinds/volume_parity.py)."""
        return None

    # -- parity -------------------------------------------------------------------
    def parity(self, reference: list[dict], candidate: list[dict], gate: str, overrides: dict,
               inputs: list[dict]) -> dict:
        """The kind's metric of candidate outputs against the torch fp32 reference, per sample."""
        raise NotImplementedError

    # -- run side -----------------------------------------------------------------
    def runner_options_for(self, pre: dict) -> dict:
        """The backend options its predictor and the export's verification both open runners
        with, so that what runs is what was measured."""
        return dict(self.runner_options)

    def checkpoint_options(self, weights) -> dict:
        """Export options that files beside the checkpoint give (volumes: nnU-Net plans)."""
        return {}

    def open(self, bundle, **options):
        return self.predictor(bundle, **options)

    def verify_options(self, stored) -> dict:
        """Extra predictor options `omedge verify` needs for the stored samples."""
        return {}

    def add_cli_arguments(self, parser) -> None:
        """Arguments of `omedge predict` that only this kind reads."""

    def cli_predict(self, predictor, args, ui) -> int:
        raise NotImplementedError

    def verify(self, predictor, stored: dict, manifest) -> dict:
        """Parity of an opened bundle against its stored reference: a row for `omedge verify`.
        A bundle of several graphs runs them chained as at export (Predictor.run_chain)."""
        from ..parity import load_samples
        inputs, reference = load_samples(stored)
        several = len(predictor.graphs) > 1
        candidate = [predictor.run_chain(feed) if several else predictor.run(feed, batch_size=1) for feed in inputs]
        gate = gate_class(predictor.artifact)
        result = self.parity(reference, candidate, gate, manifest.model.get("parity", {}), inputs)
        run = predictor.run_graph if several else (lambda b: predictor.run(b, batch_size=2))
        extra, failures = self.pipeline_check(run, self.pipeline_source(stored, inputs), manifest.preprocess, gate)
        result.update(extra)
        result["failures"] += failures
        result["passed"] = not result["failures"]
        return result

    def pipeline_source(self, stored, inputs: list[dict]):
        """Where the kind's whole-pipeline reference is kept in parity.npz (the top level)."""
        return stored

    # -- serving: the OIP v2 request decoder and response encoder (omedge serve) ---------
    serves_oip = True            # text generation speaks the OpenAI API instead
    serves_chat = False          # /v1/chat/completions (omedge.serve.openai_api)
    raw_input: str | None = None  # a BYTES input decoded exactly as predict decodes files
    serve_merge = True           # dynamic batching may merge requests' feeds along axis 0

    def serve_inputs(self, manifest) -> list[dict]:
        """OIP input metadata: the declared (preprocessed) tensors, plus the raw BYTES input."""
        from ..serve.oip import tensor_metadata
        meta = [tensor_metadata(t) for t in manifest.inputs]
        if self.raw_input:
            meta.append({"name": self.raw_input, "datatype": "BYTES", "shape": [-1]})
        return meta

    def serve_outputs(self, manifest) -> list[dict]:
        from ..serve.oip import tensor_metadata
        return [tensor_metadata(t) for t in manifest.outputs]

    def decode_request(self, predictor, tensors: dict, config) -> dict:
        """OIP input tensors -> graph feeds with the batch on axis 0. A raw BYTES input or
        server-side 'path's (only inside config.allow_dir) go through the kind's decoder;
        anything else must match the manifest's declared inputs."""
        from ..serve.oip import check_declared
        for special in (self.raw_input, "path"):
            if special and special in tensors:
                if len(tensors) > 1:
                    raise InputError(f"input '{special}' comes alone, not with {sorted(set(tensors) - {special})}")
                items = [x for x in np.asarray(tensors[special], dtype=object).reshape(-1)]
                if not items or not all(isinstance(x, bytes) for x in items):
                    raise InputError(f"input '{special}' must be a non-empty BYTES tensor")
                if special == "path":
                    from ..serve.security import client_paths
                    return self.decode_files(predictor, client_paths(items, config), config)
                return self.decode_raw(predictor, items, config)
        return check_declared(predictor.manifest.inputs, tensors)

    def decode_raw(self, predictor, items: list[bytes], config) -> dict:
        raise InputError(f"{self.name} bundles take only their preprocessed input tensors over OIP")

    def decode_files(self, predictor, paths: list[Path], config) -> dict:
        raise InputError(f"{self.name} bundles take no server-side paths")

    def serve_run(self, predictor, feeds: dict, max_batch: int) -> dict:
        """Run decoded feeds (dynamic batching may have merged several requests)."""
        return predictor.run(feeds, batch_size=max_batch)

    def encode_response(self, predictor, outputs: dict) -> dict:
        """Graph outputs (batch on axis 0) -> the response tensors, in serve_outputs' names."""
        return outputs


def gate_class(artifact) -> str:
    from ..formats import RECIPES
    return RECIPES[(artifact.format, artifact.precision)].gate


def paths_in(folder, suffixes: tuple[str, ...], what: str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{what} folder not found: {folder}")
    found = sorted(p for p in folder.iterdir() if p.name.lower().endswith(suffixes) or p.is_dir())
    if not found:
        raise InputError(f"no {what} files in {folder}", f"expected {', '.join(suffixes)}")
    return found


def stack(samples: list[dict]) -> dict:
    """Samples of equal shape -> one batch dict."""
    return {k: np.concatenate([s[k] for s in samples]) for k in samples[0]}
