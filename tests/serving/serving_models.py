"""Builds tiny SavedModels shaped like docs/ARTIFACTS.md's retrieval models.

Signatures (explicit ``tf.function`` signatures, as the export code writes):

- ``serving_default``: ``user_id`` [None] string, ``age`` [None] float32 ->
  ``item_ids`` [None, K] string, ``scores`` [None, K] float32.
- ``retrieve_excluding``: the same plus ``seen_item_ids`` [None, None] string
  (padded with ""); excluded items score -1e9.

The scores depend on a ``scale`` constant, so two versions built with different
scales answer differently (used by the hot-swap tests).
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

K = 3
ITEMS = ["i0", "i1", "i2", "i3", "i4"]


class TinyRetrieval(tf.Module):
    """Scores every item as hash(user_id) mixed with age, returns the top K."""

    def __init__(self, scale: float):
        super().__init__()
        self.items = tf.constant(ITEMS)
        self.item_weights = tf.Variable(
            [[0.5, 1.0], [1.0, -0.5], [-1.0, 0.25], [0.25, 0.75], [0.0, 0.1]],
            dtype=tf.float32,
        )
        self.scale = tf.Variable(scale, dtype=tf.float32)

    def _scores(self, user_id, age):
        h = tf.cast(tf.strings.to_hash_bucket_fast(user_id, 97), tf.float32) / 97.0
        feats = tf.stack([h, age / 100.0], axis=1)  # [B, 2]
        return self.scale * tf.matmul(feats, self.item_weights, transpose_b=True)

    def _top_k(self, scores):
        top = tf.math.top_k(scores, k=K)
        return {"item_ids": tf.gather(self.items, top.indices), "scores": top.values}

    @tf.function(input_signature=[
        tf.TensorSpec([None], tf.string, name="user_id"),
        tf.TensorSpec([None], tf.float32, name="age"),
    ])
    def serve(self, user_id, age):
        return self._top_k(self._scores(user_id, age))

    @tf.function(input_signature=[
        tf.TensorSpec([None], tf.string, name="user_id"),
        tf.TensorSpec([None], tf.float32, name="age"),
        tf.TensorSpec([None, None], tf.string, name="seen_item_ids"),
    ])
    def retrieve_excluding(self, user_id, age, seen_item_ids):
        scores = self._scores(user_id, age)
        seen = tf.reduce_any(
            tf.equal(seen_item_ids[:, :, None], self.items[None, None, :]), axis=1
        )
        scores = tf.where(seen, tf.fill(tf.shape(scores), -1e9), scores)
        return self._top_k(scores)


def build_model(path: str, scale: float = 1.0, warmup_records: int = 2) -> str:
    """Saves a TinyRetrieval SavedModel at ``path`` (a version directory)."""
    module = TinyRetrieval(scale)
    tf.saved_model.save(
        module,
        path,
        signatures={
            "serving_default": module.serve,
            "retrieve_excluding": module.retrieve_excluding,
        },
    )
    if warmup_records:
        write_warmup(path, warmup_records)
    return path


def write_warmup(path: str, n: int, signature: str = "serving_default",
                 broken: bool = False) -> None:
    """Writes ``n`` PredictionLog records to ``assets.extra/tf_serving_warmup_requests``."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    extra = os.path.join(path, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(extra, "tf_serving_warmup_requests")) as w:
        for i in range(n):
            req = predict_pb2.PredictRequest()
            req.model_spec.name = "warmup"
            req.model_spec.signature_name = signature
            req.inputs["user_id"].CopyFrom(tf.make_tensor_proto([f"u{i}"]))
            if broken:
                req.inputs["age"].CopyFrom(tf.make_tensor_proto(["not a float"]))
            else:
                req.inputs["age"].CopyFrom(tf.make_tensor_proto([30.0], tf.float32))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=req)
            )
            w.write(log.SerializeToString())


def call_in_process(path: str, signature: str, **inputs):
    """Runs ``signature`` of the SavedModel at ``path`` in this process (reference answers)."""
    loaded = tf.saved_model.load(path)
    fn = loaded.signatures[signature]
    out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in out.items()}
