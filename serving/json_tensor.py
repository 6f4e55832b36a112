"""TF Serving's REST JSON tensor encoding (util/json_tensor.cc), to and from numpy.

Request: ``{"signature_name"?, "instances": [...]}`` (row) or
``{"signature_name"?, "inputs": ...}`` (columnar); bytes as ``{"b64": "..."}``.
Response: ``{"predictions": ...}`` (row; a lone output's name is dropped) or
``{"outputs": ...}`` (columnar).  DT_STRING outputs whose alias ends in
``_bytes`` are written as ``{"b64": ...}``, other strings as UTF-8.  Error
messages follow the C++ implementation's wording.
"""
import base64
import binascii
import json
import math
import re
import sys

import numpy as np
from tensorflow.core.framework import types_pb2

from serving.errors import invalid_argument, unimplemented
from serving.limits import RequestLimits

ROW, COLUMNAR = "row", "columnar"

_TYPE_NAMES = {
    types_pb2.DT_FLOAT: "float", types_pb2.DT_DOUBLE: "double",
    types_pb2.DT_INT32: "int32", types_pb2.DT_INT16: "int16", types_pb2.DT_INT8: "int8",
    types_pb2.DT_UINT8: "uint8", types_pb2.DT_INT64: "int64", types_pb2.DT_STRING: "string",
    types_pb2.DT_BOOL: "bool", types_pb2.DT_UINT32: "uint32", types_pb2.DT_UINT64: "uint64",
}
_FLOAT32_MAX_INT = (1 << 24) - 1
_FLOAT64_MAX_INT = (1 << 53) - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)
#: TensorShape::MaxDimensions(): no tensor nests deeper.
MAX_RANK = 254


def _dumps(val) -> str:
    return json.dumps(val, separators=(",", ":"))[:200]


def _json_type(val) -> str:
    if val is None:
        return "Null"
    if val is True:
        return "True"
    if val is False:
        return "False"
    if isinstance(val, dict):
        return "Object"
    if isinstance(val, list):
        return "Array"
    if isinstance(val, str):
        return "String"
    return "Number"


def _type_error(val, dtype):
    return invalid_argument(
        f"JSON Value: {_dumps(val)} Type: {_json_type(val)} is not of expected type: "
        f"{_TYPE_NAMES.get(dtype, str(dtype))}")


def _is_b64(val) -> bool:
    return isinstance(val, dict) and len(val) == 1 and isinstance(val.get("b64"), str)


_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")
#: Bodies from this size on are parsed element by element (see parse_body).
STREAM_MIN_CHARS = 1 << 20
#: Keys whose arrays are decoded element by element (their dim 0 is the batch).
_STREAMED = ("instances", "inputs")


def parse_body(body: bytes, limits: RequestLimits = RequestLimits()) -> dict:
    """Parses a request body; INVALID_ARGUMENT unless it is a JSON object.

    In a body of ``STREAM_MIN_CHARS`` or more, the ``instances`` array and the
    arrays in ``inputs`` are decoded one element at a time: parsing stops as
    soon as one holds more than ``limits.max_rows`` entries (so at most that
    many decoder calls, about 4 us each, are made), and other threads (the
    gRPC front end) get the interpreter between elements instead of waiting
    for a whole 60 MiB document.  A smaller body is parsed in one call (a
    few milliseconds at most), 4-20x faster.  Nesting deeper than the interpreter's recursion limit is a
    parse error, as in TF Serving's parser.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid_argument(f"JSON Parse error: {exc}")
    start = _SPACE.match(text).end()
    if start == len(text):
        raise invalid_argument("JSON Parse error: The document is empty")
    try:
        if len(text) < STREAM_MIN_CHARS:
            doc, end = _DECODER.raw_decode(text, start)
        elif text[start] == "{":
            doc, end = _object(text, start, limits)
        else:
            doc, end = _DECODER.raw_decode(text, start)
        end = _SPACE.match(text, end).end()
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
    except RecursionError:
        raise invalid_argument("JSON Parse error: nesting too deep (more than "
                               f"{sys.getrecursionlimit()} levels of arrays or objects)")
    except ValueError as exc:
        raise invalid_argument(f"JSON Parse error: {exc}")
    if not isinstance(doc, dict):
        raise invalid_argument(f"JSON Value: {_dumps(doc)} Is not object")
    return doc


def _object(text: str, i: int, limits: RequestLimits, stream_all: bool = False):
    """(dict, end) for the object at ``text[i] == "{"``; the arrays under
    ``_STREAMED`` keys (``stream_all``: under every key) are decoded element by
    element (see :func:`parse_body`)."""
    out = {}
    i = _SPACE.match(text, i + 1).end()
    if text.startswith("}", i):
        return out, i + 1
    while True:
        if not text.startswith('"', i):
            raise json.JSONDecodeError(
                "Expecting property name enclosed in double quotes", text, i)
        key, i = _DECODER.raw_decode(text, i)
        i = _SPACE.match(text, i).end()
        if not text.startswith(":", i):
            raise json.JSONDecodeError("Expecting ':' delimiter", text, i)
        i = _SPACE.match(text, i + 1).end()
        if (stream_all or key in _STREAMED) and text.startswith("[", i):
            out[key], i = _array(text, i, limits)
        elif key == "inputs" and not stream_all and text.startswith("{", i):
            out[key], i = _object(text, i, limits, stream_all=True)
        else:
            out[key], i = _DECODER.raw_decode(text, i)
        i = _SPACE.match(text, i).end()
        if text.startswith(",", i):
            i = _SPACE.match(text, i + 1).end()
        elif text.startswith("}", i):
            return out, i + 1
        else:
            raise json.JSONDecodeError("Expecting ',' delimiter", text, i)


def _array(text: str, i: int, limits: RequestLimits):
    """(list, end) for the array at ``text[i] == "["``, refused past ``limits.max_rows`` items."""
    out = []
    i = _SPACE.match(text, i + 1).end()
    if text.startswith("]", i):
        return out, i + 1
    while True:
        item, i = _DECODER.raw_decode(text, i)
        out.append(item)
        if len(out) > limits.max_rows:
            raise limits.too_many_rows(f"more than {limits.max_rows}")
        i = _SPACE.match(text, i).end()
        if text.startswith(",", i):
            i = _SPACE.match(text, i + 1).end()
        elif text.startswith("]", i):
            return out, i + 1
        else:
            raise json.JSONDecodeError("Expecting ',' delimiter", text, i)


def signature_name(doc: dict) -> str:
    name = doc.get("signature_name", "")
    if not isinstance(name, str):
        raise invalid_argument(
            f"JSON Value: {_dumps(doc)} not formatted correctly. 'signature_name' key "
            "must be a string value.")
    return name


def _convert(val, dtype):
    """One JSON leaf -> Python value for ``dtype`` (TF's AddValueToTensor)."""
    if dtype == types_pb2.DT_STRING:
        if isinstance(val, str):
            return val.encode("utf-8")
        if isinstance(val, dict):
            if not _is_b64(val):
                raise invalid_argument(
                    f"JSON Value: {_dumps(val)} not formatted correctly for base64 data")
            try:
                return base64.b64decode(val["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise invalid_argument("Unable to base64 decode")
        raise _type_error(val, dtype)
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        if dtype == types_pb2.DT_BOOL and isinstance(val, bool):
            return val
        raise _type_error(val, dtype)
    if dtype == types_pb2.DT_BOOL:
        raise _type_error(val, dtype)
    if dtype in (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_HALF):
        if math.isfinite(val):
            limit_int = _FLOAT64_MAX_INT if dtype == types_pb2.DT_DOUBLE else _FLOAT32_MAX_INT
            if isinstance(val, int) and abs(val) > limit_int or \
                    dtype != types_pb2.DT_DOUBLE and abs(val) > _FLOAT32_MAX:
                target = "double" if dtype == types_pb2.DT_DOUBLE else "float"
                raise invalid_argument(
                    f"Cannot convert JSON value: {_dumps(val)} to {target} without loss "
                    "of precision.")
        return float(val)
    if not isinstance(val, int):
        raise _type_error(val, dtype)
    return val


def _dense_shape(val) -> list:
    shape = []
    while isinstance(val, list):
        shape.append(len(val))
        if not val:
            break
        val = val[0]
    return shape


def _fill(val, level, shape, dtype, out) -> None:
    if not isinstance(val, list):
        if level != len(shape):
            raise invalid_argument(
                f"JSON Value: {_dumps(val)} found at incorrect level: {level + 1} in the "
                f"JSON DOM. Expected at level: {len(shape)}")
        if isinstance(val, dict) and dtype != types_pb2.DT_STRING:
            raise _type_error(val, dtype)
        out.append(_convert(val, dtype))
        return
    if level >= len(shape):
        raise invalid_argument(
            f"Encountered list at unexpected level: {level} expected < {len(shape)}")
    if len(val) != shape[level]:
        raise invalid_argument(
            f"Encountered list at unexpected size: {len(val)} at level: {level} expected "
            f"size: {shape[level]}")
    for item in val:
        _fill(item, level + 1, shape, dtype, out)


def to_array(val, spec, limits: RequestLimits = RequestLimits()) -> np.ndarray:
    """A JSON value (scalar or nested lists) -> ndarray of the spec's dtype.

    Its nesting and size are checked (TensorFlow's rank limit, the element
    cap) before any value is converted; the shape against the signature
    comes later, in the request check both front ends share.
    """
    if spec.np_dtype is None or spec.dtype not in _TYPE_NAMES:
        raise unimplemented(f"Conversion of JSON Value: {_dumps(val)} to type: {spec.dtype}")
    shape = _dense_shape(val)
    if len(shape) > MAX_RANK:
        raise invalid_argument(
            f"Input \"{spec.alias}\": JSON value nested {len(shape)} levels deep; a tensor "
            f"has at most {MAX_RANK} dimensions")
    limits.check_elements(spec.alias, shape)
    flat = []
    _fill(val, 0, shape, spec.dtype, flat)
    if spec.np_dtype is object:
        arr = np.empty(len(flat), dtype=object)
        arr[:] = flat
    else:
        try:
            arr = np.array(flat, dtype=spec.np_dtype)
        except OverflowError:
            raise invalid_argument(f"JSON value out of range for {_TYPE_NAMES[spec.dtype]}")
    return arr.reshape(shape)


def _rows(instances, signature, limits: RequestLimits) -> dict:
    specs = signature.inputs
    first = instances[0]
    if not isinstance(first, dict) and len(specs) > 1:
        raise invalid_argument(
            "instances is a plain list, but expecting list of objects as multiple input "
            "tensors required as per tensorinfo_map")
    as_objects = isinstance(first, dict) and not _is_b64(first)
    names = sorted(specs)
    columns = {}
    shapes = {}

    def add(item, name):
        arr = to_array(item, specs[name], limits)
        if name not in shapes:
            shapes[name] = arr.shape
        elif arr.size != int(np.prod(shapes[name], dtype=np.int64)):
            raise invalid_argument(
                f"Expecting tensor size: {int(np.prod(shapes[name]))} but got: {arr.size}")
        elif arr.shape != shapes[name]:
            raise invalid_argument(
                f"Expecting shape [{','.join(map(str, shapes[name]))}] but got: "
                f"[{','.join(map(str, arr.shape))}]")
        parts = columns.setdefault(name, [])
        parts.append(arr)
        limits.check_elements(name, (len(parts),) + arr.shape)   # before the next row

    for index, elem in enumerate(instances):
        is_object = isinstance(elem, dict) and not _is_b64(elem)
        if as_objects:
            if not is_object:
                raise invalid_argument(
                    f"Expecting object but got list at item {index} of input list")
            for name, item in elem.items():
                if name not in specs:
                    raise invalid_argument(
                        f"Failed to process element: {index} key: {name} of 'instances' "
                        f"list. Error: Invalid argument: JSON object: does not have named "
                        f"input: {name}")
                try:
                    add(item, name)
                except Exception as exc:
                    raise invalid_argument(
                        f"Failed to process element: {index} key: {name} of 'instances' "
                        f"list. Error: Invalid argument: {getattr(exc, 'message', exc)}")
            if set(elem) != set(names):
                raise invalid_argument(
                    f"Failed to process element: {index} of 'instances' list. JSON object: "
                    f"{_dumps(elem)} keys must be equal to: {','.join(names)}")
        else:
            if is_object:
                raise invalid_argument(
                    f"Expecting value/list but got object at item {index} of input list")
            try:
                add(elem, names[0])
            except Exception as exc:
                raise invalid_argument(
                    f"Failed to process element: {index} of 'instances' list. Error: "
                    f"Invalid argument: {getattr(exc, 'message', exc)}")
    return {name: np.stack(parts) for name, parts in columns.items()}


def _columns(inputs, signature, limits: RequestLimits) -> dict:
    specs = signature.inputs
    if not isinstance(inputs, dict) or _is_b64(inputs):
        if len(specs) > 1:
            raise invalid_argument(
                "inputs is a plain value/list, but expecting an object as multiple input "
                "tensors required as per tensorinfo_map")
        name = next(iter(specs))
        return {name: to_array(inputs, specs[name], limits)}
    arrays = {}
    for name in sorted(specs):
        if name not in inputs:
            raise invalid_argument(f"Missing named input: {name} in 'inputs' object.")
        arrays[name] = to_array(inputs[name], specs[name], limits)
    return arrays


def request_arrays(doc: dict, signature, limits: RequestLimits = RequestLimits()):
    """(alias -> ndarray, ROW|COLUMNAR) from a parsed predict body."""
    if not signature.inputs:
        raise invalid_argument(
            f"Failed to get input map for signature: {signature.key or 'DEFAULT'}")
    has_rows, has_cols = "instances" in doc, "inputs" in doc
    if has_rows and has_cols:
        raise invalid_argument(
            f"JSON Value: {_dumps(doc)} Not formatted correctly expecting only one of "
            "'inputs' or 'instances' keys to exist ")
    if has_rows:
        instances = doc["instances"]
        if not isinstance(instances, list):
            raise invalid_argument(
                f"JSON Value: {_dumps(doc)} Excepting 'instances' to be an list/array")
        if not instances:
            raise invalid_argument(f"JSON Value: {_dumps(doc)} No values in 'instances' array")
        limits.check_rows(len(instances))
        return _rows(instances, signature, limits), ROW
    if has_cols:
        return _columns(doc["inputs"], signature, limits), COLUMNAR
    raise invalid_argument("Missing 'inputs' or 'instances' key")


# -- responses ------------------------------------------------------------
def _leaf_values(arr: np.ndarray, as_bytes: bool):
    """ndarray -> nested lists of JSON-ready values."""
    if arr.dtype == object or arr.dtype.kind == "S":
        if as_bytes:
            flat = [{"b64": base64.b64encode(v).decode("ascii")} for v in arr.ravel()]
        else:
            flat = [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
                    for v in arr.ravel()]
        return np.array(flat + [None], dtype=object)[:-1].reshape(arr.shape).tolist()
    if arr.dtype in (np.float32, np.float16):
        return _float32_decimals(arr.astype(np.float32)).reshape(arr.shape).tolist()
    return arr.tolist()


def _float32_decimals(arr: np.ndarray) -> np.ndarray:
    """float32 values as the doubles TF Serving's ``WriteDecimal`` writes:
    six significant digits (``%g``) when they read back as the same float32,
    else nine (``%.9g``).  float64 [n]."""
    flat = arr.ravel()
    wide = flat.astype(np.float64)
    short = np.char.mod("%g", wide).astype(np.float64)
    redo = short.astype(np.float32) != flat   # NaN compares unequal: "%.9g" keeps it NaN
    short[redo] = np.char.mod("%.9g", wide[redo]).astype(np.float64)
    return short


def _is_bytes_alias(alias: str, arr: np.ndarray) -> bool:
    return alias.endswith("_bytes") and arr.dtype == object


def response_json(outputs: dict, fmt: str) -> bytes:
    """The ``{"predictions": ...}`` / ``{"outputs": ...}`` body for ``outputs``."""
    if not outputs:
        raise invalid_argument("Cannot convert empty tensor map to JSON")
    names = sorted(outputs)
    values = {n: _leaf_values(outputs[n], _is_bytes_alias(n, outputs[n])) for n in names}
    if fmt == COLUMNAR:
        body = {"outputs": values[names[0]] if len(names) == 1 else values}
    else:
        batch = None
        for n in names:
            if outputs[n].ndim == 0:
                raise invalid_argument(f"Tensor name: {n} has no shape information ")
            rows = outputs[n].shape[0]
            if batch is not None and rows != batch:
                raise invalid_argument(
                    f"Tensor name: {n} has inconsistent batch size: {rows} expecting: {batch}")
            batch = rows
        if len(names) == 1:
            predictions = values[names[0]]
        else:
            predictions = [{n: values[n][i] for n in names} for i in range(batch)]
        body = {"predictions": predictions}
    return json.dumps(body, separators=(",", ":")).encode()


def error_json(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
