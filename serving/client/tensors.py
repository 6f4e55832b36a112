"""Feature values <-> tensors for the client: numpy columns in the signature's
dtypes, TensorProtos (typed ``*_val`` fields, as TF Serving writes them), and
TF Serving's JSON values (``{"b64": ...}`` for bytes)."""
import base64
from typing import Any, Iterable, NamedTuple, Optional, Sequence

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from serving.client.errors import ClientError, FeatureError

MULTI_VALUE_SEPARATOR = "|"

_NUMPY = {types_pb2.DT_FLOAT: np.float32, types_pb2.DT_DOUBLE: np.float64,
          types_pb2.DT_INT32: np.int32, types_pb2.DT_INT64: np.int64,
          types_pb2.DT_INT16: np.int16, types_pb2.DT_INT8: np.int8,
          types_pb2.DT_UINT8: np.uint8, types_pb2.DT_BOOL: np.bool_}
_VAL_FIELD = {types_pb2.DT_FLOAT: "float_val", types_pb2.DT_DOUBLE: "double_val",
              types_pb2.DT_INT32: "int_val", types_pb2.DT_INT16: "int_val",
              types_pb2.DT_INT8: "int_val", types_pb2.DT_UINT8: "int_val",
              types_pb2.DT_INT64: "int64_val", types_pb2.DT_BOOL: "bool_val",
              types_pb2.DT_STRING: "string_val"}


class InputSpec(NamedTuple):
    dtype: int              # types_pb2 enum
    shape: Optional[tuple]  # dims (-1 unknown), None for unknown rank


def numpy_dtype(dtype: int):
    """The numpy dtype of a numeric ``types_pb2`` dtype, None for others."""
    return _NUMPY.get(dtype)


def to_bytes(value: Any) -> bytes:
    """A string feature value as bytes; a list is joined with ``|`` (multi-valued)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        return MULTI_VALUE_SEPARATOR.join(str(v) for v in value).encode()
    return str(value).encode()


def feature_column(alias: str, values: Sequence[Any], dtype: int) -> np.ndarray:
    """Converts one feature's values to the signature dtype, naming the feature on error."""
    if dtype == types_pb2.DT_STRING:
        return np.array([b"" if v is None else to_bytes(v) for v in values], dtype=object)
    if dtype not in _NUMPY:
        raise FeatureError(f"feature '{alias}': unsupported input dtype "
                           f"{types_pb2.DataType.Name(dtype)}")
    try:
        if dtype == types_pb2.DT_BOOL:
            return np.array([_bool(v) for v in values], dtype=np.bool_)
        if np.issubdtype(_NUMPY[dtype], np.floating):   # missing ("" / None): NaN = unknown
            return np.array([np.nan if v is None or v == "" else float(v) for v in values],
                            dtype=_NUMPY[dtype])
        return np.array([_int(v) for v in values], dtype=_NUMPY[dtype])
    except (TypeError, ValueError) as err:
        bad = next((v for v in values if not _is_number(v, dtype)), None)
        raise FeatureError(f"feature '{alias}' expects {types_pb2.DataType.Name(dtype)}, "
                           f"got {bad!r}") from err


def _int(v) -> int:
    """An integer value; 31.0 and "31" are, 31.7 is not (no silent truncation)."""
    if isinstance(v, (float, np.floating)) and not float(v).is_integer():
        raise ValueError(f"{v!r} is not an integer")
    return int(v)


def _bool(v) -> bool:
    if isinstance(v, str):
        if v.lower() in ("1", "true"):
            return True
        if v.lower() in ("0", "false", ""):
            return False
        raise ValueError(f"{v!r} is not a boolean")
    return bool(v)


def _is_number(v, dtype) -> bool:
    try:
        if dtype == types_pb2.DT_BOOL:
            _bool(v)
            return True
        float(v) if np.issubdtype(_NUMPY[dtype], np.floating) else _int(v)
        return True
    except (TypeError, ValueError):
        return False


def make_tensor_proto(array: np.ndarray, dtype: int) -> tensor_pb2.TensorProto:
    """TensorProto with the typed ``*_val`` fields (what TF Serving itself writes)."""
    proto = tensor_pb2.TensorProto(dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(d)) for d in array.shape]))
    flat = array.reshape(-1)
    if dtype == types_pb2.DT_STRING:
        proto.string_val.extend(to_bytes(v) for v in flat)
    else:
        getattr(proto, _VAL_FIELD[dtype]).extend(flat.tolist())
    return proto


def tensor_to_array(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """numpy array from a TensorProto (typed fields or ``tensor_content``)."""
    shape = [d.size for d in proto.tensor_shape.dim]
    size = int(np.prod(shape)) if shape else 1
    if proto.dtype == types_pb2.DT_STRING:
        values = np.array(list(proto.string_val), dtype=object)
    elif proto.dtype in _NUMPY:
        np_dtype = _NUMPY[proto.dtype]
        if proto.tensor_content:
            values = np.frombuffer(proto.tensor_content, dtype=np_dtype).copy()
        else:
            values = np.array(getattr(proto, _VAL_FIELD[proto.dtype]), dtype=np_dtype)
    else:
        raise ClientError(f"unsupported output dtype {types_pb2.DataType.Name(proto.dtype)}")
    if values.size == 1 and size > 1:      # a repeated value may be written once
        values = np.repeat(values, size)
    if values.size != size:
        raise ClientError(f"output tensor has {values.size} values for shape {shape}")
    return values.reshape(shape)


def json_values(arr: np.ndarray):
    """TF Serving's JSON for an input column: UTF-8 strings, else ``{"b64": ...}``."""
    if arr.dtype == object:
        def conv(v):
            b = v if isinstance(v, bytes) else str(v).encode()
            try:
                return b.decode("utf-8")
            except UnicodeDecodeError:
                return {"b64": base64.b64encode(b).decode()}
        return np.vectorize(conv, otypes=[object])(arr).tolist() if arr.size else arr.tolist()
    return arr.tolist()


def json_strings(value):
    """Nested JSON strings (or ``{"b64": ...}``) of a DT_STRING output, as bytes."""
    if isinstance(value, list):
        return [json_strings(v) for v in value]
    if isinstance(value, dict) and "b64" in value:
        return base64.b64decode(value["b64"])
    return value.encode() if isinstance(value, str) else value


def pad_seen_ids(seen: Sequence[Optional[Iterable[str]]]) -> np.ndarray:
    """[rows, width] seen ids padded with "", and always "" at [0, 0].

    TF Serving's server-side batching pads each request's narrower
    ``seen_item_ids`` with that request's first element: it must be "" or
    the other users of a merged batch would lose that item too. Row 0's ids
    therefore start one column in (order does not matter for exclusion).
    """
    lists = [[to_bytes(s) for s in row] if row is not None else [] for row in seen]
    width = max(1, max((len(r) for r in lists), default=0))
    if lists and lists[0] and b"" not in lists[0] and len(lists[0]) >= width:
        width += 1
    out = np.full((len(lists), width), b"", dtype=object)
    for i, row in enumerate(lists):
        start = 1 if i == 0 and b"" not in row else 0
        out[i, start:start + len(row)] = row
    return out
