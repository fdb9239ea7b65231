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

Decoding never raises anything but CodecError, whatever the text (deep nesting, huge or negative shapes, wrong
types anywhere): a malformed result costs only its own case. `parse_result_line` does the same for the lines of
a grading child's results file.

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
MAX_TENSOR_DIMS = 32  # a shape with more entries is refused (torch allows at most 64)
MAX_TENSOR_DIM = 2**48  # a larger size in a shape is refused (torch sizes are int64; strides multiply them)
RESULT_FIELDS = ("exercise", "case", "status", "result", "message")  # of a results-file line (child.py)
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
        try:
            text = bytes(text).decode("utf-8", errors="strict")
        except UnicodeDecodeError as exc:
            raise CodecError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not isinstance(text, str):
        raise CodecError(f"expected wire-format text, got {type(text).__name__}")
    if max_bytes is not None and len(text) > max_bytes:
        raise CodecError(f"document of {len(text)} characters exceeds the limit of {max_bytes}")
    try:
        raw = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except CodecError:
        raise
    except (ValueError, RecursionError, MemoryError) as exc:  # RecursionError: nesting deeper than json's stack
        raise CodecError(f"not valid JSON: {str(exc)[:200]}") from None
    try:
        return _decode(raw, 0)
    except CodecError:
        raise
    except Exception as exc:  # a case the checks below did not foresee is still only a malformed document
        raise CodecError(f"malformed document ({type(exc).__name__})") from None


def parse_result_line(line: str, max_chars: int) -> dict | None:
    """One line of a grading child's results file as {"exercise", "case", "status", "result", "message"}, all
    str (the first three required, the others "" when absent or null); None for anything else: too long, not
    JSON, nested too deep, wrong types. Other keys are dropped.

    The line is untrusted (learner code can write to that file), so nothing here may raise."""
    if not isinstance(line, str) or len(line) > max_chars:
        return None
    try:
        row = json.loads(line, parse_constant=_refuse_constant)
    except (ValueError, RecursionError, MemoryError):  # CodecError is a ValueError
        return None
    if not isinstance(row, dict):
        return None
    if not all(type(row.get(name)) is str for name in RESULT_FIELDS[:3]):
        return None
    if not all(row.get(name) is None or type(row[name]) is str for name in RESULT_FIELDS[3:]):
        return None
    return {name: row.get(name) or "" for name in RESULT_FIELDS}


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


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: json would make it inf; only the $float tag may
        raise CodecError(f"the number {text[:30]} is out of range (non-finite floats are tagged as {{'$float': ...}})")
    return value


def _short(value: Any) -> str:
    """A bounded description of a value from the document, for error messages."""
    return repr(value)[:30] if isinstance(value, (str, int, float, type(None))) else type(value).__name__


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
            raise CodecError(f"$float must be 'nan', 'inf' or '-inf', got {_short(body)}")
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
    raise CodecError(f"unknown tag {_short(tag)}")


def _decode_tensor(body: Any) -> torch.Tensor:
    if not isinstance(body, dict) or set(body) != {"dtype", "shape", "data"}:
        raise CodecError("$tensor must hold exactly dtype, shape and data")
    dtype = DTYPES.get(body["dtype"]) if isinstance(body["dtype"], str) else None
    if dtype is None:
        raise CodecError(f"$tensor dtype {_short(body['dtype'])} is not one of {list(DTYPES)}")
    shape = body["shape"]
    if not isinstance(shape, list) or not all(type(n) is int and 0 <= n <= MAX_TENSOR_DIM for n in shape):
        raise CodecError(f"$tensor shape must be a list of ints from 0 to {MAX_TENSOR_DIM}")
    if len(shape) > MAX_TENSOR_DIMS:
        raise CodecError(f"$tensor shape has {len(shape)} dimensions; at most {MAX_TENSOR_DIMS} are accepted")
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
    if dtype is torch.bool and raw.translate(None, b"\x00\x01"):
        raise CodecError("$tensor of dtype bool holds bytes other than 0 and 1")
    try:
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype)
        return flat.reshape(shape).clone()
    except (RuntimeError, ValueError, TypeError, OverflowError) as exc:  # e.g. strides of [0, 2**40, 2**40]
        raise CodecError(f"$tensor of shape {shape} cannot be built ({type(exc).__name__})") from None
