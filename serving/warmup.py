"""Replays ``assets.extra/tf_serving_warmup_requests`` before a version serves.

The file is a TFRecord of serialized ``PredictionLog``s (at most 1000).  Only
``predict_log`` records are replayed; any failure fails the load, as in TF
Serving, and so does a record of another kind (TF Serving replays classify,
regress and multi-inference logs too; this server does not implement those
APIs).  A missing file is fine.
"""
import os

import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from serving.errors import ServingError, invalid_argument, unimplemented

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_RECORDS = 1000


def warmup_path(version_dir: str) -> str:
    return os.path.join(version_dir, WARMUP_FILE)


def read_warmup_requests(version_dir: str) -> list:
    """PredictRequests from the warmup file ([] when there is none)."""
    path = warmup_path(version_dir)
    if not tf.io.gfile.exists(path):
        return []
    requests = []
    for raw in tf.compat.v1.io.tf_record_iterator(path):
        if len(requests) >= MAX_RECORDS:
            raise invalid_argument(
                f"Number of warmup records exceeds the maximum ({MAX_RECORDS}) at {path}")
        log = prediction_log_pb2.PredictionLog.FromString(raw)
        kind = log.WhichOneof("log_type")
        if kind != "predict_log":
            raise unimplemented(f"Unsupported log_type for warmup: {kind}")
        requests.append(log.predict_log.request)
    return requests


def run_warmup(servable, predict_fn) -> int:
    """Runs every warmup request through ``predict_fn(servable, request)``.

    Returns the number of records replayed; raises ServingError on failure.
    """
    requests = read_warmup_requests(servable.path)
    for i, request in enumerate(requests):
        try:
            predict_fn(servable, request)
        except ServingError as exc:
            raise ServingError(exc.code, f"Warmup record {i} failed: {exc.message}")
    return len(requests)
