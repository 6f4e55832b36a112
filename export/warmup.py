"""TF Serving warmup requests: ``assets.extra/tf_serving_warmup_requests``.

TF Serving replays this file (a TFRecord of serialized
``tensorflow.serving.PredictionLog``) right after it loads a model version, so
the first real request does not pay for graph initialisation. It accepts at
most 1000 records.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

MAX_WARMUP_RECORDS = 1000  # TF Serving refuses files with more records.
WARMUP_DIR = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"

__all__ = [
    "MAX_WARMUP_RECORDS",
    "WARMUP_DIR",
    "WARMUP_FILE",
    "make_tensor_proto",
    "read_warmup_requests",
    "warmup_path",
    "write_warmup_requests",
]


def warmup_path(version_dir: str | os.PathLike) -> Path:
    """The warmup file's path inside a SavedModel version directory."""
    return Path(version_dir) / WARMUP_DIR / WARMUP_FILE


def make_tensor_proto(value):
    """A TensorProto for ``value``; numpy unicode/object/bytes arrays become DT_STRING.

    Numeric arrays keep their numpy dtype (so float32 stays DT_FLOAT): pass
    arrays of the dtype the signature expects.
    """
    import tensorflow as tf

    array = np.asarray(value)
    if array.dtype.kind in ("U", "S", "O"):
        flat = [
            v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in array.reshape(-1)
        ]
        array = np.array(flat, dtype=object).reshape(array.shape)
        return tf.make_tensor_proto(array, dtype=tf.string, shape=array.shape)
    return tf.make_tensor_proto(array, dtype=tf.as_dtype(array.dtype), shape=array.shape)


def write_warmup_requests(
    version_dir: str | os.PathLike,
    model_name: str,
    requests: Iterable[tuple[str, Mapping[str, object]]],
) -> Path:
    """Write ``requests`` as TF Serving warmup records; returns the file's path.

    Each request is ``(signature_name, {input_alias: numpy array})``; the
    signature name may be "" for ``serving_default``. Raises ValueError for
    more than MAX_WARMUP_RECORDS requests (nothing is written then).
    """
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    requests = list(requests)
    if len(requests) > MAX_WARMUP_RECORDS:
        raise ValueError(
            f"{len(requests)} warmup requests; TF Serving accepts at most {MAX_WARMUP_RECORDS}"
        )
    records = []
    for signature_name, inputs in requests:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = signature_name
        for alias, value in inputs.items():
            request.inputs[alias].CopyFrom(make_tensor_proto(value))
        log = prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)
        )
        records.append(log.SerializeToString())

    path = warmup_path(version_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return path


def read_warmup_requests(path: str | os.PathLike) -> list:
    """Parse a warmup file (or a version directory holding one) into PredictionLogs."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = Path(path)
    if path.is_dir():
        path = warmup_path(path)
    logs = []
    for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        logs.append(prediction_log_pb2.PredictionLog.FromString(record))
    return logs
