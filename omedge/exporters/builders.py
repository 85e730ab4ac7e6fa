"""One function per builder named in the recipe table (omedge.formats): fp32 ONNX ->
the artifact's files inside the bundle folder. Returns (entry, files, quantization).
Every builder takes the kind's quantization metric; only OpenVINO static INT8 uses it."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .onnx import onnx_files, onnx_load, save_onnx


def _rel(paths, root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in paths]


def _onnx_target(root: Path, recipe, role: str) -> Path:
    stem = "model" if role == "model" else role
    return root / (f"{stem}.onnx" if recipe.precision == "fp32" else f"{stem}-{recipe.precision}.onnx")


def onnx_fp32(src: Path, root: Path, recipe, role, calib, metric=None):
    dst = _onnx_target(root, recipe, role)
    for f in onnx_files(src):  # the model and, past 2 GB, its weights file
        target = dst.with_name(f.name.replace(src.name, dst.name))
        if f.parent.stat().st_dev == target.parent.stat().st_dev:
            os.link(f, target)
        else:
            shutil.copyfile(f, target)
    return dst, None


def onnx_fp16(src, root, recipe, role, calib, metric=None):
    from onnxruntime.transformers.float16 import convert_float_to_float16
    dst = _onnx_target(root, recipe, role)
    save_onnx(convert_float_to_float16(onnx_load(src), keep_io_types=True), dst)
    return dst, None


def onnx_int8_static(src, root, recipe, role, calib, metric=None):
    from ..quantize import onnx_int8
    dst = _onnx_target(root, recipe, role)
    return dst, onnx_int8.quantize_static(src, dst, calib)


def onnx_int8_dynamic(src, root, recipe, role, calib, metric=None):
    from ..quantize import onnx_int8
    dst = _onnx_target(root, recipe, role)
    return dst, onnx_int8.quantize_dynamic(src, dst)


def _save_ir(ov_model, root: Path, recipe, role, quantization=None):
    from . import openvino as ovx
    stem = "model" if role == "model" else role
    files = ovx.save_ir(ov_model, root / "openvino" / f"{stem}-{recipe.precision}.xml",
                        compress_to_fp16=recipe.precision in ("fp16", "bf16"))
    return files[0], quantization, files


def _convert(src: Path):
    """ONNX -> OpenVINO model whose outputs carry exactly the ONNX output names: OpenVINO
    merges the names of fused nodes into an output tensor (a LayerNorm's Div + Mul + Add),
    and a backend reading `any_name` would then see an internal name."""
    from . import openvino as ovx
    model = ovx.convert(src)
    import onnx  # the graph's output names only: its weights (maybe hard-linked external data) are not read
    names = [o.name for o in onnx.load(str(src), load_external_data=False).graph.output]
    if len(names) == len(model.outputs):
        for port, name in zip(model.outputs, names):
            port.get_tensor().set_names({name})
    return model


def openvino_ir(src, root, recipe, role, calib, metric=None):
    entry, _, _ = _save_ir(_convert(src), root, recipe, role)
    return entry, None


def openvino_int8_static(src, root, recipe, role, calib, metric=None):
    from ..quantize import nncf_int8
    model, info = nncf_int8.quantize_static(_convert(src), calib, metric)
    return _save_ir(model, root, recipe, role)[0], info


def openvino_int8_weights(src, root, recipe, role, calib, metric=None):
    from ..quantize import nncf_int8
    model, info = nncf_int8.compress_weights(_convert(src))
    return _save_ir(model, root, recipe, role)[0], info


def build(recipe, src: Path, root: Path, role: str, calib, metric=None) -> tuple[str, list[str], dict | None]:
    """metric: the kind's quantization metric (Kind.quantization_metric): OpenVINO static
    INT8 restores it with accuracy-aware quantization; the other builders need none."""
    entry, quantization = globals()[recipe.builder](src, root, recipe, role, calib, metric)
    if entry.suffix == ".xml":
        files = [entry, entry.with_suffix(".bin")]
    else:
        files = onnx_files(entry)
    return entry.relative_to(root).as_posix(), _rel(files, root), quantization
