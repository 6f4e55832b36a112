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


@tf.keras.utils.register_keras_serializable(package="trainer")
class HistoryEncoder(tf.keras.layers.Layer):
    """"i7|i3|i9" string [batch] -> item-id embeddings -> pooled [batch, d].

    ``items``: the layer that embeds one item id ([n] strings -> [n, d]). With
    ``shared=True`` it is the candidate tower's own ``item_id`` encoder (given
    by the tower that builds this one; its vocabulary and table are the item
    tower's), else an encoder of this feature's own, adapted on the history
    tokens. ``pooling``: ``mean`` | ``sum`` | ``attention`` | ``recency``
    (AttentiveHistoryPooling). An empty history pools to zeros.
    """

    def __init__(self, items: tf.keras.layers.Layer, separator: str = "|",
                 max_items: int = 200, pooling: str = "attention",
                 attention_units: int = 32, shared: bool = False, **kwargs):
        super().__init__(**kwargs)
        if pooling not in ("mean", "sum", "attention", "recency"):
            raise ValueError(f"history pooling must be mean, sum, attention or recency, "
                             f"got {pooling!r}")
        self.items = items
        self.separator = separator
        self.max_items = max_items
        self.pooling = pooling
        self.attention_units = attention_units
        self.shared = shared
        self.pool = (AttentiveHistoryPooling(max_items, pooling, attention_units,
                                             name="pool")
                     if pooling in ("attention", "recency") else None)

    def _tokens(self, values) -> list[str]:
        return [t for v in values for t in str(v).split(self.separator) if t]

    def adapt(self, values) -> None:
        """Own table: learn the history tokens. Shared: the item tower adapts it."""
        if not self.shared:
            self.items.adapt(self._tokens(values))

    def grow_vocabulary(self, values) -> list[str]:
        """Own table: append new tokens (the shared one grows with the item tower)."""
        return [] if self.shared else self.items.grow_vocabulary(self._tokens(values))

    def call(self, x):
        parts = tf.strings.split(x, sep=self.separator)
        tokens = tf.ragged.boolean_mask(parts, tf.not_equal(parts, ""))
        vectors = tokens.with_flat_values(self.items(tokens.flat_values))  # [B, None, d]
        if self.pool is not None:
            return self.pool(vectors)
        total = tf.reduce_sum(vectors, axis=1)
        if self.pooling == "sum":
            return total
        count = tf.cast(tokens.row_lengths(), total.dtype)[:, None]
        return total / tf.maximum(count, 1.0)

    def get_config(self):
        # The item encoder's config (vocabulary included) is kept even when it is
        # shared, so a query tower rebuilt on its own gets a copy to restore into.
        return {**super().get_config(), "items": tf.keras.layers.serialize(self.items),
                "separator": self.separator, "max_items": self.max_items,
                "pooling": self.pooling, "attention_units": self.attention_units,
                "shared": self.shared}

    @classmethod
    def from_config(cls, config, custom_objects=None, items=None):
        """``items``: the shared item encoder to use instead of a copy."""
        config = dict(config)
        serialized = config.pop("items")
        if items is None:
            items = tf.keras.layers.deserialize(serialized, custom_objects=custom_objects)
        return cls(items, **config)
