"""Open Inference Protocol v2 (KServe / Triton) REST codec, numpy only.

Requests are JSON, or JSON followed by raw tensor bytes (Triton's binary tensor data
extension: the `Inference-Header-Content-Length` header gives the JSON's length and each
input's `parameters.binary_data_size` its share of the rest). `tritonclient.http` sends
binary data by default, so both must work. BYTES tensors are UTF-8 strings in JSON, and
4-byte little-endian length-prefixed elements in binary.
"""
from __future__ import annotations

import json
import struct

import numpy as np

from ..errors import InputError

DATATYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
             "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "float16",
             "FP32": "float32", "FP64": "float64", "BYTES": "object"}
_BY_NUMPY = {v: k for k, v in DATATYPES.items()}
MAX_ELEMENTS = 1 << 31   # a declared shape beyond this is refused before anything is allocated


def datatype_of(dtype) -> str:
    name = np.dtype(dtype).name
    if name not in _BY_NUMPY or name == "object":
        return "BYTES"
    return _BY_NUMPY[name]


def tensor_metadata(spec: dict) -> dict:
    """A manifest TensorSpec -> OIP tensor metadata (-1 for a dynamic axis)."""
    return {"name": spec["name"], "datatype": datatype_of(spec["dtype"]),
            "shape": [-1 if d is None else int(d) for d in spec["shape"]]}


def describe(meta: dict) -> str:
    return f"'{meta['name']}' {meta['datatype']} {meta['shape']}"


# ---------------------------------------------------------------- requests

def parse_request(body: bytes, header_length: str | None) -> tuple[dict, dict, bytes]:
    """(request JSON, input tensors by name, the binary tail) from an infer body."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise InputError(f"Inference-Header-Content-Length {header_length!r} is not a number") from None
        if not 0 < n <= len(body):
            raise InputError(f"Inference-Header-Content-Length {n} does not fit the {len(body)}-byte body")
        head, tail = body[:n], body[n:]
    else:
        head, tail = body, b""
    try:
        request = json.loads(head)
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"the inference request is not valid JSON ({e})") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise InputError("the inference request needs an 'inputs' list", "see the Open Inference Protocol v2")
    tensors, offset = {}, 0
    for item in request["inputs"]:
        name, array, used = _input_tensor(item, tail, offset)
        if name in tensors:
            raise InputError(f"input '{name}' is given twice")
        tensors[name], offset = array, offset + used
    if offset != len(tail):
        raise InputError(f"the body has {len(tail) - offset} bytes of binary data that no input claims")
    return request, tensors, tail


def _input_tensor(item, tail: bytes, offset: int) -> tuple[str, np.ndarray, int]:
    if not isinstance(item, dict) or not all(k in item for k in ("name", "shape", "datatype")):
        raise InputError("each input needs 'name', 'shape' and 'datatype'")
    name, shape, datatype = str(item["name"]), item["shape"], item["datatype"]
    if datatype not in DATATYPES:
        raise InputError(f"input '{name}': unknown datatype {datatype!r}", f"OIP datatypes: {', '.join(DATATYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise InputError(f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count > MAX_ELEMENTS:
        raise InputError(f"input '{name}': shape {shape} has too many elements")
    size = (item.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(tail):
            raise InputError(f"input '{name}': binary_data_size {size!r} runs past the body")
        raw = tail[offset:offset + size]
        array = decode_bytes(raw, count, name) if datatype == "BYTES" else _from_buffer(raw, datatype, count, name)
        return name, array.reshape(shape), size
    if "data" not in item:
        raise InputError(f"input '{name}' has neither 'data' nor binary data")
    return name, _from_json(item["data"], datatype, shape, count, name), 0


def _from_buffer(raw: bytes, datatype: str, count: int, name: str) -> np.ndarray:
    dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise InputError(f"input '{name}': {len(raw)} bytes of binary data for {count} {datatype} elements "
                         f"({count * dtype.itemsize} bytes expected)")
    return np.frombuffer(raw, dtype).astype(dtype.newbyteorder("="))


def _from_json(data, datatype: str, shape: list, count: int, name: str) -> np.ndarray:
    if datatype == "BYTES":
        flat = np.asarray(data, dtype=object).reshape(-1)
        items = [x.encode("utf-8") if isinstance(x, str) else x for x in flat]
        if not all(isinstance(x, bytes) for x in items):
            raise InputError(f"input '{name}': BYTES data must be strings")
        array = np.empty(len(items), object)
        array[:] = items
    else:
        try:
            array = np.asarray(data, dtype=DATATYPES[datatype]).reshape(-1)
        except (TypeError, ValueError, OverflowError) as e:
            raise InputError(f"input '{name}': data is not {datatype} ({e})") from None
    if array.size != count:
        raise InputError(f"input '{name}': {array.size} values for shape {shape} ({count} expected)")
    return array.reshape(shape)


def decode_bytes(raw: bytes, count: int, name: str) -> np.ndarray:
    """Triton's BYTES serialisation: each element a uint32 LE length, then its bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InputError(f"input '{name}': truncated BYTES element length")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise InputError(f"input '{name}': a BYTES element of {n} bytes runs past the data")
        out.append(raw[pos + 4:pos + 4 + n])
        pos += 4 + n
    if len(out) != count:
        raise InputError(f"input '{name}': {len(out)} BYTES elements for {count} in the shape")
    array = np.empty(len(out), object)
    array[:] = out
    return array


def encode_bytes(values) -> bytes:
    parts = []
    for v in np.asarray(values, dtype=object).reshape(-1):
        b = v if isinstance(v, bytes) else str(v).encode("utf-8")
        parts.append(struct.pack("<I", len(b)) + b)
    return b"".join(parts)


def check_declared(declared: list[dict], tensors: dict) -> dict:
    """The request's tensors against the manifest's inputs: same names, datatypes, ranks
    and fixed sizes; a 400 names the expected spec."""
    want = {d["name"]: tensor_metadata(d) for d in declared}
    spec = "; ".join(describe(m) for m in want.values())
    unknown = [n for n in tensors if n not in want]
    missing = [n for n in want if n not in tensors]
    if unknown or missing:
        what = f"unknown input(s) {unknown}" if unknown else f"missing input(s) {missing}"
        raise InputError(f"{what}; this model takes {spec}", "send the declared inputs (see GET /v2/models/NAME)")
    feeds = {}
    for name, meta in want.items():
        got = tensors[name]
        got_type = datatype_of(got.dtype)
        shape_ok = got.ndim == len(meta["shape"]) and all(w in (-1, g) for w, g in zip(meta["shape"], got.shape))
        if got_type != meta["datatype"] or not shape_ok:
            raise InputError(f"input '{name}' is {got_type} {list(got.shape)}; expected {describe(meta)}",
                             "-1 marks an axis of any size")
        feeds[name] = got
    rows = {len(v) for v in feeds.values()}
    if len(rows) > 1:
        raise InputError(f"inputs disagree on the batch size: {sorted(rows)}")
    return feeds


# ---------------------------------------------------------------- responses

def requested_outputs(request: dict, available: list[str]) -> tuple[list[str], dict[str, bool]]:
    """Which outputs to return and which in binary (per output, or binary_data_output)."""
    default = bool((request.get("parameters") or {}).get("binary_data_output", False))
    asked = request.get("outputs")
    if not asked:
        return list(available), {n: default for n in available}
    names, binary = [], {}
    for o in asked:
        name = o.get("name") if isinstance(o, dict) else None
        if name not in available:
            raise InputError(f"unknown output {name!r}", f"this model returns {', '.join(available)}")
        names.append(name)
        binary[name] = bool((o.get("parameters") or {}).get("binary_data", default))
    return names, binary


def encode_response(model: str, request: dict, outputs: dict, names: list[str], binary: dict,
                    parameters: dict) -> tuple[bytes, int | None]:
    """(body, JSON header length or None when no output is binary)."""
    items, blobs = [], []
    for name in names:
        value = outputs[name]
        array = np.asarray(value, dtype=object) if isinstance(value, list) else np.asarray(value)
        datatype = datatype_of(array.dtype) if array.dtype != object else "BYTES"
        entry = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary[name]:
            blob = encode_bytes(array) if datatype == "BYTES" else np.ascontiguousarray(array).astype(
                array.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = [str(x) for x in array.reshape(-1)] if datatype == "BYTES" else array.reshape(-1).tolist()
        items.append(entry)
    response = {"model_name": model, "model_version": "1", "outputs": items, "parameters": parameters}
    if "id" in request:
        response["id"] = request["id"]
    head = json.dumps(response).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
