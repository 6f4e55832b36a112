"""Samplers for training pairs: positive re-balancing and negatives.

Everything that runs per batch is a TensorFlow op (no Python loop per
example), so it can live in the tf.data pipeline or inside the model:

- ``CatalogSampler``: easy negatives, item i with probability
  q_i ∝ clicks_i^alpha (alpha = 0.75 by default, word2vec's value: between
  uniform, which is too easy, and the click distribution, which is all hits).
  Drawn by inverse CDF: one ``tf.searchsorted`` over the cumulative
  distribution per draw, O(log catalog), as cheap as an alias table.
- ``ExclusionSet``: the (user, item) pairs that must never be a negative for
  that user - their clicked items and their exposed-but-not-clicked ones
  (retrieval never uses exposures as negatives). Sorted int64 keys
  user * num_items + item, membership by ``tf.searchsorted``.
- ``sample_excluding``: catalog draws with rejection of excluded pairs.
- ``RankingLogSampler``: hard negatives, items an earlier stage scored for
  the user but filtered out (a CSR table user -> items).
- ``mine_hard_negatives``: hard negatives mined in-graph as the model's own
  highest-scoring non-positives among a pool of catalog draws.
- ``mixed_candidate_probability``: the logQ term of every candidate when
  in-batch and catalog-sampled negatives are mixed.
- ``subsample_keep_probability`` / ``upsample_cold``: positive re-balancing.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

# Logit given to pairs that must not take part in a softmax.
_MASKED = -1e9


# --------------------------------------------------------------------- positives
def item_counts(item_rows: np.ndarray, num_items: int) -> np.ndarray:
    """Clicks per item row, [num_items] float64."""
    return np.bincount(item_rows, minlength=num_items).astype(np.float64)


def subsample_keep_probability(counts: np.ndarray, threshold: float) -> np.ndarray:
    """Keep probability per item for hot-item down-sampling, [num_items] float32.

    keep_i = min(1, sqrt(t / f_i)) with f_i = counts_i / sum(counts) (word2vec's
    sub-sampling of frequent words): an item with a click share above t loses
    clicks in proportion, so head items stop dominating the positives.
    ``threshold`` 0 keeps everything.
    """
    if threshold <= 0:
        return np.ones(len(counts), np.float32)
    f = counts / max(counts.sum(), 1.0)
    with np.errstate(divide="ignore"):
        keep = np.where(f > 0, np.sqrt(threshold / np.maximum(f, 1e-30)), 1.0)
    return np.minimum(keep, 1.0).astype(np.float32)


def upsample_cold(user_rows: np.ndarray, item_rows: np.ndarray, counts: np.ndarray,
                  below: int, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Repeat the clicks of items with fewer than ``below`` clicks ``factor`` times."""
    if below <= 0 or factor <= 1:
        return user_rows, item_rows
    reps = np.where(counts[item_rows] < below, factor, 1)
    return np.repeat(user_rows, reps), np.repeat(item_rows, reps)


def effective_item_probability(counts: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """p_i: the share of training positives on item i after re-balancing, [num_items].

    In-batch negatives are the batch's positives, so this is their sampling
    probability (the logQ term). Items never clicked get the smallest
    positive mass so log p stays finite.
    """
    mass = np.maximum(counts * keep, 0.5)
    return (mass / mass.sum()).astype(np.float32)


# --------------------------------------------------------------------- negatives
class CatalogSampler:
    """Draws item rows with q_i ∝ counts_i^alpha; items with count 0 never drawn.

    ``prob`` [num_items] float64 is the exact sampling distribution (used for
    logQ terms). Draws use ``tf.random.stateless_uniform`` so a pipeline with a
    fixed seed is reproducible.
    """

    def __init__(self, counts: np.ndarray, alpha: float = 0.75):
        counts = np.asarray(counts, np.float64)
        weights = np.where(counts > 0, np.power(np.maximum(counts, 1e-30), alpha), 0.0)
        if weights.sum() <= 0:
            raise ValueError("CatalogSampler: no item has a positive count")
        self.prob = weights / weights.sum()
        cdf = np.cumsum(self.prob)
        cdf[-1] = 1.0
        self.num_items = len(counts)
        self._cdf = tf.constant(cdf, tf.float64)
        self.log_prob = tf.constant(np.log(np.maximum(self.prob, 1e-30)), tf.float32)

    def sample(self, shape, seed) -> tf.Tensor:
        """int64 item rows of ``shape``; ``seed`` is a [2] int tensor."""
        u = tf.random.stateless_uniform(shape, seed, dtype=tf.float64)
        flat = tf.reshape(u, [-1])
        rows = tf.searchsorted(self._cdf, flat, side="right", out_type=tf.int64)
        rows = tf.minimum(rows, self.num_items - 1)
        return tf.reshape(rows, tf.shape(u))


class ExclusionSet:
    """(user row, item row) pairs that are never negatives for that user.

    Keys are user * num_items + item. Up to ``dense_limit`` possible keys
    (ML-100K: 1.6 M) the set is a dense bool table and a lookup is one
    gather; beyond, sorted keys and a binary search (``tf.searchsorted``).
    """

    def __init__(self, user_rows: np.ndarray, item_rows: np.ndarray, num_items: int,
                 dense_limit: int = 1 << 25):
        keys = np.asarray(user_rows, np.int64) * num_items + np.asarray(item_rows, np.int64)
        self._hold(np.unique(keys), num_items, dense_limit)

    @classmethod
    def from_keys(cls, keys: np.ndarray, num_items: int, dense_limit: int = 1 << 25
                  ) -> "ExclusionSet":
        """The set of sorted, distinct int64 ``keys`` (user * num_items + item),
        as a streamed pass collects them (trainer.streaming)."""
        self = cls.__new__(cls)
        self._hold(np.asarray(keys, np.int64), num_items, dense_limit)
        return self

    def _hold(self, keys: np.ndarray, num_items: int, dense_limit: int) -> None:
        self.num_items = num_items
        size = int(keys.max()) + 1 if len(keys) else 1
        self._dense = size <= dense_limit
        if self._dense:
            table = np.zeros(size + 1, bool)  # last slot: any key beyond the table
            table[keys] = True
            self._table = tf.constant(table)
            self._size = size
        else:
            # A -1 sentinel keeps the table non-empty; no real key is negative.
            self._keys = tf.constant(np.concatenate([[-1], keys]), tf.int64)
            self._size = int(self._keys.shape[0])

    def contains(self, users: tf.Tensor, items: tf.Tensor) -> tf.Tensor:
        """bool, the broadcast shape of ``users`` and ``items`` (int64 rows)."""
        key = tf.cast(users, tf.int64) * self.num_items + tf.cast(items, tf.int64)
        if self._dense:
            return tf.gather(self._table, tf.minimum(key, self._size))
        flat = tf.reshape(key, [-1])
        pos = tf.minimum(tf.searchsorted(self._keys, flat, out_type=tf.int64),
                         self._size - 1)
        found = tf.equal(tf.gather(self._keys, pos), flat)
        return tf.reshape(found, tf.shape(key))


def sample_excluding(sampler: CatalogSampler, exclusion: ExclusionSet, users: tf.Tensor,
                     num: int, seed, max_rounds: int = 16) -> tuple[tf.Tensor, tf.Tensor]:
    """``num`` catalog draws per user that are not in the user's exclusion set.

    users [B] int64 -> (rows [B, num] int64, valid [B, num] bool). Excluded
    draws are redrawn up to ``max_rounds`` times; any still excluded after
    that (only for users who clicked most of the catalog) come back with
    valid = False and must be ignored by the loss.
    """
    users = tf.cast(users, tf.int64)
    shape = tf.stack([tf.shape(users)[0], num])
    rows = sampler.sample(shape, seed)
    bad = exclusion.contains(users[:, None], rows)

    def cond(k, rows, bad):
        return tf.logical_and(k < max_rounds, tf.reduce_any(bad))

    def body(k, rows, bad):
        fresh = sampler.sample(shape, tf.cast(seed, tf.int64)
                               + tf.stack([tf.constant(0, tf.int64), 104729 * (k + 1)]))
        rows = tf.where(bad, fresh, rows)
        return k + 1, rows, exclusion.contains(users[:, None], rows)

    _, rows, bad = tf.while_loop(cond, body, (tf.constant(0, tf.int64), rows, bad))
    return rows, tf.logical_not(bad)


class RankingLogSampler:
    """Hard negatives from a ranking log: per user, items scored but filtered out.

    Built once from (user row, item row) pairs (a CSR table); ``sample`` draws
    ``num`` of the user's logged items uniformly with replacement. Users with
    no logged item come back with has_log = False (the caller falls back).
    """

    def __init__(self, user_rows: np.ndarray, item_rows: np.ndarray, num_users: int):
        user_rows = np.asarray(user_rows, np.int64)
        order = np.argsort(user_rows, kind="stable")
        counts = np.bincount(user_rows, minlength=num_users)
        self.num_users = num_users
        self.num_pairs = len(user_rows)
        self._items = tf.constant(np.concatenate([np.asarray(item_rows, np.int64)[order],
                                                  [0]]), tf.int64)
        self._starts = tf.constant(np.concatenate([[0], np.cumsum(counts)[:-1]]), tf.int64)
        self._counts = tf.constant(counts, tf.int64)

    def sample(self, users: tf.Tensor, num: int, seed) -> tuple[tf.Tensor, tf.Tensor]:
        """users [B] -> (rows [B, num] int64, has_log [B, num] bool)."""
        users = tf.cast(users, tf.int64)
        start = tf.gather(self._starts, users)[:, None]
        count = tf.gather(self._counts, users)[:, None]
        u = tf.random.stateless_uniform(tf.stack([tf.shape(users)[0], num]), seed,
                                        dtype=tf.float64)
        k = tf.cast(tf.floor(u * tf.cast(count, tf.float64)), tf.int64)
        k = tf.minimum(k, tf.maximum(count - 1, 0))
        rows = tf.gather(self._items, start + k)
        has = tf.broadcast_to(count > 0, tf.shape(rows))
        return rows, has


def mine_hard_negatives(query: tf.Tensor, pool: tf.Tensor, excluded: tf.Tensor,
                        num: int) -> tuple[tf.Tensor, tf.Tensor]:
    """The model's own highest-scoring non-positives among a pool of items.

    query [B, d], pool [P, d] (embeddings of catalog draws shared by the
    batch), excluded [B, P] bool (the user's clicked/exposed items) ->
    (negatives [B, num, d], valid [B, num] bool). The choice itself is not
    differentiated; gradients flow through the chosen embeddings.
    """
    scores = tf.linalg.matmul(query, pool, transpose_b=True)
    scores = tf.where(excluded, _MASKED, tf.stop_gradient(scores))
    num = tf.minimum(num, tf.shape(pool)[0])
    top, idx = tf.math.top_k(scores, k=num)
    return tf.gather(pool, idx), top > _MASKED / 2


def mixed_candidate_probability(p_batch: tf.Tensor, q_batch: tf.Tensor,
                                p_extra: tf.Tensor, q_extra: tf.Tensor,
                                mode: str = "mixture") -> tf.Tensor:
    """Sampling probability of each of B in-batch + E extra candidates, [B + E].

    In-batch candidates are draws from p (the positives' item distribution),
    extra ones are E draws from the catalog sampler q. The logQ term of a
    softmax over such a pool is the log of each item's expected count in it:

    - ``mixture`` (the correct term): log(B p_i + E q_i) for every candidate,
      whichever source drew it - the pool is one sample from the mixture.
    - ``per_source``: log(B p_i) for in-batch candidates and log(E q_i) for
      extra ones - each negative with its own source's term.

    Both are returned divided by B + E (a constant shift of every logit, which
    the softmax ignores) so they are probabilities in [0, 1] as TFRS expects.
    """
    b = tf.cast(tf.shape(p_batch)[0], tf.float32)
    e = tf.cast(tf.shape(p_extra)[0], tf.float32)
    if mode == "mixture":
        p = tf.concat([p_batch, p_extra], 0)
        q = tf.concat([q_batch, q_extra], 0)
        return (b * p + e * q) / (b + e)
    if mode == "per_source":
        return tf.concat([b * p_batch, e * q_extra], 0) / (b + e)
    raise ValueError(f"unknown logQ mode {mode!r}")


def stateless_unit(r, seed: int) -> tf.Tensor:
    """A uniform [0, 1) float32 scalar from an int64 ``r`` (tf.data.Dataset.random)."""
    return tf.random.stateless_uniform([], tf.stack([r, tf.constant(seed, tf.int64)]))
