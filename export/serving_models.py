"""The tf.Modules that become the four served SavedModels.

Every signature takes raw features, one named ``[None]`` tensor per feature,
and returns fully shaped outputs. Retrieval modules index catalog *rows*
(int64) rather than string ids, so seen-item exclusion compares integers; the
row -> id mapping is a variable gathered at the end, and the id -> row table
(exclusion) is filled from that variable when the model is loaded: the ids are
stored once, in the checkpoint, never as a constant in the GraphDef.
"""
from __future__ import annotations

import uuid

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs
from scann.scann_ops.py import scann_ops
from tensorflow.python.ops import gen_lookup_ops, lookup_ops
from tensorflow.python.trackable.data_structures import NoDependency

from export.scann_tuning import ScannParams

SEEN_INPUT = "seen_item_ids"
_ALIGN = 64  # bytes: TensorFlow's (Eigen's) alignment for tensor buffers


def as_tensor(array: np.ndarray) -> tf.Tensor:
    """A numeric numpy array as an eager tensor that shares its buffer (DLPack).

    ``tf.constant`` copies element by element: ~0.5 s for a [1M, 64] float32
    catalog here, paid for every model that indexes it. The array must not be
    written to afterwards (the tensor, and variables made from it, see it); one
    that is not 64-byte aligned or C-contiguous is copied once into one that is.
    """
    array = np.asarray(array)
    if array.dtype.kind not in "fiu" or array.size == 0:
        return tf.constant(array)
    if not array.flags.c_contiguous or array.ctypes.data % _ALIGN:
        aligned = aligned_empty(array.shape, array.dtype)
        aligned[...] = array
        array = aligned
    return tf.experimental.dlpack.from_dlpack(array.__dlpack__())


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array on a 64-byte boundary (``as_tensor``
    shares such an array's buffer instead of copying it)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buffer = np.empty(nbytes + _ALIGN, np.uint8)
    start = -buffer.ctypes.data % _ALIGN
    return buffer[start:start + nbytes].view(dtype).reshape(shape)


def tower_module(tower, signature: dict[str, tf.TensorSpec]) -> tuple[tf.Module, dict]:
    """query_tower / candidate_tower: raw features -> {"embedding": [None, d]}."""
    module = tf.Module()
    module.tower = tower

    @tf.function(input_signature=[signature], autograph=False)
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
    return layer.index(as_tensor(embeddings), tf.range(len(embeddings), dtype=tf.int64))


def brute_force_index(embeddings: np.ndarray, k: int):
    layer = tfrs.layers.factorized_top_k.BruteForce(k=k)
    return layer.index(as_tensor(embeddings), tf.range(len(embeddings), dtype=tf.int64))


class IndexVariables(tf.Module):
    """A TFRS retrieval layer's variables under the layer's own attribute names
    (ScaNN: ``_serialized_searcher`` (a ScannState) and ``_identifiers``;
    BruteForce: ``_candidates`` and ``_identifiers``), so a checkpoint reads
    ``index/_serialized_searcher/dataset`` etc. as when the layer was saved."""

    _ATTRIBUTES = ("_serialized_searcher", "_candidates", "_identifiers")

    def __init__(self, layer):
        super().__init__()
        for attr in self._ATTRIBUTES:
            value = getattr(layer, attr, None)
            if value is not None:
                setattr(self, attr, value)


class SharedScaNNSearch:
    """TFRS ScaNN layer's search (``layer(queries, k)`` -> scores, identifiers),
    with the searcher built from the layer's ScannState under one ``shared_name``
    per exported model. TFRS builds it through ``ScannState.recreate_handle``,
    whose op has no shared name, so each served signature (serving_default,
    retrieve_excluding) built its own searcher on its first call: twice the
    searcher's memory, and ~1 s per signature at 1M items. With one name, the
    second signature's op finds the first one's searcher in the session's
    resource manager (a SavedModel session has its own; distinct exports get
    distinct names, also where one process holds several, as eager loading does)."""

    def __init__(self, layer):
        self.layer = layer
        self.shared_name = f"retrieval-scann-{uuid.uuid4()}"

    def __call__(self, queries, k):
        state = self.layer._serialized_searcher
        handle = scann_ops.tensors_to_scann(
            state.dataset, state.scann_config, state.serialized_partitioner,
            state.datapoint_to_token, state.ah_codebook, state.hashed_dataset,
            state.int8_dataset, state.int8_multipliers, state.dp_norms,
            shared_name=self.shared_name)
        searcher = scann_ops.ScannSearcher(handle)
        result = (searcher.search_batched_parallel(queries, final_num_neighbors=k)
                  if self.layer._parallelize_batch_searches
                  else searcher.search_batched(queries, final_num_neighbors=k))
        return result.distances, tf.gather(self.layer._identifiers, result.indices)


class RowOfId(lookup_ops.TableInitializerBase):
    """id -> row (int64) table contents read from a [N] string variable when the
    table is initialized. A loader (TF Serving's, the session loader, TF2's)
    restores variables before it runs the initializers, so the served graph
    holds no copy of the ids (a KeyValueTensorInitializer would embed them as a
    [N] string constant in saved_model.pb)."""

    def __init__(self, ids: tf.Variable):
        super().__init__(tf.string, tf.int64)
        self._ids = ids

    def initialize(self, table):
        keys = self._ids.read_value()
        rows = tf.range(tf.size(keys, out_type=tf.int64), dtype=tf.int64)
        return gen_lookup_ops.lookup_table_import_v2(table.resource_handle, keys, rows)


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
        # the layer's variables are saved at its own object paths (index/...), the
        # Keras layer itself is not: saving it would trace its functions for Keras'
        # own loader (seconds per model), which no served signature uses
        self.index = IndexVariables(index)
        self._search = NoDependency(
            SharedScaNNSearch(index) if isinstance(index, tfrs.layers.factorized_top_k.ScaNN)
            else index)
        self.item_ids = tf.Variable(np.asarray(item_ids, dtype=object).astype(str),
                                    trainable=False, name="item_ids")
        self.row_of = tf.lookup.StaticHashTable(RowOfId(self.item_ids), default_value=-1)
        seen = tf.TensorSpec([None, None], tf.string, name=SEEN_INPUT)
        self.serve = tf.function(self._retrieve, input_signature=[signature], autograph=False)
        self.serve_excluding = tf.function(self._retrieve_excluding,
                                           input_signature=[signature, seen], autograph=False)

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
        scores, rows = self._search(self._query(features), k=self.k)
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
        scores, rows = self._search(query, k=self.fetch)
        is_seen = tf.reduce_any(tf.equal(rows[:, :, None], seen_rows[:, None, :]), axis=-1)
        scores = tf.where(is_seen, tf.constant(-np.inf, scores.dtype), scores)
        top_scores, pos = tf.math.top_k(scores, k=self.k)
        return self._outputs(top_scores, tf.gather(rows, pos, batch_dims=1))
