"""Feature encoders: raw feature tensor [batch] -> dense vector [batch, dim].

One Keras layer per feature kind, all preprocessing inside (vocabularies,
normalization statistics, bucket boundaries are layer state adapted on the
training data), so a tower built from them takes raw features and the
exported SavedModel needs no preprocessing outside the graph.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import tensorflow as tf

from trainer.config import (CategoricalFeature, ContinuousFeature, FeatureConfig,
                            HistoryFeature, MultiCategoricalFeature, TextFeature)

# Raw dtype each feature kind takes at the tower's input.
RAW_DTYPES = {
    "categorical": tf.string,
    "multi_categorical": tf.string,
    "history": tf.string,  # item ids joined by the separator, like multi_categorical
    "text": tf.string,
    "continuous": tf.float32,
}


class CategoricalEncoder(tf.keras.layers.Layer):
    """string [batch] -> vocabulary (or hash) index -> embedding [batch, dim]."""

    def __init__(self, embedding_dim: int, vocabulary: str = "adapt",
                 num_oov_buckets: int = 1, max_tokens=None, hash_bins: int = 100_000,
                 **kwargs):
        super().__init__(**kwargs)
        self.embedding_dim = embedding_dim
        self.vocabulary = vocabulary
        self.num_oov_buckets = num_oov_buckets
        self.max_tokens = max_tokens
        self.hash_bins = hash_bins
        if vocabulary == "hashing":
            self.index = tf.keras.layers.Hashing(num_bins=hash_bins)
        else:
            self.index = tf.keras.layers.StringLookup(
                num_oov_indices=num_oov_buckets, max_tokens=max_tokens, mask_token=None)
        self.embedding = None

    def adapt(self, values: np.ndarray) -> None:
        if self.vocabulary != "hashing":
            self.index.adapt(np.asarray(values, dtype=object).astype(str))
        size = (self.hash_bins if self.vocabulary == "hashing"
                else self.index.vocabulary_size())
        self.embedding = tf.keras.layers.Embedding(size, self.embedding_dim)

    @property
    def vocabulary_size(self) -> int:
        return self.hash_bins if self.vocabulary == "hashing" else self.index.vocabulary_size()

    def call(self, x):
        return self.embedding(self.index(x))

    def get_config(self):
        return {**super().get_config(), "embedding_dim": self.embedding_dim,
                "vocabulary": self.vocabulary, "num_oov_buckets": self.num_oov_buckets,
                "max_tokens": self.max_tokens, "hash_bins": self.hash_bins}


class MultiCategoricalEncoder(tf.keras.layers.Layer):
    """"a|b|c" string [batch] -> split -> lookup -> pooled embedding [batch, dim].

    Empty strings (no values) pool to the zero vector.
    """

    def __init__(self, embedding_dim: int, separator: str = "|", num_oov_buckets: int = 1,
                 max_tokens=None, pooling: str = "mean", **kwargs):
        super().__init__(**kwargs)
        self.embedding_dim = embedding_dim
        self.separator = separator
        self.num_oov_buckets = num_oov_buckets
        self.max_tokens = max_tokens
        self.pooling = pooling
        self.lookup = tf.keras.layers.StringLookup(
            num_oov_indices=num_oov_buckets, max_tokens=max_tokens, mask_token=None)
        self.embedding = None

    def tokens(self, x):
        parts = tf.strings.split(x, sep=self.separator)
        return tf.ragged.boolean_mask(parts, tf.not_equal(parts, ""))

    def adapt(self, values: np.ndarray) -> None:
        flat = [t for v in values for t in str(v).split(self.separator) if t]
        self.lookup.adapt(np.asarray(flat or ["<none>"], dtype=str))
        self.embedding = tf.keras.layers.Embedding(self.lookup.vocabulary_size(),
                                                   self.embedding_dim)

    def call(self, x):
        ids = self.lookup(self.tokens(x))  # ragged [batch, None]
        vectors = tf.ragged.map_flat_values(self.embedding, ids)
        total = tf.reduce_sum(vectors, axis=1)  # [batch, dim]; empty rows -> 0
        if self.pooling == "sum":
            return total
        count = tf.cast(ids.row_lengths(), total.dtype)[:, None]
        return total / tf.maximum(count, 1.0)

    def get_config(self):
        return {**super().get_config(), "embedding_dim": self.embedding_dim,
                "separator": self.separator, "num_oov_buckets": self.num_oov_buckets,
                "max_tokens": self.max_tokens, "pooling": self.pooling}


class ContinuousEncoder(tf.keras.layers.Layer):
    """float [batch] -> [normalized value] ++ [quantile-bucket embedding].

    Missing values (NaN) are imputed with the training mean inside the graph,
    so callers can send NaN for an unknown value.
    """

    def __init__(self, normalize: bool = True, log1p: bool = False, buckets: int = 0,
                 embedding_dim: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.normalize = normalize
        self.log1p = log1p
        self.buckets = buckets
        self.embedding_dim = embedding_dim
        self.normalizer = tf.keras.layers.Normalization(axis=None) if normalize else None
        self.discretizer = None
        self.embedding = None
        self.fill_value = None

    def _transform(self, x):
        x = tf.cast(x, tf.float32)
        if self.log1p:
            x = tf.math.log1p(tf.maximum(x, 0.0))
        return x

    def adapt(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64)
        finite = v[np.isfinite(v)]
        if finite.size == 0:
            raise ValueError(f"continuous feature '{self.name}': no finite values to adapt on")
        finite = self._transform(finite).numpy()
        self.fill_value = tf.constant(float(np.mean(finite)), tf.float32)
        if self.normalizer is not None:
            self.normalizer.adapt(finite.astype(np.float32))
        if self.buckets:
            qs = np.quantile(finite, np.linspace(0, 1, self.buckets + 1)[1:-1])
            boundaries = sorted(set(float(q) for q in qs))
            self.discretizer = tf.keras.layers.Discretization(bin_boundaries=boundaries)
            self.embedding = tf.keras.layers.Embedding(len(boundaries) + 1,
                                                       self.embedding_dim)

    def call(self, x):
        x = self._transform(x)
        x = tf.where(tf.math.is_finite(x), x, self.fill_value)
        parts = []
        if self.normalizer is not None:
            parts.append(tf.reshape(self.normalizer(x), [-1, 1]))
        if self.discretizer is not None:
            parts.append(self.embedding(self.discretizer(x)))
        if not parts:
            parts.append(tf.reshape(x, [-1, 1]))
        return tf.concat(parts, axis=-1)

    def get_config(self):
        return {**super().get_config(), "normalize": self.normalize, "log1p": self.log1p,
                "buckets": self.buckets, "embedding_dim": self.embedding_dim}


class TextEncoder(tf.keras.layers.Layer):
    """Free text [batch] -> TextVectorization tokens -> masked mean embedding."""

    def __init__(self, embedding_dim: int = 16, max_tokens: int = 5000,
                 max_length: int = 16, **kwargs):
        super().__init__(**kwargs)
        self.embedding_dim = embedding_dim
        self.max_tokens = max_tokens
        self.max_length = max_length
        self.vectorizer = tf.keras.layers.TextVectorization(
            max_tokens=max_tokens, output_sequence_length=max_length)
        self.embedding = None

    def adapt(self, values: np.ndarray) -> None:
        self.vectorizer.adapt(np.asarray(values, dtype=object).astype(str))
        self.embedding = tf.keras.layers.Embedding(self.vectorizer.vocabulary_size(),
                                                   self.embedding_dim)

    def call(self, x):
        ids = self.vectorizer(x)  # [batch, max_length], 0 = padding
        mask = tf.cast(tf.not_equal(ids, 0), tf.float32)[..., None]
        total = tf.reduce_sum(self.embedding(ids) * mask, axis=1)
        return total / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)

    def get_config(self):
        return {**super().get_config(), "embedding_dim": self.embedding_dim,
                "max_tokens": self.max_tokens, "max_length": self.max_length}


def make_encoder(spec: FeatureConfig) -> tf.keras.layers.Layer:
    """Build the (un-adapted) encoder a feature spec declares."""
    name = f"{spec.name}_encoder"
    if isinstance(spec, CategoricalFeature):
        return CategoricalEncoder(spec.embedding_dim, spec.vocabulary, spec.num_oov_buckets,
                                  spec.max_tokens, spec.hash_bins, name=name)
    if isinstance(spec, MultiCategoricalFeature):
        return MultiCategoricalEncoder(spec.embedding_dim, spec.separator,
                                       spec.num_oov_buckets, spec.max_tokens, spec.pooling,
                                       name=name)
    if isinstance(spec, HistoryFeature):
        return MultiCategoricalEncoder(spec.embedding_dim, spec.separator, 1, None,
                                       spec.pooling, name=name)
    if isinstance(spec, ContinuousFeature):
        return ContinuousEncoder(spec.normalize, spec.log1p, spec.buckets,
                                 spec.embedding_dim, name=name)
    if isinstance(spec, TextFeature):
        return TextEncoder(spec.embedding_dim, spec.max_tokens, spec.max_length, name=name)
    raise TypeError(f"unknown feature spec {spec!r}")


def raw_column(table: pd.DataFrame, spec: FeatureConfig, table_name: str) -> np.ndarray:
    """The column a feature reads, coerced to its raw dtype (strings / float32).

    Missing strings become "" (OOV / empty set); missing floats stay NaN (the
    encoder imputes). A column absent from the table is an error naming both.
    """
    if spec.name not in table.columns:
        raise KeyError(f"feature '{spec.name}' is declared in the config but the "
                       f"{table_name} table has no such column (columns: "
                       f"{list(table.columns)})")
    col = table[spec.name]
    if RAW_DTYPES[spec.type] == tf.float32:
        values = pd.to_numeric(col, errors="coerce")
        bad = values.isna() & col.notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(f"feature '{spec.name}' ({table_name} table, row {row}): "
                             f"expected a number, got {col.iloc[row]!r}")
        return values.to_numpy(dtype=np.float32)
    return col.fillna("").astype(str).to_numpy(dtype=object)
