"""export(): checkpoint -> torch reference -> ONNX / OpenVINO IR -> quantize -> verify -> bundle.

Dispatches on the spec: families with their own exporter (PULSE: HF folder -> GGUF)
go there; every other one runs the tensor pipeline below, with the kind supplying
samples and the parity metric and the recipe table supplying formats and gates.
Every artifact is run on its real backend against the torch fp32 reference before the
bundle exists; a failed gate raises and leaves nothing behind unless `force=True`.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__, offline
from ..bundle import BundleWriter, bundle_path, sha256
from ..errors import ExportError, ParityError, UsageError
from ..formats import GGUF_FOR_FLAG, recipe
from ..kinds import get_kind
from ..manifest import Artifact, Manifest
from ..parity import SamplesOnDisk, as_stored, save_samples
from .verify import peak_rss_mb


def _versions() -> dict:
    out = {"omedge": __version__}
    for n in ("torch", "onnx", "onnxruntime", "openvino", "nncf", "numpy", "pillow"):
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _file_record(names: list[str], record_names: bool, folder: str | None = None) -> dict:
    """Content hashes (16 hex) of the files used; names only when the user asked (file
    and folder names in hospitals carry MRNs, names and dates of birth)."""
    out = {"sha256": [_fingerprint(Path(n)) for n in names]}
    if record_names:
        out["names"] = [Path(n).name for n in names]
        if folder:
            out["folder"] = folder
    return out


def _fingerprint(path: Path) -> str:
    if path.is_file():
        return sha256(path)[:16]
    if path.is_dir():  # a DICOM series: the hashes of its files, in name order
        parts = [sha256(f) for f in sorted(path.rglob("*")) if f.is_file()]
        return hashlib.sha256("".join(parts).encode()).hexdigest()[:16]
    return "?"


def export(model_id: str, weights: str | Path | None = None, *, out: str | Path | None = None,
           variant: str | None = None, formats=("onnx",), precision: str = "fp32", quant: str | None = None,
           calib: str | Path | None = None, calib_size: int = 64, verify_data: str | Path | None = None,
           verify_size: int = 8, random_weights: bool = False, seed: int = 0, trust_checkpoint: bool = False,
           labels: list[str] | None = None, overwrite: bool = False, force: bool = False, record_names: bool = False,
           log: Callable[[str], None] = lambda msg: None, **kind_options) -> Path:
    """Export `model_id` into a verified bundle folder and return its path.

    kind_options are the kind's own export options (video: frames=N); anything else is
    refused. quant: a GGUF type for LLMs (else taken from `precision`)."""
    from ..models import get_spec
    offline.build_side()
    spec = get_spec(model_id)
    kind_options = {k: v for k, v in kind_options.items() if v is not None}
    if spec.exporter:
        passed = {k: kind_options.pop(k) for k in ("keep_f16", "threads") if k in kind_options}
        if kind_options or calib or labels or random_weights:
            extra = [*kind_options, *(["calib"] if calib else []), *(["labels"] if labels else []),
                     *(["random_weights"] if random_weights else [])]
            raise UsageError(f"{', '.join(extra)} do not apply to {model_id}")
        if precision not in GGUF_FOR_FLAG:
            raise UsageError(f"--{precision} does not apply to GGUF", "use --int4 (Q4_K_M), --int8 (Q8_0), "
                             "--fp16, or quant=Q4_0|Q5_K_M|Q6_K|Q8_0")
        module, _, function = spec.exporter.partition(":")
        run = getattr(importlib.import_module(module), function)
        return run(model_id, weights, out=out, quant=quant or GGUF_FOR_FLAG[precision], overwrite=overwrite,
                   force=force, log=log, **passed)
    if quant is not None:
        raise UsageError("quant= is for GGUF (PULSE) exports", "use precision= for tensor models")
    job = _Job.plan(spec, weights, out, variant, tuple(formats), precision, calib, random_weights, seed,
                    trust_checkpoint, overwrite, kind_options, log)
    job.samples(calib, calib_size, verify_data, verify_size, seed, record_names)
    job.reference(labels, seed)
    return job.write(overwrite, force)


@dataclass
class _Job:
    """One tensor export, in the order it happens."""
    spec: object
    kind: object
    recipes: list
    out: Path
    variant: str
    model: object
    options: dict
    weights_info: dict
    pre: dict
    inputs: list[dict]
    log: Callable
    calib_feeds: list = None
    calib_info: dict | None = None
    verify_feeds: list = None
    verify_info: dict = field(default_factory=dict)

    @classmethod
    def plan(cls, spec, weights, out, variant, formats, precision, calib, random_weights, seed, trust,
             overwrite, kind_options, log):
        from ..models import build, load
        recipes = [recipe(f, precision) for f in formats]
        if any(r.calibration for r in recipes) and calib is None:
            raise UsageError("static INT8 needs calibration data: --calib DIR (or FILE)",
                             "or --calib synthetic (the manifest records it), or --int8-dynamic for "
                             "weight-only/dynamic INT8 without calibration")
        if weights is None and not random_weights:
            raise UsageError(f"no weights given for {spec.id}",
                             "pass --weights PATH (the official checkpoint), or --random-weights for a demo")
        kind = get_kind(spec.kind)
        kind_options = {**kind.checkpoint_options(weights), **kind_options}
        pre, inputs, build_options = kind.export_request(spec, spec.preprocess, kind_options)
        if out is not None:
            bundle_path(out, overwrite)  # fail before the slow part
        if weights is not None:
            log(f"loading {Path(weights).name}")
            model, variant, options = load(spec, weights, variant, trust=trust, **build_options)
            weights_info = {"source": "checkpoint", "file": Path(weights).name, "sha256": sha256(Path(weights))}
        else:
            variant = variant or spec.default_variant
            options = {**spec.default_options, **build_options}
            model = build(spec, variant, seed=seed, **options)
            weights_info = {"source": "random", "seed": seed,
                            "warning": "RANDOM WEIGHTS: for testing the pipeline only, not a medical model"}
        out = Path(out or f"{spec.id}-{variant}-{precision}{'-random' if random_weights else ''}.omedge")
        pre, shapes = kind.model_request(spec, pre, model)  # facts the variant fixes (SAM: image size)
        job = cls(spec, kind, recipes, out, variant, model, options, weights_info, pre, _shaped(inputs, shapes), log)
        job.shapes = shapes
        return job

    def samples(self, calib, calib_size, verify_data, verify_size, seed, record_names=False):
        """Calibration (static INT8) and verification samples: held out from the calibration
        data when there is some, else --verify-data (a folder, or "synthetic" so no patient
        pixels are stored), else synthetic. The manifest records counts and content hashes
        of the files used, not their names or folders, unless record_names."""
        kind, pre, name = self.kind, self.pre, self.inputs[0]["name"]
        verify_size = min(verify_size, kind.max_verify or verify_size)
        synthetic_only = str(verify_data) == "synthetic"
        parts = []
        if calib is not None and str(calib) != "synthetic":
            self.log(f"reading calibration data from {calib}")
            feeds, names = kind.folder_samples(calib, pre, calib_size + (0 if synthetic_only else verify_size), name)
            held, held_names = [], []
            if synthetic_only:
                self.calib_feeds = feeds
            else:
                self.calib_feeds, held, held_names = kind.holdout(feeds, names, verify_size)
            used = [n for n in names if n not in held_names]
            self.calib_info = {"source": "folder", "samples": len(self.calib_feeds),
                               **_file_record(used, record_names, Path(calib).name)}
            if held:
                parts += held
                self.verify_info["held_out_calibration"] = {"count": len(held),
                                                            **_file_record(held_names, record_names)}
                self.log(f"parity.npz keeps {len(held)} held-out calibration inputs after preprocessing (float16): "
                         "pass --verify-data synthetic where patient pixels may not leave the site")
        elif calib is not None:
            self.calib_feeds = kind.synthetic_samples(calib_size, seed + 1, pre, name)
            self.calib_info = {"source": "synthetic", "samples": len(self.calib_feeds),
                               "warning": "calibrated on synthetic inputs at the user's request"}
        if verify_data is not None and not synthetic_only:
            feeds, names = kind.folder_samples(verify_data, pre, verify_size, name)
            parts += feeds
            self.verify_info["verify_data"] = {"count": len(feeds), **_file_record(names, record_names)}
        n_min = 1 if synthetic_only else kind.min_verify
        if len(parts) < n_min or synthetic_only:
            n = max(n_min, verify_size) - len(parts)
            parts += kind.synthetic_samples(n, seed + 2, pre, name)
            self.verify_info["synthetic"] = n
        if kind.store_float16:  # stored as float16: round first so the reference sees the same input
            parts = [as_stored(f) for f in parts]
        self.verify_feeds = parts

    def reference(self, labels, seed):
        import torch
        outputs = self.spec.outputs_for(self.options)
        self.outputs = _shaped([o.to_dict() for o in outputs], self.shapes)
        if self.spec.graphs:  # several graphs with roles: exporters/graphs.py
            from . import graphs
            if labels is not None:
                raise UsageError(f"--labels do not apply to {self.spec.id}")
            return graphs.reference(self, seed)
        names = [o["name"] for o in self.outputs]
        with torch.no_grad():
            self.ref = [{k: v.numpy() for k, v in self.model(*self._torch(feed)).items() if k in names}
                        for feed in self.verify_feeds]
        self.labels = _labels(labels, self.spec, self.ref[0], self.options)
        self.log("running the whole pipeline with torch fp32")
        self.extra = self.kind.pipeline_reference(self._torch_runner(), self.pre, seed)

    def _torch(self, feed: dict) -> tuple:
        import torch
        return tuple(torch.from_numpy(feed[i["name"]]) for i in self.inputs)

    def _torch_runner(self):
        import torch

        def run(batch):  # every declared output, as numpy
            with torch.no_grad():
                return {k: v.numpy() for k, v in self.model(torch.from_numpy(batch)).items()}
        return run

    def write(self, overwrite, force) -> Path:
        import torch

        from .builders import build
        from .onnx import export_onnx
        from .verify import verify_artifact
        _import_natives(self.recipes)
        with BundleWriter(self.out, overwrite=overwrite) as writer:
            n_params = sum(p.numel() for p in self.model.parameters())
            writer.check_space(int(n_params * 4 * (1 + len(self.recipes)) * 1.2) + (50 << 20))
            work = writer.dir / ".work"
            work.mkdir()
            if self.kind.parity_streams:  # large reference windows wait on disk, not beside the backends' runs
                writer.check_space(sum(a.nbytes for r in self.ref for a in r.values()))
                self.ref = SamplesOnDisk(work / "reference", self.ref)
            if self.spec.graphs:
                from . import graphs
                artifacts, onnx_info = graphs.write(self, writer)
                return self._finish(writer, artifacts, n_params, onnx_info, force)
            self.log("exporting ONNX (fp32)")
            onnx_fp32 = work / "model.onnx"
            example = tuple(torch.from_numpy(a) for a in self._first_inputs())
            onnx_info = export_onnx(self.model, example, onnx_fp32, self.inputs, self.outputs,
                                    **({"opset": self.spec.onnx_opset} if self.spec.onnx_opset else {}))
            artifacts = []
            for r in self.recipes:
                self.log(f"building {r.name}")
                entry, files, quantization = build(r, onnx_fp32, writer.dir, "model", self.calib_feeds,
                                                   self.kind.quantization_metric())
                art = Artifact(name=r.name, format=r.format, precision=r.precision, entry=entry, files=files,
                               runtime={b: dict(o) for b, o in r.runtime.items()}, quantization=quantization,
                               inputs=[i["name"] for i in self.inputs], outputs=[o["name"] for o in self.outputs])
                self.log(f"verifying {art.name} against torch fp32 on {len(self.verify_feeds)} inputs")
                verify_artifact(art, r, writer.dir, self.kind, self.verify_feeds, self.ref, self.extra, self.pre,
                                self.spec.parity)
                if not art.parity["passed"]:
                    self.log(f"WARNING: {art.name} failed parity: {'; '.join(art.parity['failures'])}")
                for backend, why in (art.parity.get("not_verified") or {}).items():
                    self.log(f"{art.name} not verified on {backend} (it will not run there): {why}")
                artifacts.append(art)
            return self._finish(writer, artifacts, n_params, onnx_info, force)

    def _finish(self, writer, artifacts, n_params, onnx_info, force) -> Path:
        _refuse_failures(artifacts, force)
        self.constants = self._save_constants(writer.dir)
        save_samples(writer.dir / "parity.npz", self.verify_feeds, self.ref, self.extra, self.kind.store_float16)
        shutil.rmtree(writer.dir / ".work", ignore_errors=True)  # after the samples: the reference may be there
        return writer.commit(self._manifest(artifacts, n_params, onnx_info))

    def _save_constants(self, root: Path) -> dict:
        """Arrays the spec declares as constants (e.g. CITE's class-text embeddings), from
        the model's `constants()`, stored as .npy beside the graphs and hashed like them."""
        if not self.spec.constants:
            return {}
        given = self.model.constants()  # a declared constant may be None: not part of this build
        values = {k: v if isinstance(v, np.ndarray) else v.detach().cpu().numpy()
                  for k, v in given.items() if v is not None}
        missing = [c for c in self.spec.constants if c not in given]
        if missing:
            raise ExportError(f"{self.spec.id} declares constants {', '.join(missing)} that its model does not give")
        (root / "constants").mkdir()
        out = {}
        for name in (c for c in self.spec.constants if c in values):
            np.save(root / "constants" / f"{name}.npy", values[name], allow_pickle=False)
            out[name] = {"file": f"constants/{name}.npy", "shape": list(values[name].shape),
                         "dtype": str(values[name].dtype)}
        return out

    def _first_inputs(self):
        return [self.verify_feeds[0][i["name"]] for i in self.inputs]

    def _manifest(self, artifacts, n_params, onnx_info) -> Manifest:
        spec = self.spec
        return Manifest(
            model={"id": spec.id, "variant": self.variant, "kind": spec.kind, "title": spec.title,
                   "options": self.options, "licence": spec.licence, "source": spec.source,
                   "parameters": int(n_params), "notes": spec.notes, "parity": spec.parity},
            weights=self.weights_info, inputs=self.inputs, outputs=self.outputs,
            primary_output=spec.primary_for(self.options), labels=self.labels,
            preprocess={**self.pre, "official": spec.official},
            artifacts=artifacts, constants=self.constants, calibration=self.calib_info,
            verification={"file": "parity.npz", "samples": len(self.verify_feeds), **self.verify_info,
                          "reference": "torch fp32 eager on this machine", "machine": _machine()},
            export={"onnx": onnx_info, "peak_rss_mb": peak_rss_mb()},
            forced=any(not a.parity["passed"] for a in artifacts), tools=_versions())


def _machine() -> dict:
    """The CPU the parity figures were measured on: INT8 and bf16 results depend on its ISA."""
    from ..devices import cpu_info
    info = cpu_info()
    return {"cpu": info["model"], "isa": info["isa"]}


def _shaped(tensors: list[dict], shapes: dict) -> list[dict]:
    """Tensor dicts with the sizes the built model fixes filled in."""
    return [{**t, "shape": list(shapes[t["name"]])} if t["name"] in shapes else t for t in tensors]


def _import_natives(recipes) -> None:
    """Import onnx and the recipes' backends before the partial bundle exists: a Ctrl-C or
    SIGTERM landing inside a native extension's first import (its module init calling back
    into Python) aborted the interpreter (SIGABRT) instead of cleaning up (seen in CI)."""
    import importlib
    modules = {"onnxruntime": "onnxruntime", "openvino": "openvino", "llama.cpp": "llama_cpp"}
    for name in ["onnx", *dict.fromkeys(modules[b] for r in recipes for b in r.backends if b in modules)]:
        try:
            importlib.import_module(name)
        except ImportError:  # a missing backend is reported where it is needed
            pass


def _refuse_failures(artifacts: list[Artifact], force: bool) -> None:
    """Every artifact is verified first, so the refusal can say which formats passed."""
    failed = [a for a in artifacts if not a.parity["passed"]]
    if not failed or force:
        return
    passed = [a for a in artifacts if a.parity["passed"]]
    hint = "no bundle was written; "
    if passed:
        hint += (f"{', '.join(_named(a) for a in passed)} passed: rerun with --format "
                 f"{','.join(dict.fromkeys(a.format for a in passed))} to keep only those, or ")
    static = [a for a in failed if (a.quantization or {}).get("calibration_samples")]
    if static:  # calibrated INT8: where the loss is, and what changes it
        from ..quantize.diagnose import describe
        q = static[0].quantization
        hint += (f"{static[0].name} was calibrated on {q['calibration_samples']} samples: give --calib a folder "
                 "with more images (64 or more, like the data the model will see), or use --int8-dynamic "
                 "(no calibration) or --fp16; ")
        ac = q.get("accuracy_control")
        if ac:  # accuracy-aware INT8 did what it could: the calibration windows are the lever left
            hint += (f"accuracy control kept {len(q.get('float_layers', []))} layers in float and reached "
                     f"{ac['after']:.3f} on the calibration windows (target {ac['target']}, plain INT8 "
                     f"{ac['before']}): calibrate on volumes "
                     "like the site's (--calib DIR) or use --bf16 / --fp16; ")
        if q.get("worst_layers"):
            hint += (f"the layers that lose the most (cosine fp32 vs INT8 in -> out) are "
                     f"{describe(q['worst_layers'][:3])}; ")
    else:
        hint += "try another precision or more representative calibration data; "
    hint += "or pass --force to keep the failing artifact (marked in the manifest; the runtime will not use it)"
    raise ParityError("; ".join(f"{_named(a)} failed its parity gate: {'; '.join(a.parity['failures'])}"
                                for a in failed), hint)


def _named(a: Artifact) -> str:
    return a.name if a.role == "model" else f"{a.name} ({a.role})"


def _labels(given, spec, reference: dict, options: dict) -> list[str] | None:
    """Class names for the head's outputs: --labels, else the spec's when they fit (a
    fine-tuned or tiny head may have another count: then class_i)."""
    if "logits" not in reference:
        if given is not None:
            raise UsageError("--labels given but this checkpoint has no classification head")
        return None
    n = reference["logits"].shape[1]
    if given is not None:
        if len(given) != n:
            raise UsageError(f"--labels has {len(given)} names but the model has {n} outputs")
        return list(given)
    named = options.get("class_texts") or spec.labels  # CITE: the class texts the file was trained on
    return list(named) if named and len(named) == n else [f"class_{i}" for i in range(n)]
