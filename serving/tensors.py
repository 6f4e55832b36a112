"""TensorProto <-> numpy conversion, without going through TensorFlow ops.

Requests may carry values in ``tensor_content`` or in the typed ``*_val``
fields; responses are written with the typed fields, as TF Serving's
``Tensor::AsProtoField`` does.  Values are copied ``CHUNK`` at a time, so a
large tensor never holds the interpreter for long: the event-loop threads get
it between chunks.
"""
import math
from typing import Optional

import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2

from serving.errors import invalid_argument

CHUNK = 16384

# dtype enum -> (numpy dtype, TensorProto value field)
_DTYPES = {
    types_pb2.DT_FLOAT: (np.float32, "float_val"),
    types_pb2.DT_DOUBLE: (np.float64, "double_val"),
    types_pb2.DT_INT32: (np.int32, "int_val"),
    types_pb2.DT_INT16: (np.int16, "int_val"),
    types_pb2.DT_INT8: (np.int8, "int_val"),
    types_pb2.DT_UINT8: (np.uint8, "int_val"),
    types_pb2.DT_UINT16: (np.uint16, "int_val"),
    types_pb2.DT_INT64: (np.int64, "int64_val"),
    types_pb2.DT_UINT32: (np.uint32, "uint32_val"),
    types_pb2.DT_UINT64: (np.uint64, "uint64_val"),
    types_pb2.DT_BOOL: (np.bool_, "bool_val"),
    types_pb2.DT_STRING: (object, "string_val"),
    types_pb2.DT_HALF: (np.float16, "half_val"),
}

_NUMPY_TO_DTYPE = {
    np.dtype(np.float32): types_pb2.DT_FLOAT,
    np.dtype(np.float64): types_pb2.DT_DOUBLE,
    np.dtype(np.int32): types_pb2.DT_INT32,
    np.dtype(np.int16): types_pb2.DT_INT16,
    np.dtype(np.int8): types_pb2.DT_INT8,
    np.dtype(np.uint8): types_pb2.DT_UINT8,
    np.dtype(np.uint16): types_pb2.DT_UINT16,
    np.dtype(np.int64): types_pb2.DT_INT64,
    np.dtype(np.uint32): types_pb2.DT_UINT32,
    np.dtype(np.uint64): types_pb2.DT_UINT64,
    np.dtype(np.bool_): types_pb2.DT_BOOL,
    np.dtype(np.float16): types_pb2.DT_HALF,
}


def dtype_name(dtype: int) -> str:
    """``DT_FLOAT`` style name of a DataType enum value."""
    try:
        return types_pb2.DataType.Name(dtype)
    except ValueError:
        return f"DT_<{dtype}>"


def numpy_dtype(dtype: int):
    """numpy dtype for a DataType enum value (object for strings)."""
    entry = _DTYPES.get(dtype)
    return None if entry is None else entry[0]


def shape_of(proto: tensor_pb2.TensorProto, alias: str) -> tuple:
    if proto.tensor_shape.unknown_rank:
        raise invalid_argument(f"Input \"{alias}\": tensor shape has unknown rank.")
    dims = tuple([d.size for d in proto.tensor_shape.dim])
    if any(d < 0 for d in dims):
        raise invalid_argument(f"Input \"{alias}\": negative dimension in shape {list(dims)}.")
    return dims


def parsing_error(alias: str, detail: str):
    """INVALID_ARGUMENT with TF Serving's message for a TensorProto that
    ``Tensor::FromProto`` refuses, followed by what was wrong."""
    return invalid_argument(f"tensor parsing error: {alias} ({detail})")


def to_numpy(proto: tensor_pb2.TensorProto, alias: str, shape: Optional[tuple] = None) -> np.ndarray:
    """Decodes a request TensorProto (``alias`` only names it in errors;
    ``shape``: ``shape_of(proto, alias)`` when the caller has it already).

    The values given must match the shape: ``tensor_content`` of exactly
    elements x itemsize bytes (TF refuses anything else), or as many typed
    values as elements -- or exactly one, repeated (TF's fill, which
    ``tf.make_tensor_proto(value, shape=...)`` writes).  TF would also fill a
    tensor that gives no value at all, so a 100-byte message could declare
    gigabytes; that is refused here.
    """
    entry = _DTYPES.get(proto.dtype)
    if entry is None:
        raise invalid_argument(
            f"Input \"{alias}\": unsupported dtype {dtype_name(proto.dtype)}.")
    np_dtype, field = entry
    if shape is None:
        shape = shape_of(proto, alias)
    count = math.prod(shape)
    content = proto.tensor_content
    if content and proto.dtype != types_pb2.DT_STRING:
        expected = count * np.dtype(np_dtype).itemsize
        if len(content) != expected:
            raise parsing_error(
                alias, f"tensor_content has {len(content)} bytes, shape "
                f"{list(shape)} of {dtype_name(proto.dtype)} needs {expected}")
        return np.frombuffer(content, dtype=np_dtype).reshape(shape)
    values = getattr(proto, field)
    given = len(values)
    if given != count and not (given == 1 and count > 1):
        raise parsing_error(
            alias, f"{given} values given for shape {list(shape)} of {count} elements; "
            "give every value, or one to repeat")
    if proto.dtype == types_pb2.DT_HALF:
        np_dtype = np.uint16
    arr = np.empty(given, dtype=np_dtype)
    if given <= CHUNK:
        arr[:] = list(values)   # a list converts 2x faster than the upb container
    else:
        for start in range(0, given, CHUNK):
            arr[start:start + CHUNK] = values[start:start + CHUNK]
    if proto.dtype == types_pb2.DT_HALF:
        arr = arr.view(np.float16)
    if given != count:
        arr = np.repeat(arr, count)
    return arr.reshape(shape)


def from_numpy(arr: np.ndarray, proto: tensor_pb2.TensorProto) -> tensor_pb2.TensorProto:
    """Writes ``arr`` into ``proto`` with typed value fields."""
    arr = np.asarray(arr)
    dims = proto.tensor_shape.dim
    for d in arr.shape:
        dims.add(size=d)
    flat = arr.ravel()
    if arr.dtype == object or arr.dtype.kind in "SU":
        proto.dtype = types_pb2.DT_STRING
        for start, part in _chunks(flat):
            values = part.tolist()
            try:
                proto.string_val.extend(values)   # all bytes: the common case
            except TypeError:
                del proto.string_val[start:]   # what the failed extend appended
                proto.string_val.extend(
                    v if isinstance(v, bytes) else str(v).encode() for v in values)
        return proto
    dtype = _NUMPY_TO_DTYPE.get(arr.dtype)
    if dtype is None:
        raise ValueError(f"cannot serialize numpy dtype {arr.dtype}")
    proto.dtype = dtype
    if dtype == types_pb2.DT_HALF:
        flat, field = flat.view(np.uint16), proto.half_val
    else:
        field = getattr(proto, _DTYPES[dtype][1])
    for _, part in _chunks(flat):
        field.extend(part.tolist())
    return proto


def _chunks(flat: np.ndarray):
    """(offset, slice) pairs of at most CHUNK values covering ``flat``."""
    if flat.size <= CHUNK:
        return ((0, flat),)
    return ((start, flat[start:start + CHUNK]) for start in range(0, flat.size, CHUNK))
