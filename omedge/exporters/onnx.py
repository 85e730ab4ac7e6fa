"""torch -> ONNX, dynamic batch. The TorchScript exporter (dynamo=False) is used for
the image encoders: it is fast, gives plain MatMul/Softmax attention nodes that the
quantizers handle, and its graph is stable across torch releases."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ..models.layers.stable_norm import stable_instance_norms

OPSET = 17
EXTERNAL_DATA_LIMIT = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB ceiling, with margin


class _TupleOutputs(torch.nn.Module):
    """ONNX outputs are positional; name them from the model's output dict."""

    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs):
        out = self.model(*inputs)
        return tuple(out[n] for n in self.names)


def dynamic_axes(tensors: list[dict]) -> dict:
    """{name: {axis: label}} from the declared TensorSpecs (the manifest's dicts)."""
    return {t["name"]: {int(a): label for a, label in t.get("dynamic", {}).items()} for t in tensors}


def export_onnx(model, examples: tuple, path: Path, inputs: list[dict], outputs: list[dict],
                opset: int = OPSET, stable_norm: bool = True) -> dict:
    """Write `path` (plus `path.data` when the weights pass 2 GB, e.g. STU-Net-H); return
    a record for the manifest. Names and dynamic axes come from the declared tensors.
    InstanceNorms are exported axis by axis (`stable_norm`): onnxruntime's own
    InstanceNormalization is off by ~1e-4 on 128^3 volumes (layers/stable_norm.py)."""
    if isinstance(examples, torch.Tensor):
        examples = (examples,)
    input_names, output_names = [i["name"] for i in inputs], [o["name"] for o in outputs]
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = n_bytes > EXTERNAL_DATA_LIMIT
    # Past 2 GB torch writes one file per tensor beside the model: export into a scratch
    # folder, then gather the weights into the single `<name>.data` file the bundle lists.
    scratch = Path(tempfile.mkdtemp(prefix=".onnx-export-", dir=path.parent)) if external else None
    target = scratch / path.name if external else path
    dynamic = dynamic_axes(inputs + outputs)
    # eval() on the wrapper too: the exporter restores the wrapper's mode afterwards,
    # which would otherwise leave the model training (dropout on) for verification
    wrapper = _TupleOutputs(model.eval(), output_names).eval()
    with warnings.catch_warnings(), torch.no_grad(), _norms(wrapper, stable_norm) as n_norms:
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(examples), str(target),
                          input_names=input_names, output_names=output_names, dynamic_axes=dynamic,
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    if external:
        try:
            gather_external_data(target, path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return {"exporter": "torch.onnx (TorchScript)", "opset": opset, "external_data": external,
            "stable_instance_norm": n_norms,
            "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in dynamic.items()}}


def _norms(wrapper, stable: bool):
    """The InstanceNorm swap, or a no-op yielding 0 (the plain InstanceNormalization export)."""
    return stable_instance_norms(wrapper) if stable else contextlib.nullcontext(0)


def gather_external_data(src: Path, dst: Path) -> list[Path]:
    """Write `dst` and one `dst.data` holding every weight of `src`. Weights that live in
    files beside `src` (torch writes one per tensor past 2 GB) are copied one tensor at a
    time, so a 5.8 GB model is never held in memory whole; inline weights are moved out."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo
    model = onnx.load(str(src), load_external_data=False)
    tensors = list(model.graph.initializer)
    if not any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors):
        return save_onnx(onnx.load(str(src)), dst, external=True)  # under 2 GB: in memory is fine
    data = dst.with_name(dst.name + ".data")
    with open(data, "wb") as out:
        for t in tensors:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = ExternalDataInfo(t)
                with open(src.parent / info.location, "rb") as f:
                    f.seek(info.offset or 0)
                    payload = f.read(info.length) if info.length else f.read()
            elif len(t.raw_data) >= 1024:
                payload = t.raw_data
            else:
                continue  # small tensors stay in the graph, as onnx.save_model leaves them
            out.write(b"\0" * (-out.tell() % 4096))  # page-aligned, so runtimes can mmap
            offset = out.tell()
            out.write(payload)
            t.ClearField("raw_data")
            del t.external_data[:]
            for key, value in (("location", data.name), ("offset", offset), ("length", len(payload))):
                entry = t.external_data.add()
                entry.key, entry.value = key, str(value)
            t.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(model, str(dst))
    return [dst, data]


def onnx_load(path: Path):
    import onnx
    return onnx.load(str(path))  # with its external data, read from beside the file


def save_onnx(model, path: Path, external: bool | None = None) -> list[Path]:
    """Save an ONNX model; its weights go to `<name>.data` beside it when asked or when
    the model would pass protobuf's 2 GB. Returns the files written."""
    import onnx
    if external is None:
        external = model.ByteSize() > EXTERNAL_DATA_LIMIT
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        return [path, data]
    onnx.save_model(model, str(path))
    return [path]


def onnx_files(path: Path) -> list[Path]:
    """The model file and, for a model with external weights, its data file."""
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


def uses_external_data(path: Path) -> bool:
    return len(onnx_files(path)) > 1
