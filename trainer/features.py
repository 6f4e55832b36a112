"""Feature encoders: raw feature tensor [batch] -> dense vector [batch, dim].

One Keras layer per feature kind, all preprocessing inside, so a tower built
from them takes raw features and the exported SavedModel needs no
preprocessing outside the graph. Each encoder is an ordinary Keras layer:
its settings and what ``adapt`` learned on the training data (vocabularies,
normalization statistics, bucket boundaries) are its config; its weights
(embedding tables) are made in ``build``. So ``from_config(get_config())``
plus a checkpoint restores a trained encoder exactly, and the id encoders can
grow their vocabulary in place (``grow_vocabulary``) for model updates.
"""
from __future__ import annotations

from typing import Optional

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


def _not_adapted(layer) -> ValueError:
    return ValueError(f"encoder '{layer.name}' has no vocabulary or statistics yet: call "
                      "adapt() (or build it from a trained config) before the first call")


def _embedding_for(layer, rows: int) -> tf.keras.layers.Embedding:
    """The encoder's embedding table [rows, embedding_dim]; its weights are made on
    its first call, so towers draw initial values in the same order as always."""
    return tf.keras.layers.Embedding(rows, layer.embedding_dim, name="embedding")


def _adapted_terms(values: np.ndarray, max_tokens, num_oov: int) -> list[str]:
    """The vocabulary Keras's StringLookup adapts to (by frequency), OOV excluded."""
    scratch = tf.keras.layers.StringLookup(num_oov_indices=num_oov, max_tokens=max_tokens,
                                           mask_token=None)
    scratch.adapt(np.asarray(values, dtype=object).astype(str))
    return [str(t) for t in scratch.get_vocabulary(include_special_tokens=False)]


class _Vocabulary:
    """Encoders whose values go through a StringLookup (``self.lookup``, made in
    ``build`` from ``self.terms``) into an embedding table (``self.embedding``).

    ``terms`` is the vocabulary without the OOV buckets (indices
    0..num_oov_buckets-1 come first), learned by ``adapt`` and part of the
    config. ``grow_vocabulary(values)`` appends the values not yet in it: every
    known value keeps its index and its embedding row bit for bit, the new ones
    get new rows at the end (fresh initial values). A built encoder's embedding
    variable is replaced by a larger one, so functions traced and optimizer
    slots made before must be made again.
    """

    def vocabulary_terms(self) -> list[str]:
        return list(self.terms or [])

    def _split(self, values) -> list[str]:
        """The vocabulary entries in a column of raw values."""
        return [str(v) for v in values]

    def adapt(self, values: np.ndarray) -> None:
        self.terms = _adapted_terms(self._split(values) or ["<none>"], self.max_tokens,
                                    self.num_oov_buckets)

    def _build_lookup(self) -> None:
        if not self.terms:
            raise _not_adapted(self)
        self.lookup = tf.keras.layers.StringLookup(
            num_oov_indices=self.num_oov_buckets, max_tokens=self.max_tokens,
            mask_token=None, vocabulary=list(self.terms))
        self.embedding = _embedding_for(self, self.num_oov_buckets + len(self.terms))

    def grow_vocabulary(self, values) -> list[str]:
        """Append unseen ``values`` [n] to the vocabulary; returns those added."""
        terms = self.vocabulary_terms()
        known = set(terms)
        added = list(dict.fromkeys(t for t in self._split(values) if t not in known))
        if added:
            self.set_terms(terms + added)
        return added

    def set_terms(self, terms: list[str], fresh_rows=()) -> None:
        """Replace the vocabulary by ``terms`` (the old one's length or longer).

        Entry j keeps its row j: rows of entries that stay keep their vectors bit
        for bit; appended rows and the rows in ``fresh_rows`` (entries given to
        another value, e.g. reused rows of expired ids) get fresh initial values.
        """
        old_size = self.num_oov_buckets + len(self.vocabulary_terms())
        size = self.num_oov_buckets + len(terms)
        if size < old_size:
            raise ValueError(f"encoder '{self.name}': a vocabulary only grows "
                             f"({old_size} rows, {size} asked)")
        if self.max_tokens is not None and size > self.max_tokens:
            raise ValueError(f"encoder '{self.name}': the vocabulary needs {size} rows, "
                             f"over max_tokens={self.max_tokens}")
        self.terms = list(terms)
        if self.built:
            self.lookup.set_vocabulary(list(self.terms))
            old = self.embedding.embeddings
            self.embedding = _embedding_for(self, size)
            self.embedding.build(None)  # fresh initial values; the kept rows go on top
            new = self.embedding.embeddings
            keep = np.ones(old_size, dtype=bool)
            keep[np.asarray(list(fresh_rows), dtype=np.int64)] = False
            merged = tf.concat([tf.where(keep[:, None], old, new[:old_size]),
                                new[old_size:]], axis=0)
            new.assign(merged)


@tf.keras.utils.register_keras_serializable(package="trainer")
class CategoricalEncoder(_Vocabulary, tf.keras.layers.Layer):
    """string [batch] -> vocabulary (or hash) index -> embedding [batch, dim].

    ``terms``: the adapted vocabulary (see ``_Vocabulary``); hashing needs none.
    """

    def __init__(self, embedding_dim: int, vocabulary: str = "adapt",
                 num_oov_buckets: int = 1, max_tokens=None, hash_bins: int = 100_000,
                 terms: Optional[list[str]] = None, **kwargs):
        super().__init__(**kwargs)
        self.embedding_dim = embedding_dim
        self.vocabulary = vocabulary
        self.num_oov_buckets = num_oov_buckets
        self.max_tokens = max_tokens
        self.hash_bins = hash_bins
        self.terms = list(terms) if terms else None

    @property
    def hashing(self) -> bool:
        return self.vocabulary == "hashing"

    def adapt(self, values: np.ndarray) -> None:
        if not self.hashing:
            super().adapt(values)

    def grow_vocabulary(self, values) -> list[str]:
        return [] if self.hashing else super().grow_vocabulary(values)

    @property
    def vocabulary_size(self) -> int:
        """Embedding rows: hash bins, or OOV buckets + vocabulary."""
        return self.hash_bins if self.hashing else self.num_oov_buckets + len(self.terms or [])

    def build(self, input_shape):
        if self.hashing:
            self.lookup = tf.keras.layers.Hashing(num_bins=self.hash_bins)
            self.embedding = _embedding_for(self, self.hash_bins)
        else:
            self._build_lookup()
        super().build(input_shape)

    def call(self, x):
        return self.embedding(self.lookup(x))

    def get_config(self):
        return {**super().get_config(), "embedding_dim": self.embedding_dim,
                "vocabulary": self.vocabulary, "num_oov_buckets": self.num_oov_buckets,
                "max_tokens": self.max_tokens, "hash_bins": self.hash_bins,
                "terms": None if self.hashing else self.vocabulary_terms()}


@tf.keras.utils.register_keras_serializable(package="trainer")
class MultiCategoricalEncoder(_Vocabulary, tf.keras.layers.Layer):
    """"a|b|c" string [batch] -> split -> lookup -> pooled embedding [batch, dim].

    Empty strings (no values) pool to the zero vector. ``terms``: the adapted
    vocabulary of single values (see ``_Vocabulary``).
    """

    def __init__(self, embedding_dim: int, separator: str = "|", num_oov_buckets: int = 1,
                 max_tokens=None, pooling: str = "mean", terms: Optional[list[str]] = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.embedding_dim = embedding_dim
        self.separator = separator
        self.num_oov_buckets = num_oov_buckets
        self.max_tokens = max_tokens
        self.pooling = pooling
        self.terms = list(terms) if terms else None

    def tokens(self, x):
        parts = tf.strings.split(x, sep=self.separator)
        return tf.ragged.boolean_mask(parts, tf.not_equal(parts, ""))

    def _split(self, values) -> list[str]:
        return [t for v in values for t in str(v).split(self.separator) if t]

    def build(self, input_shape):
        self._build_lookup()
        super().build(input_shape)

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
                "max_tokens": self.max_tokens, "pooling": self.pooling,
                "terms": self.vocabulary_terms()}


@tf.keras.utils.register_keras_serializable(package="trainer")
class ContinuousEncoder(tf.keras.layers.Layer):
    """float [batch] -> [normalized value] ++ [quantile-bucket embedding].

    Missing values (NaN) are imputed with the training mean inside the graph,
    so callers can send NaN for an unknown value. ``statistics`` (set by
    ``adapt``, part of the config): ``fill_value`` (mean of the transformed
    training values), ``mean`` / ``variance`` (Keras ``Normalization``'s
    adapted float32 values) and ``boundaries`` (bucket edges).
    """

    def __init__(self, normalize: bool = True, log1p: bool = False, buckets: int = 0,
                 embedding_dim: int = 8, statistics: Optional[dict] = None, **kwargs):
        super().__init__(**kwargs)
        self.normalize = normalize
        self.log1p = log1p
        self.buckets = buckets
        self.embedding_dim = embedding_dim
        self.statistics = dict(statistics) if statistics else None

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
        stats = {"fill_value": float(np.float32(np.mean(finite)))}
        if self.normalize:
            # Keras computes the float32 statistics; the layer built in build()
            # takes them as its mean / variance.
            scratch = tf.keras.layers.Normalization(axis=None)
            scratch.adapt(finite.astype(np.float32))
            stats["mean"] = float(scratch.adapt_mean.numpy())
            stats["variance"] = float(scratch.adapt_variance.numpy())
        if self.buckets:
            qs = np.quantile(finite, np.linspace(0, 1, self.buckets + 1)[1:-1])
            stats["boundaries"] = sorted(set(float(q) for q in qs))
        self.statistics = stats

    def build(self, input_shape):
        if self.statistics is None:
            raise _not_adapted(self)
        stats = self.statistics
        self.normalizer = (tf.keras.layers.Normalization(
            axis=None, mean=stats["mean"], variance=stats["variance"])
            if self.normalize else None)
        self.discretizer = self.embedding = None
        if self.buckets:
            self.discretizer = tf.keras.layers.Discretization(
                bin_boundaries=stats["boundaries"])
            self.embedding = _embedding_for(self, len(stats["boundaries"]) + 1)
        super().build(input_shape)

    def call(self, x):
        x = self._transform(x)
        x = tf.where(tf.math.is_finite(x), x,
                     tf.constant(self.statistics["fill_value"], tf.float32))
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
                "buckets": self.buckets, "embedding_dim": self.embedding_dim,
                "statistics": self.statistics}


@tf.keras.utils.register_keras_serializable(package="trainer")
class TextEncoder(tf.keras.layers.Layer):
    """Free text [batch] -> TextVectorization tokens -> masked mean embedding.

    ``terms``: the token vocabulary Keras's TextVectorization adapted to
    (without padding and OOV), part of the config; the vectorizer and the
    embedding table are made in ``build``.
    """

    def __init__(self, embedding_dim: int = 16, max_tokens: int = 5000,
                 max_length: int = 16, terms: Optional[list[str]] = None, **kwargs):
        super().__init__(**kwargs)
        self.embedding_dim = embedding_dim
        self.max_tokens = max_tokens
        self.max_length = max_length
        self.terms = list(terms) if terms else None

    def _vectorizer(self, terms=None) -> tf.keras.layers.TextVectorization:
        return tf.keras.layers.TextVectorization(
            max_tokens=self.max_tokens, output_sequence_length=self.max_length,
            vocabulary=terms)

    def adapt(self, values: np.ndarray) -> None:
        scratch = self._vectorizer()
        scratch.adapt(np.asarray(values, dtype=object).astype(str))
        self.terms = [str(t) for t in scratch.get_vocabulary(include_special_tokens=False)]

    def build(self, input_shape):
        if not self.terms:
            raise _not_adapted(self)
        self.vectorizer = self._vectorizer(list(self.terms))
        self.embedding = _embedding_for(self, self.vectorizer.vocabulary_size())
        super().build(input_shape)

    def call(self, x):
        ids = self.vectorizer(x)  # [batch, max_length], 0 = padding
        mask = tf.cast(tf.not_equal(ids, 0), tf.float32)[..., None]
        total = tf.reduce_sum(self.embedding(ids) * mask, axis=1)
        return total / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)

    def get_config(self):
        return {**super().get_config(), "embedding_dim": self.embedding_dim,
                "max_tokens": self.max_tokens, "max_length": self.max_length,
                "terms": list(self.terms or [])}


def make_encoder(spec: FeatureConfig,
                 item_encoder: Optional[tf.keras.layers.Layer] = None) -> tf.keras.layers.Layer:
    """Build the (un-adapted) encoder a feature spec declares.

    ``item_encoder``: the candidate tower's item_id encoder, for a history
    feature that shares its table (``share_item_embeddings``).
    """
    name = f"{spec.name}_encoder"
    if isinstance(spec, HistoryFeature) and (spec.share_item_embeddings or
                                             spec.pooling in ("attention", "recency")):
        from trainer.history_attention import HistoryEncoder

        if spec.share_item_embeddings and item_encoder is None:
            raise ValueError(f"feature '{spec.name}' shares the item tower's embeddings: "
                             "build the query tower with the candidate tower's item_id "
                             "encoder")
        items = (item_encoder if spec.share_item_embeddings else
                 CategoricalEncoder(spec.embedding_dim, "adapt", 1, name=f"{name}_items"))
        return HistoryEncoder(items, spec.separator, spec.max_items, spec.pooling,
                              spec.attention_units, spec.share_item_embeddings, name=name)
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
