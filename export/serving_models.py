"""The tf.Modules that become the four served SavedModels.

Every signature takes raw features, one named ``[None]`` tensor per feature,
and returns fully shaped outputs. Retrieval modules index catalog *rows*
(int64) rather than string ids, so seen-item exclusion compares integers; the
row -> id mapping is a constant gathered at the end.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from export.scann_tuning import ScannParams

SEEN_INPUT = "seen_item_ids"


def tower_module(tower, signature: dict[str, tf.TensorSpec]) -> tuple[tf.Module, dict]:
    """query_tower / candidate_tower: raw features -> {"embedding": [None, d]}."""
    module = tf.Module()
    module.tower = tower

    @tf.function(input_signature=[signature])
    def serve(features):
        return {"embedding": tf.identity(tower.embed(features)["embedding"], name="embedding")}

    module.serve = serve
    return module, {"serving_default": serve.get_concrete_function()}


def scann_index(embeddings: np.ndarray, k: int, params: ScannParams):
    layer = tfrs.layers.factorized_top_k.ScaNN(
        k=k, distance_measure="dot_product", num_leaves=params.num_leaves,
        num_leaves_to_search=params.num_leaves_to_search,
        num_reordering_candidates=params.num_reordering_candidates,
        dimensions_per_block=params.dimensions_per_block,
        training_iterations=params.training_iterations)
    return layer.index(tf.constant(embeddings), tf.range(len(embeddings), dtype=tf.int64))


def brute_force_index(embeddings: np.ndarray, k: int):
    layer = tfrs.layers.factorized_top_k.BruteForce(k=k)
    return layer.index(tf.constant(embeddings), tf.range(len(embeddings), dtype=tf.int64))


class RetrievalModule(tf.Module):
    """Raw user features -> top-k (item_ids [None, k] string, scores [None, k] float32).

    ``retrieve_excluding`` also takes ``seen_item_ids`` [None, None] (pad with
    ""): it fetches ``k + max_exclude`` candidates, drops seen ones and keeps
    the best k, so exclusion is exact while a row has at most ``max_exclude``
    seen ids; longer rows are rejected with INVALID_ARGUMENT. Slots left empty
    (tiny catalogs) come back as id "" with score -inf.
    """

    def __init__(self, query_tower, index, item_ids: np.ndarray, k: int, max_exclude: int,
                 signature: dict[str, tf.TensorSpec]):
        super().__init__()
        n = len(item_ids)
        self.k = min(k, n)
        self.fetch = min(self.k + max_exclude, n)
        self.max_exclude = max_exclude
        self.query_tower = query_tower
        self.index = index
        ids = tf.constant(np.asarray(item_ids, dtype=object).astype(str))
        self.item_ids = tf.Variable(ids, trainable=False, name="item_ids")
        self.row_of = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(ids, tf.range(n, dtype=tf.int64)),
            default_value=-1)
        seen = tf.TensorSpec([None, None], tf.string, name=SEEN_INPUT)
        self.serve = tf.function(self._retrieve, input_signature=[signature])
        self.serve_excluding = tf.function(self._retrieve_excluding,
                                           input_signature=[signature, seen])

    def signatures(self) -> dict:
        return {"serving_default": self.serve.get_concrete_function(),
                "retrieve_excluding": self.serve_excluding.get_concrete_function()}

    def _query(self, features):
        return self.query_tower.embed(features)["embedding"]

    def _outputs(self, scores, rows):
        ids = tf.where(tf.math.is_finite(scores), tf.gather(self.item_ids, rows), "")
        return {"item_ids": tf.ensure_shape(ids, [None, self.k], name="item_ids"),
                "scores": tf.ensure_shape(scores, [None, self.k], name="scores")}

    def _retrieve(self, features):
        scores, rows = self.index(self._query(features), k=self.k)
        return self._outputs(scores, rows)

    def _retrieve_excluding(self, features, seen_item_ids):
        query = self._query(features)
        checks = [
            tf.debugging.assert_less_equal(
                tf.shape(seen_item_ids)[1], self.max_exclude,
                message=f"{SEEN_INPUT} has more columns than this model excludes "
                        f"(max_exclude={self.max_exclude})"),
            # one row of seen ids per user: a single row must not broadcast over the batch
            tf.debugging.assert_equal(
                tf.shape(seen_item_ids)[0], tf.shape(query)[0],
                message=f"{SEEN_INPUT} needs one row per user (its dimension 0 must equal "
                        "the batch size of the user features)"),
        ]
        with tf.control_dependencies(checks):
            seen_rows = self.row_of.lookup(seen_item_ids)  # [B, S]; -1 = unknown or ""
        scores, rows = self.index(query, k=self.fetch)
        is_seen = tf.reduce_any(tf.equal(rows[:, :, None], seen_rows[:, None, :]), axis=-1)
        scores = tf.where(is_seen, tf.constant(-np.inf, scores.dtype), scores)
        top_scores, pos = tf.math.top_k(scores, k=self.k)
        return self._outputs(top_scores, tf.gather(rows, pos, batch_dims=1))
