"""export(): checkpoint -> torch reference -> ONNX / OpenVINO IR -> quantize -> verify -> bundle.

Every artifact is run on its real backend against the torch fp32 reference before the
bundle exists; a failed gate raises and leaves nothing behind unless `force=True`.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import __version__
from ..bundle import SCHEMA_VERSION, BundleWriter, bundle_path, now_iso, sha256
from ..errors import ParityError, UsageError
from ..models import build, get_spec, load
from ..parity import compare, gates_for
from ..quantize.calibration import folder_inputs, split_holdout, synthetic_inputs
from ..runtime.backend import backend_class
from .onnx import export_onnx, onnx_files, onnx_load, save_onnx

FORMATS = ("onnx", "openvino")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int8-dynamic")
# How each (format, precision) runs: the runtime options are stored in the manifest,
# so the runtime executes exactly what verification measured.
OV_HINTS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}


def _versions() -> dict:
    names = ("torch", "onnx", "onnxruntime", "openvino", "nncf", "numpy", "pillow")
    out = {"omedge": __version__}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _check_request(formats, precision, calib):
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise UsageError(f"unknown format {', '.join(bad)}", f"choose from {', '.join(FORMATS)} "
                         "(tensorrt: build the engine on the target GPU from the ONNX file; gguf: LLMs only)")
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision '{precision}'", f"choose from {', '.join(PRECISIONS)}")
    if precision == "bf16" and "onnx" in formats:
        raise UsageError("bf16 is an OpenVINO execution precision; onnxruntime's CPU provider has no bf16 kernels",
                         "use --format openvino --bf16, or --fp16 for ONNX")
    if precision == "int8" and calib is None:
        raise UsageError("static INT8 needs calibration images: --calib DIR",
                         "or --calib synthetic (random images; the manifest records it), "
                         "or --int8-dynamic for weight-only/dynamic INT8 without calibration")


def export(model_id: str, weights: str | Path | None = None, *, out: str | Path | None = None,
           variant: str | None = None, formats=("onnx",), precision: str = "fp32",
           calib: str | Path | None = None, calib_size: int = 64, verify_data: str | Path | None = None,
           verify_size: int = 8, random_weights: bool = False, seed: int = 0, trust_checkpoint: bool = False,
           labels: list[str] | None = None, frames: int | None = None, overwrite: bool = False,
           force: bool = False, log: Callable[[str], None] = lambda msg: None) -> Path:
    """Export `model_id` into a verified bundle folder and return its path.
    frames: clip length for video models (Endo-FM: 8 by default; the 8-row time table
    is resized by nearest neighbour, as the official code does)."""
    formats = tuple(formats)
    _check_request(formats, precision, calib)
    spec = get_spec(model_id)
    pre, input_shape, build_options = spec.preprocess, tuple(spec.input_shape), {}
    if frames is not None:
        if pre.get("kind") != "video":
            raise UsageError(f"--frames applies to video models; {model_id} takes single images")
        if frames < 1:
            raise UsageError("--frames must be at least 1")
        pre = {**pre, "frames": frames}
        input_shape = (input_shape[0], input_shape[1], frames, *input_shape[3:])
        build_options["num_frames"] = frames
    if weights is None and not random_weights:
        raise UsageError(f"no weights given for {model_id}",
                         "pass --weights PATH (the official checkpoint), or --random-weights for a demo")
    if out is not None:
        bundle_path(out, overwrite)  # fail before the slow part
    plans_file = Path(str(weights) + ".pkl") if weights is not None else None
    if plans_file is not None and plans_file.is_file() and pre.get("kind") == "volume":
        from ..models.nnunet_plans import preprocess_from_plans, read_plans
        log(f"reading the nnU-Net plans {plans_file.name}")
        pre = {**pre, **preprocess_from_plans(read_plans(plans_file))}
    if weights is not None:
        log(f"loading {Path(weights).name}")
        model, variant, options = load(spec, weights, variant, trust=trust_checkpoint, **build_options)
        weights_info = {"source": "checkpoint", "file": Path(weights).name, "sha256": sha256(Path(weights))}
    else:
        variant = variant or spec.default_variant
        options = {**spec.default_options, **build_options}
        model = build(spec, variant, seed=seed, **options)
        weights_info = {"source": "random", "seed": seed,
                        "warning": "RANDOM WEIGHTS: for testing the pipeline only, not a medical model"}
    if labels is not None and not getattr(model, "head", None) and pre.get("kind") != "volume":
        raise UsageError("--labels given but this checkpoint has no classification head")
    out = Path(out or f"{model_id}-{variant}-{precision}{'-random' if random_weights else ''}.omedge")

    # Inputs: calibration (for static INT8) and verification (held out from the
    # calibration folder when there is one, else --verify-data, else synthetic).
    calib_x, calib_info = None, None
    verify_parts, verify_info = [], {}
    if calib is not None and str(calib) != "synthetic":
        log(f"reading calibration {'clips' if pre.get('kind') == 'video' else 'images'} from {calib}")
        x, names = folder_inputs(calib, pre, limit=calib_size + verify_size)
        calib_x, held, held_names = split_holdout(x, names, verify_size)
        calib_info = {"source": "folder", "folder": str(calib), "samples": len(calib_x)}
        verify_parts.append(held)
        verify_info["held_out_calibration_images"] = [Path(n).name for n in held_names]
    elif calib is not None:
        calib_x = synthetic_inputs(calib_size, seed + 1, pre)
        calib_info = {"source": "synthetic", "samples": len(calib_x),
                      "warning": "calibrated on synthetic images at the user's request"}
    if verify_data is not None:
        x, names = folder_inputs(verify_data, pre, limit=verify_size)
        verify_parts.append(x)
        verify_info["verify_data"] = [Path(n).name for n in names]
    volume = pre.get("kind") == "volume"
    n_min, verify_size = (2, min(verify_size, 2)) if volume else (4, verify_size)  # 3-D patches are large
    n_have = sum(len(p) for p in verify_parts)
    if n_have < n_min:
        verify_parts.append(synthetic_inputs(max(n_min, verify_size) - n_have, seed + 2, pre))
        verify_info["synthetic"] = max(n_min, verify_size) - n_have
    # Stored as float16 in the bundle: round first so the reference sees the same input.
    verify_x = np.concatenate(verify_parts).astype(np.float16).astype(np.float32)

    with torch.no_grad():
        reference = {k: v.numpy() for k, v in model(torch.from_numpy(verify_x)).items()}
    output_names = list(reference)
    task = "segmentation" if volume else ("classification" if "logits" in output_names else "embedding")
    label_names = _labels(labels, spec, reference) if task != "embedding" else None
    phantom = None
    if volume:  # whole-volume check: the same pipeline with torch and with each artifact
        from ..runtime.volume import segment, synthetic_ct
        log("segmenting the verification phantom with torch fp32")
        phantom = synthetic_ct(seed=seed + 3)
        phantom_ref = segment(phantom, _torch_runner(model), pre)

    with BundleWriter(out, overwrite=overwrite) as writer:
        n_params = sum(p.numel() for p in model.parameters())
        writer.check_space(int(n_params * 4 * (1 + len(formats)) * 1.2) + (50 << 20))
        work = writer.dir / ".work"
        work.mkdir()
        log("exporting ONNX (fp32)")
        onnx_fp32 = work / "model.onnx"
        onnx_info = export_onnx(model, torch.from_numpy(verify_x[:1]), onnx_fp32, spec.input_name, output_names,
                                spatial_dynamic=volume and any(d is None for d in input_shape[2:]))
        artifacts = []
        for fmt in formats:
            log(f"building {fmt} {precision}")
            art = _build_artifact(fmt, precision, onnx_fp32, writer.dir, spec.input_name, calib_x)
            log(f"verifying {art['name']} against torch fp32 on {len(verify_x)} inputs")
            art["parity"] = _verify(art, writer.dir, spec.input_name, verify_x, reference, precision,
                                    (phantom, phantom_ref, pre) if volume else None)
            if not art["parity"]["passed"]:
                if not force:
                    raise ParityError(f"{art['name']} failed its parity gate: {'; '.join(art['parity']['failures'])}",
                                      "no bundle was written; try another precision or more representative "
                                      "calibration images, or pass --force to keep it (marked in the manifest)")
                log(f"WARNING: {art['name']} failed parity, kept because of --force")
            artifacts.append(art)
        _remove_tree(work)
        extra = {}
        if volume:
            extra = {"phantom": phantom.data.astype(np.int16), "phantom_affine": phantom.affine,
                     "phantom_labels": phantom_ref}
        np.savez_compressed(writer.dir / "parity.npz", inputs=verify_x.astype(np.float16),
                            **{f"ref_{k}": v for k, v in reference.items()}, **extra)
        manifest = {
            "schema_version": SCHEMA_VERSION, "created": now_iso(),
            "model": {"id": spec.id, "variant": variant, "title": spec.title, "task": task,
                      "options": options, "licence": spec.licence, "source": spec.source,
                      "parameters": int(n_params), "notes": spec.notes},
            "weights": weights_info,
            "input": {"name": spec.input_name, "shape": list(input_shape), "dtype": "float32",
                      "layout": "NCTHW" if len(input_shape) == 5 else "NCHW"},
            "outputs": [{"name": k, "shape": [None, *v.shape[1:]]} for k, v in reference.items()],
            "primary_output": "logits" if task == "classification" else "embedding",
            "labels": label_names,
            "preprocess": pre,
            "onnx_export": onnx_info,
            "calibration": calib_info,
            "verification": {"file": "parity.npz", "samples": int(len(verify_x)), **verify_info,
                             "reference": "torch fp32 eager on this machine"},
            "artifacts": artifacts,
            "forced": any(not a["parity"]["passed"] for a in artifacts),
            "tools": _versions(),
        }
        path = writer.commit(manifest)
    log(f"wrote {path}")
    return path


def _build_artifact(fmt, precision, onnx_fp32: Path, root: Path, input_name: str, calib_x) -> dict:
    from ..quantize import nncf_int8, onnx_int8
    from . import openvino as ovx
    name = f"{fmt}-{precision}"
    art = {"name": name, "format": fmt, "precision": precision}
    if fmt == "onnx":
        dst = root / ("model.onnx" if precision == "fp32" else f"model-{precision}.onnx")
        if precision == "fp32":
            for src in onnx_files(onnx_fp32):  # the model and, past 2 GB, its weights file
                target = dst.with_name(src.name.replace(onnx_fp32.name, dst.name))
                os.link(src, target) if _same_fs(src, target) else shutil.copyfile(src, target)
        elif precision == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16
            save_onnx(convert_float_to_float16(onnx_load(onnx_fp32), keep_io_types=True), dst)
        elif precision == "int8":
            art["quantization"] = onnx_int8.quantize_static(onnx_fp32, dst, input_name, calib_x)
        else:
            art["quantization"] = onnx_int8.quantize_dynamic(onnx_fp32, dst)
        files = [f.name for f in onnx_files(dst)]
        art.update(entry=dst.name, files=files, runtime={"onnxruntime": {}, "openvino": {
            "inference_precision": "f32"}})
        return art
    ov_model = ovx.convert(onnx_fp32)
    runtime = {}
    if precision == "int8":
        ov_model, art["quantization"] = nncf_int8.quantize_static(ov_model, calib_x)
    elif precision == "int8-dynamic":
        ov_model, art["quantization"] = nncf_int8.compress_weights(ov_model)
    else:
        runtime["inference_precision"] = OV_HINTS[precision]
    files = ovx.save_ir(ov_model, root / "openvino" / f"model-{precision}.xml",
                        compress_to_fp16=precision in ("fp16", "bf16"))
    art.update(entry=files[0].relative_to(root).as_posix(),
               files=[f.relative_to(root).as_posix() for f in files], runtime={"openvino": runtime})
    return art


def _labels(given, spec, reference) -> list[str]:
    """Class names for the head's outputs: --labels, else the spec's when they fit (a
    fine-tuned or tiny head may have another count: then class_i)."""
    n = reference["logits"].shape[1]
    if given is not None:
        if len(given) != n:
            raise UsageError(f"--labels has {len(given)} names but the model has {n} outputs")
        return list(given)
    return list(spec.labels) if spec.labels and len(spec.labels) == n else [f"class_{i}" for i in range(n)]


def _torch_runner(model):
    def run(batch):
        with torch.no_grad():
            return model(torch.from_numpy(batch))["logits"].numpy()
    return run


def _verify(art, root: Path, input_name, verify_x, reference, precision, volume=None) -> dict:
    """Parity on every installed backend that can run the artifact. The runtime only
    uses the backends listed in `verified_backends`, so what runs is what was measured.
    The record shown is the first backend's that passed (else the first backend's)."""
    from ..runtime.backend import FORMAT_BACKENDS, probe
    results = {}
    for backend in FORMAT_BACKENDS[art["format"]]:
        if probe(backend)["installed"]:
            results[backend] = _verify_on(backend, art, root, input_name, verify_x, reference, precision, volume)
    art["verified_backends"] = [b for b, r in results.items() if r["passed"]]
    chosen = dict(next((r for r in results.values() if r["passed"]), next(iter(results.values()))))
    chosen["backends"] = {b: {"passed": r["passed"], "failures": r["failures"]} for b, r in results.items()}
    chosen["passed"] = bool(art["verified_backends"])
    return chosen


def _verify_on(backend, art, root: Path, input_name, verify_x, reference, precision, volume) -> dict:
    # bf16 is verified even where this CPU only emulates it: slow, but the numbers are bf16's
    options = {**art["runtime"].get(backend, {}), "allow_emulated_bf16": True}
    runner = backend_class(backend)({"model": root / art["entry"]}, "cpu", options)
    outs = {}
    for i in range(len(verify_x)):  # batch 1, as the quantizer calibrated
        for k, v in runner.run({input_name: verify_x[i:i + 1]}).items():
            outs.setdefault(k, []).append(v)
    result = compare(reference, {k: np.concatenate(v) for k, v in outs.items()}, gates_for(precision))
    if volume is not None:
        from ..runtime.volume import volume_dice
        phantom, ref_labels, pre = volume
        result["volume_dice"], failures = volume_dice(
            lambda b: runner.run({input_name: b})["logits"], phantom, ref_labels, pre, precision)
        result["failures"] += failures
        result["passed"] = not result["failures"]
    result["measured_with"] = runner.describe()
    return result


def _same_fs(a: Path, b: Path) -> bool:
    return a.parent.stat().st_dev == b.parent.stat().st_dev


def _remove_tree(path: Path):
    shutil.rmtree(path, ignore_errors=True)
