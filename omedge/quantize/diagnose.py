"""Which quantized layers lose the most: the fp32 and the INT8 ONNX graph are run on one
calibration sample with the outputs of their quantized nodes exposed, and each node's
output is compared by cosine. A refused INT8 export names these layers, so the user
knows where the loss is, not only that the final output missed its gate."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")


def _exposed(model: onnx.ModelProto, names: list[str], path: Path) -> Path:
    """`model` with the tensors `names` added as graph outputs, saved to `path`."""
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                              for n in names if n not in have)
    onnx.save(model, str(path))
    return path


def _session(path: Path):
    from ..offline import quiet_onnxruntime
    quiet_onnxruntime()
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


def layer_losses(fp32: Path, int8: Path, feed: dict, worst: int = 5) -> list[dict]:
    """The `worst` quantized nodes by the cosine they lose: cosine (fp32 vs INT8 run) of
    the node's float input minus that of its output, so a layer is not blamed for the
    error it inherits. Node names are those of the graph the quantizer read (`fp32`)."""
    ref_model, q_model = onnx.load(str(fp32)), onnx.load(str(int8))
    q_nodes = {n.name: n for n in q_model.graph.node}
    dq_outputs = {o for n in q_model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    inits = {i.name for i in ref_model.graph.initializer}
    nodes = [n for n in ref_model.graph.node if n.op_type in QUANTIZED_OPS and n.name in q_nodes
             and any(i in dq_outputs for i in q_nodes[n.name].input)]  # only nodes the quantizer changed
    pairs = [(n, next((i for i in n.input if i not in inits), None), n.output[0]) for n in nodes]
    names = sorted({t for _, i, o in pairs for t in (i, o) if t is not None and t not in feed})
    if not names:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        ref = _session(_exposed(ref_model, names, Path(tmp) / "fp32.onnx"))
        got = _session(_exposed(q_model, names, Path(tmp) / "int8.onnx"))
        a = {**feed, **dict(zip(names, ref.run(names, feed)))}
        b = {**feed, **dict(zip(names, got.run(names, feed)))}
    rows = []
    for n, i, o in pairs:
        c_out = _cosine(a[o], b[o])
        c_in = _cosine(a[i], b[i]) if i is not None else 1.0
        rows.append({"node": n.name, "op": n.op_type, "cosine_in": round(c_in, 6), "cosine_out": round(c_out, 6),
                     "loss": round(c_in - c_out, 6)})
    return sorted(rows, key=lambda r: -r["loss"])[:worst]


def describe(rows: list[dict]) -> str:
    """'node (cosine in -> out)', worst first, for an error message."""
    return ", ".join(f"{r['node']} (cosine {r['cosine_in']:.4f} -> {r['cosine_out']:.4f})" for r in rows)
