"""Attention pooling of a user's history over the item tower's own id embeddings.

``"i7|i3|i9"`` [batch] (oldest first, as trainer.history builds it) ->
item-id embeddings e_1..e_L (the *candidate tower's* table, shared) ->
weights α = softmax(score) over the user's items ->  Σ α_i·e_i  [batch, d].

    score_i = vᵀ tanh(W e_i + b) + r[L − i]      (r: a learned recency bias,
                                                 one value per position from
                                                 the newest, up to max_items)

Why share the item tower's embeddings: a click is then read as the very
vector the item is retrieved by, an item's embedding learns from both sides,
and at serving time a new click (a longer history string) moves the user
vector at once, without retraining and without a separate history table.
``pooling="recency"`` keeps only the recency term (weights depend on position
alone), ``"attention"`` learns both. An empty history pools to zeros.
"""
from __future__ import annotations

import tensorflow as tf


@tf.keras.utils.register_keras_serializable(package="trainer")
class AttentiveHistoryPooling(tf.keras.layers.Layer):
    """(item-id embeddings, ragged [batch, None]) -> weighted mean [batch, d].

    Config: ``max_items`` (recency positions), ``pooling`` (attention |
    recency), ``attention_units``. Weights (made in ``build``): W, b, v, r.
    """

    def __init__(self, max_items: int, pooling: str = "attention",
                 attention_units: int = 32, **kwargs):
        super().__init__(**kwargs)
        if pooling not in ("attention", "recency"):
            raise ValueError(f"pooling must be 'attention' or 'recency', got {pooling!r}")
        self.max_items = max_items
        self.pooling = pooling
        self.attention_units = attention_units

    def build(self, input_shape):
        self.recency = self.add_weight(name="recency_bias", shape=[self.max_items],
                                       initializer="zeros")
        if self.pooling == "attention":
            dim = int(input_shape[-1])
            self.key = tf.keras.layers.Dense(self.attention_units, activation="tanh",
                                             name="key")
            self.key.build([None, dim])
            self.score = self.add_weight(name="score", shape=[self.attention_units],
                                         initializer="glorot_uniform")
        super().build(input_shape)

    def call(self, vectors: tf.RaggedTensor) -> tf.Tensor:
        """``vectors``: ragged [batch, None (items), d] -> [batch, d]."""
        lengths = vectors.row_lengths()
        # position from the newest item: 0 for the last one of each row
        from_newest = tf.cast(tf.repeat(lengths, lengths), tf.int64) - 1 - \
            tf.cast(tf.ragged.range(lengths).flat_values, tf.int64)
        from_newest = tf.minimum(from_newest, self.max_items - 1)
        logits = tf.gather(self.recency, from_newest)  # [n_flat]
        if self.pooling == "attention":
            keys = self.key(vectors.flat_values)       # [n_flat, units]
            logits = logits + tf.linalg.matvec(keys, self.score)
        logits = vectors.with_flat_values(logits)      # ragged [batch, None]
        # softmax per row (ragged): subtract the row max for stability
        shifted = logits - tf.reduce_max(logits, axis=1, keepdims=True)
        weights = tf.exp(shifted)
        weights = weights / tf.reduce_sum(weights, axis=1, keepdims=True)
        pooled = tf.reduce_sum(vectors * tf.expand_dims(weights, -1), axis=1)
        return pooled  # rows with no items reduce to zeros

    def get_config(self):
        return {**super().get_config(), "max_items": self.max_items,
                "pooling": self.pooling, "attention_units": self.attention_units}
