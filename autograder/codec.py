"""The safe wire format between the learner's code and the grader: JSON, with tensors as base64 raw bytes.

Everything the grader sends to learner code (inputs) and gets back (results) passes through `dumps`/`loads`,
whether the learner code runs in this process (the notebook self-check) or in a child process (the command
line and the batch grader). The decoder builds only plain values: None, bool, int, float, str, list, tuple,
dict and torch tensors created from raw bytes. It never imports, calls or unpickles anything named in the data,
so a hostile child cannot make the parent run code by what it writes.

Wire format (a JSON document):
- null, true/false, numbers (ints of any size, finite floats) and strings stand for themselves;
- a JSON array is a Python list;
- an object always has exactly one key that names a tagged value:
  {"$float": "nan" | "inf" | "-inf"}, {"$tuple": [...]}, {"$dict": [[key, value], ...]} (keys: str or int),
  {"$tensor": {"dtype": "float32", "shape": [2, 3], "data": "<base64 of the raw little-endian bytes>"}}.

The encoder accepts exactly those types (numpy arrays become tensors) and refuses everything else, including
subclasses of int, float, str, list, dict and Tensor, because a subclass can lie (`__eq__`, `__index__`,
`__float__`); the error message says what was found and what is accepted.
"""

from __future__ import annotations

import base64
import json
import math
import sys
from typing import Any

import torch

# dtype name on the wire <-> torch dtype. Only these travel; anything else is refused on both sides.
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_DEPTH = 64  # nesting deeper than this is refused (no legitimate result needs it)
# The wire carries tensors' native bytes and says they are little-endian, which every platform torch ships for is.
assert sys.byteorder == "little", "the autograder's codec assumes a little-endian host"
ACCEPTED = "None, bool, int, float, str, list, tuple, dict (str/int keys) and torch tensors"


class CodecError(ValueError):
    """A value that cannot travel (encoding), or a document that is not valid wire format (decoding)."""


def dumps(value: Any) -> str:
    """Encode a plain value as wire-format JSON text. Raises CodecError for anything that is not plain."""
    return json.dumps(_encode(value, "result", 0), separators=(",", ":"), allow_nan=False)


def loads(text: str | bytes, *, max_bytes: int | None = None) -> Any:
    """Decode wire-format JSON text into plain values. Raises CodecError for anything malformed.

    max_bytes: refuse documents longer than this (the caller's budget for one result); None = no limit.
    """
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", errors="strict")
    if not isinstance(text, str):
        raise CodecError(f"expected wire-format text, got {type(text).__name__}")
    if max_bytes is not None and len(text) > max_bytes:
        raise CodecError(f"document of {len(text)} characters exceeds the limit of {max_bytes}")
    try:
        raw = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise CodecError(f"not valid JSON: {str(exc)[:200]}") from None
    return _decode(raw, 0)


def roundtrip(value: Any) -> Any:
    """dumps then loads: a fresh, plain copy of `value` (what the other side of the wire would see)."""
    return loads(dumps(value))


def describe(value: Any) -> str:
    """A short, safe description of a (decoded) value for feedback: type, shape and dtype, never contents."""
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {list(value.shape)} and dtype {_DTYPE_NAMES.get(value.dtype, value.dtype)}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of length {len(value)}"
    if isinstance(value, dict):
        return f"dict with keys {sorted(map(str, value))[:8]}"
    return type(value).__name__


# -- encoding -------------------------------------------------------------------------------------------------


def _encode(value: Any, where: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise CodecError(f"{where}: nested more than {MAX_DEPTH} levels deep")
    kind = type(value)  # exact types only: a subclass could lie about its value
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        return value
    if kind is float:
        if math.isfinite(value):
            return value
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if kind is list:
        return [_encode(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    if kind is tuple:
        return {"$tuple": [_encode(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]}
    if kind is dict:
        items = []
        for key, item in value.items():
            if type(key) not in (str, int):
                raise CodecError(f"{where}: dict keys must be str or int, found a key of type {type(key).__name__}")
            items.append([key, _encode(item, f"{where}[{key!r}]", depth + 1)])
        return {"$dict": items}
    if kind is torch.Tensor or kind is torch.nn.Parameter:
        return {"$tensor": _encode_tensor(value, where)}
    if _is_numpy_array(value):
        return {"$tensor": _encode_tensor(torch.from_numpy(value.copy()), where)}
    if _is_numpy_scalar(value):
        return _encode(value.item(), where, depth)
    raise CodecError(
        f"{where} is a {kind.__module__}.{kind.__qualname__}, which cannot be returned; return only {ACCEPTED}"
    )


def _encode_tensor(tensor: torch.Tensor, where: str) -> dict[str, Any]:
    # torch.Tensor.* methods called on the class, not the object: a subclass cannot reach here, but this keeps
    # the encoder independent of anything a tensor's instance dictionary might carry.
    tensor = torch.Tensor.detach(tensor)
    if tensor.dtype not in _DTYPE_NAMES:
        raise CodecError(f"{where}: tensors of dtype {tensor.dtype} cannot be returned; use one of {list(DTYPES)}")
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type == "meta":
        raise CodecError(f"{where}: only dense tensors with data can be returned (got {tensor.layout}, {tensor.device})")
    flat = tensor.to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data": base64.b64encode(raw).decode()}


def _is_numpy_array(value: Any) -> bool:
    numpy = sys.modules.get("numpy")
    return numpy is not None and type(value) is numpy.ndarray and value.dtype.kind in "fiub"


def _is_numpy_scalar(value: Any) -> bool:
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.generic) and type(value).__module__ == "numpy" and (
        value.dtype.kind in "fiub"
    )


# -- decoding -------------------------------------------------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise CodecError(f"bare {name} is not wire format (non-finite floats are tagged as {{'$float': ...}})")


def _decode(raw: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise CodecError(f"document nested more than {MAX_DEPTH} levels deep")
    if raw is None or isinstance(raw, (bool, int, float, str)):
        return raw
    if isinstance(raw, list):
        return [_decode(item, depth + 1) for item in raw]
    if not isinstance(raw, dict) or len(raw) != 1:
        raise CodecError("an object in the document must have exactly one tag key ($float, $tuple, $dict, $tensor)")
    (tag, body), = raw.items()
    if tag == "$float":
        if body not in ("nan", "inf", "-inf"):
            raise CodecError(f"$float must be 'nan', 'inf' or '-inf', got {str(body)[:20]!r}")
        return float(body)
    if tag == "$tuple":
        if not isinstance(body, list):
            raise CodecError("$tuple must hold a list")
        return tuple(_decode(item, depth + 1) for item in body)
    if tag == "$dict":
        if not isinstance(body, list):
            raise CodecError("$dict must hold a list of [key, value] pairs")
        out = {}
        for pair in body:
            if not isinstance(pair, list) or len(pair) != 2 or type(pair[0]) not in (str, int):
                raise CodecError("$dict entries must be [key, value] with a str or int key")
            out[pair[0]] = _decode(pair[1], depth + 1)
        return out
    if tag == "$tensor":
        return _decode_tensor(body)
    raise CodecError(f"unknown tag {str(tag)[:30]!r}")


def _decode_tensor(body: Any) -> torch.Tensor:
    if not isinstance(body, dict) or set(body) != {"dtype", "shape", "data"}:
        raise CodecError("$tensor must hold exactly dtype, shape and data")
    dtype = DTYPES.get(body["dtype"]) if isinstance(body["dtype"], str) else None
    if dtype is None:
        raise CodecError(f"$tensor dtype {str(body['dtype'])[:20]!r} is not one of {list(DTYPES)}")
    shape = body["shape"]
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise CodecError("$tensor shape must be a list of non-negative ints")
    if not isinstance(body["data"], str):
        raise CodecError("$tensor data must be a base64 string")
    try:
        raw = base64.b64decode(body["data"].encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise CodecError("$tensor data is not valid base64") from None
    numel = math.prod(shape)
    element_size = torch.empty((), dtype=dtype).element_size()
    if len(raw) != numel * element_size:
        raise CodecError(f"$tensor data has {len(raw)} bytes; shape {shape} of {body['dtype']} needs {numel * element_size}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype)
    return flat.reshape(shape).clone()
