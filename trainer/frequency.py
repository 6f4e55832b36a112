"""Streaming item-frequency estimation for the logQ correction.

Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
Recommendations" (RecSys 2019), Algorithm 2: instead of counting clicks in a
pass over the data, keep per hash bucket the step an item was last seen (A)
and an exponential moving average of the gap between sightings (B); the
item's frequency is 1 / B. Trending and new items are tracked as they come,
and the state is a handful of TF variables saved with the checkpoint.

Per training step t and item y (hash h, learning rate alpha)::

    B[h(y)] <- (1 - alpha) * B[h(y)] + alpha * (t - A[h(y)])
    A[h(y)] <- t

With several hash functions the estimate is 1 / max_i B_i[h_i(y)]: a bucket
shared with a more frequent item only shortens B, so the largest B is the
least contaminated.

Three choices of ours, all tested (tests/test_frequency.py):

- **k copies in one batch** (TFRS issue #635). The paper updates once per
  step, so B estimates the gap between *steps that contain* the item and
  1 / B = P(seen in a step) saturates at 1: a head item in every batch looks
  the same whether it fills 1 or 50 rows. Here a third array C keeps the
  moving average of the copies k per step seen (same rate alpha), and the
  estimate is C / B, the expected copies per batch::

      B <- (1 - alpha) B + alpha (t - A);  C <- (1 - alpha) C + alpha k;  A <- t

  Its fixed point is E[k | seen] / E[gap | seen] = (lambda / P(seen)) /
  (1 / P(seen)) = lambda for rare and head items alike, each averaged over
  about 1 / alpha sightings. An item never seen twice in a batch keeps C = 1,
  and the update is the paper's (after the warm-up below). (Folding the k
  copies into B as k updates of gap (t - A) / k has the same fixed point but
  only about 1 / (alpha k) steps of memory: on the Zipf stream of the tests, alpha 0.01, its most
  frequent item (15.7 copies a batch) came out 11 % off, against 2 % here.)
  Estimates move per sighting: an item rising 4x is followed to within
  15 % in 5 / alpha steps, one falling 4x in 10 / alpha. With several
  hashes a shared bucket only raises C / B, so the estimate is the minimum
  over hashes (the paper's 1 / max B).
- **warm-up** (a running mean before the moving average). B and C are
  averages of what a bucket has seen so far while it has fewer than 1 / alpha
  measurements (rate max(alpha, 1 / n) for its n-th gap or copy count), then
  moving averages with rate alpha (the same cure as Adam's bias correction
  of its moments). A fifth array n counts each bucket's sightings. Without
  it every estimate starts at 1 / initial_gap and needs several 1 / alpha
  sightings to leave it: after the 27 steps of one day of the drifting world (3 epochs, batch
  1024) the plain moving average spanned 0.010-0.10 copies a batch where the
  counts say 0.11-32, so the logQ correction was a quarter as strong as the
  static one's (docs/UPDATES.md, "streaming logQ").
- **first sighting**: a bucket seen for the first time at step t (A = 0)
  records the step and its copies, and takes the gap min(t, initial_gap): the
  item was in none of the t - 1 steps before (early in training, the
  estimator has only seen t steps), and an item first seen late (a new item
  at step 10^5) is not taken for a 1-in-10^5-steps item before a real gap is
  measured (the paper's t - 0). The second sighting replaces it with the
  measured gap.

Ids are hashed in the graph with ``tf.strings.to_hash_bucket_strong`` (a
core op, one key pair per hash), so the layer needs nothing outside TF.
"""
from __future__ import annotations

import tensorflow as tf

# SipHash key pairs of the hash functions (fixed: a checkpoint's buckets stay valid).
_KEYS = ((0x5F0E1E7A, 0x1B873593), (0x2545F491, 0x4F6CDD1D), (0x68E31DA4, 0x7FEB352D),
         (0x3C6EF372, 0x165667B1))


@tf.keras.utils.register_keras_serializable(package="trainer")
class StreamingFrequency(tf.keras.layers.Layer):
    """Item ids [N] (string) -> estimated copies per batch [N] (float32).

    ``layer(ids, training=True)`` first folds the batch into the state (one
    step), then returns the estimates for ``ids``; ``training=False`` only
    reads. The state is five non-trainable weights: ``step`` (int64 scalar,
    the last step t), ``last_step`` A, ``gap`` B, ``copies`` C and
    ``sightings`` n ([num_hashes, num_buckets], int64 / float32 / float32 /
    int64), saved by ``tf.train.Checkpoint`` and by Keras weight checkpoints like any weight.

    Args: ``num_buckets`` H per hash (the paper simulates with 5,000; use a
    few times the catalog size); ``num_hashes`` 1-4; ``alpha`` the moving
    average's rate (0.01 in the paper: about 1 / alpha sightings to follow a
    change); ``initial_gap`` the gap assumed for an item seen only once (100
    in the paper; at most the steps seen so far), and 1 / initial_gap the
    estimate of an id never seen.

    Single-replica training only: under ``tf.distribute`` each replica would
    fold in only its own ids; gather the global batch's ids
    (``all_gather``) and update once per step instead.
    """

    def __init__(self, num_buckets: int = 100_000, num_hashes: int = 2, alpha: float = 0.01,
                 initial_gap: float = 100.0, **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        if not 1 <= num_hashes <= len(_KEYS):
            raise ValueError(f"num_hashes must be in [1, {len(_KEYS)}], got {num_hashes}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if num_buckets < 1 or initial_gap <= 0:
            raise ValueError("num_buckets must be >= 1 and initial_gap > 0")
        self.num_buckets, self.num_hashes = int(num_buckets), int(num_hashes)
        self.alpha, self.initial_gap = float(alpha), float(initial_gap)
        shape = (self.num_hashes, self.num_buckets)
        self.step = self.add_weight(name="step", shape=(), dtype=tf.int64,
                                    initializer="zeros", trainable=False)
        self.last_step = self.add_weight(name="last_step", shape=shape, dtype=tf.int64,
                                         initializer="zeros", trainable=False)
        self.gap = self.add_weight(name="gap", shape=shape, dtype=tf.float32,
                                   initializer=tf.keras.initializers.Constant(initial_gap),
                                   trainable=False)
        self.copies = self.add_weight(name="copies", shape=shape, dtype=tf.float32,
                                      initializer="ones", trainable=False)
        self.sightings = self.add_weight(name="sightings", shape=shape, dtype=tf.int64,
                                         initializer="zeros", trainable=False)

    def get_config(self):
        return {**super().get_config(), "num_buckets": self.num_buckets,
                "num_hashes": self.num_hashes, "alpha": self.alpha,
                "initial_gap": self.initial_gap}

    def call(self, item_ids, training=False):
        ids = tf.reshape(item_ids, [-1])
        if training:
            self.update(ids)
        return self.probability(ids)

    def buckets(self, item_ids) -> tf.Tensor:
        """[num_hashes, N] int64 bucket of each id under each hash."""
        ids = tf.reshape(tf.convert_to_tensor(item_ids, tf.string), [-1])
        return tf.stack([tf.strings.to_hash_bucket_strong(ids, self.num_buckets, list(key))
                         for key in _KEYS[: self.num_hashes]])

    def probability(self, item_ids) -> tf.Tensor:
        """[N] float32: min over hashes of C / B, the expected copies per batch."""
        where = self._indices(self.buckets(item_ids))
        rate = tf.gather_nd(self.copies, where) / tf.gather_nd(self.gap, where)
        return tf.reduce_min(rate, axis=0)

    def update(self, item_ids) -> tf.Tensor:
        """Fold one batch (one step) into the state; returns the new step t."""
        flat = tf.reshape(self._indices(self.buckets(item_ids)), [-1, 2])
        # A bucket hit k times this step (one id repeated, or ids sharing it).
        cells = flat[:, 0] * self.num_buckets + flat[:, 1]
        unique, index = tf.unique(cells)
        k = tf.math.unsorted_segment_sum(tf.ones_like(index, tf.float32), index,
                                         tf.size(unique))
        where = tf.stack([unique // self.num_buckets, unique % self.num_buckets], axis=1)
        t = self.step.assign_add(1)
        last = tf.gather_nd(self.last_step, where)
        n = tf.gather_nd(self.sightings, where) + 1          # this sighting is the n-th
        # the n-th copy count and the (n - 1)-th gap: running mean, then rate alpha
        copy_rate = tf.maximum(self.alpha, 1.0 / tf.cast(n, tf.float32))
        gap_rate = tf.maximum(self.alpha, 1.0 / tf.cast(tf.maximum(n - 1, 1), tf.float32))
        gap = tf.gather_nd(self.gap, where)
        copies = tf.gather_nd(self.copies, where)
        first_gap = tf.minimum(self.initial_gap, tf.cast(t, tf.float32))
        self.gap.scatter_nd_update(where, tf.where(
            n > 1, gap + gap_rate * (tf.cast(t - last, tf.float32) - gap),
            tf.fill(tf.shape(gap), first_gap)))
        self.copies.scatter_nd_update(where, copies + copy_rate * (k - copies))
        self.last_step.scatter_nd_update(where, tf.fill(tf.shape(last), t))
        self.sightings.scatter_nd_update(where, n)
        return t

    def _indices(self, buckets) -> tf.Tensor:
        """[num_hashes, N, 2] (hash, bucket) pairs for gather_nd / scatter_nd."""
        rows = tf.broadcast_to(tf.range(self.num_hashes, dtype=tf.int64)[:, None],
                               tf.shape(buckets))
        return tf.stack([rows, buckets], axis=-1)
