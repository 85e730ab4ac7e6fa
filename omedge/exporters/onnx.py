"""torch -> ONNX, dynamic batch. The TorchScript exporter (dynamo=False) is used for
the image encoders: it is fast, gives plain MatMul/Softmax attention nodes that the
quantizers handle, and its graph is stable across torch releases."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

OPSET = 17
EXTERNAL_DATA_LIMIT = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB ceiling, with margin


class _TupleOutputs(torch.nn.Module):
    """ONNX outputs are positional; name them from the model's output dict."""

    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, x):
        out = self.model(x)
        return tuple(out[n] for n in self.names)


def export_onnx(model, example: torch.Tensor, path: Path, input_name: str, output_names: list[str],
                opset: int = OPSET, spatial_dynamic: bool = False) -> dict:
    """Write `path` (plus `path.data` when the weights pass 2 GB); return a record for
    the manifest. spatial_dynamic: volumes of any size (fully convolutional nets)."""
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = n_bytes > EXTERNAL_DATA_LIMIT
    axes = {0: "batch"}
    if spatial_dynamic:
        axes.update({2: "depth", 3: "height", 4: "width"})
    dynamic = {input_name: axes, **{n: dict(axes) for n in output_names}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # eval() on the wrapper too: the exporter restores the wrapper's mode afterwards,
        # which would otherwise leave the model training (dropout on) for verification
        torch.onnx.export(_TupleOutputs(model.eval(), output_names).eval(), (example,), str(path),
                          input_names=[input_name], output_names=output_names, dynamic_axes=dynamic,
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    if external:
        import onnx
        m = onnx.load(str(path))
        onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
    return {"exporter": "torch.onnx (TorchScript)", "opset": opset, "external_data": external,
            "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in dynamic.items()}}
