"""Training objectives: tower outputs of one batch -> a scalar loss.

Every loss is summed over the batch's queries, as TFRS Retrieval does, so
learning rates mean the same thing across objectives. Which kind uses which
loss, batch and options: trainer.objective_registry. Three input shapes:

- ``in_batch`` (``InBatchSoftmax``): query [B, d], candidates [B + E, d]: the
  batch's positives (row b is query b's) plus E extra catalog-sampled ones.
- ``per_query`` (``Pointwise``, ``PairwiseHinge``, ``PairwiseLogistic``,
  ``Listwise``): query [B, d], positive [B, d], negatives [B, N, d] - N
  sampled negatives per positive (trainer.sampling); ``batch["neg_valid"]``
  [B, N] marks the ones to use (a sampler may fail to find N).
- ``labelled`` (``MatrixFactorization``): query [B, d], item [B, d] and
  ``batch["label"]`` [B] in {0, 1}, ``batch["weight"]`` [B].

Cosine objectives assume L2-normalised towers (dot product = cosine).
Serving always scores with the plain dot product: logQ terms, temperatures
and masks exist in training only.
"""
from __future__ import annotations

import tensorflow as tf
import tensorflow_recommenders as tfrs

from trainer.config import ObjectiveConfig
from trainer.objective_registry import OBJECTIVES

_MASKED = -1e9


def _serializable(cls):
    """Registered with Keras; ``get_config`` holds the options the registry passes
    the constructor, so ``from_config(get_config())`` makes the same loss."""
    options = next(e.loss_options for e in OBJECTIVES.values() if e.loss == cls.__name__)

    def get_config(self):
        return {**tf.keras.layers.Layer.get_config(self),
                **{name: getattr(self, name) for name in options}}

    cls.get_config = get_config
    return tf.keras.utils.register_keras_serializable(package="trainer")(cls)


@_serializable
class InBatchSoftmax(tf.keras.layers.Layer):
    """TFRS Retrieval: in-batch sampled softmax with temperature and logQ.

    Each query's negatives are the other candidates of its batch. An item
    shows up among them in proportion to its sampling probability q_i, so
    its logit is corrected by -w log q_i (``batch["candidate_prob"]`` [B + E]
    when extra candidates are mixed in, else ``batch["item_prob"]`` [B], static
    or streaming; w = ``logq_weight``, 1 = the full correction).
    ``batch["score_mask"]`` [B, B + E] (optional) drops pairs that must not
    be negatives (the user's own clicked/exposed items). With
    ``num_hard_negatives`` only the k negatives the model scores highest (raw
    cosines) stay in the softmax, then logQ-corrected. TFRS's own mining ranks
    the corrected logits instead, where -log q lifts rare items: its "hardest"
    negatives are the rarest, and training drifts to popularity.
    """

    def __init__(self, temperature: float = 0.2, logq_correction: bool = True,
                 logq_weight: float = 1.0, remove_accidental_hits: bool = True,
                 num_hard_negatives=None, **kwargs):
        super().__init__(**kwargs)
        self.temperature = temperature
        self.logq_correction = logq_correction
        self.logq_weight = logq_weight
        self.remove_accidental_hits = remove_accidental_hits
        self.num_hard_negatives = num_hard_negatives
        self.task = tfrs.tasks.Retrieval(
            metrics=None, temperature=temperature,
            remove_accidental_hits=remove_accidental_hits)

    def call(self, query, candidate, batch, training=False):
        prob = batch.get("candidate_prob", batch.get("item_prob"))
        if prob is not None:
            # TFRS clips q to [1e-6, 1] before the log. Dividing by the batch's
            # largest q shifts every logit by the same log(max q), which leaves
            # the softmax unchanged, and keeps items down to 1e-6 x the most
            # popular one exactly corrected (not only those with q >= 1e-6).
            prob = prob / tf.reduce_max(prob)
            if self.logq_weight != 1.0:
                # TFRS subtracts log(q^w) = w log q; above w = 1 exact for items
                # down to 1e-6^(1/w) x the batch's most popular one
                prob = prob ** self.logq_weight
        ids = batch.get("candidate_row", batch.get("item_row"))
        mask = batch.get("score_mask")
        if self.num_hard_negatives:
            mask = self._hardest(query, candidate, ids, mask)
        return self.task(
            query, candidate,
            candidate_sampling_probability=prob if self.logq_correction else None,
            candidate_ids=ids if self.remove_accidental_hits else None,
            score_mask=mask, compute_metrics=False, compute_batch_metrics=False)

    def _hardest(self, query, candidate, ids, mask):
        """score_mask [B, C] keeping each query's positive and its k highest-
        scoring negatives (never a masked pair or a copy of the positive)."""
        scores = tf.matmul(query, candidate, transpose_b=True)   # [B, C]
        b, c = tf.shape(scores)[0], tf.shape(scores)[1]
        positive = tf.eye(b, c, dtype=tf.bool)
        candidates = tf.logical_not(positive)
        if mask is not None:
            candidates = tf.logical_and(candidates, mask)
        if ids is not None and self.remove_accidental_hits:
            same = tf.equal(ids[:b, None], ids[None, :])
            candidates = tf.logical_and(candidates, tf.logical_not(same))
        ranked = tf.where(candidates, scores, tf.constant(-1e9, scores.dtype))
        k = tf.minimum(self.num_hard_negatives, c)
        top = tf.math.top_k(ranked, k=k).indices                   # [B, k]
        rows = tf.broadcast_to(tf.range(b)[:, None], tf.shape(top))
        # scattered: a [B, k, C] one-hot took 8x as long at B = C = 1024, k = 256
        kept = tf.scatter_nd(tf.stack([rows, top], axis=-1),
                             tf.ones(tf.shape(top), tf.int32), tf.stack([b, c])) > 0
        return tf.logical_or(positive, tf.logical_and(kept, candidates))


class _PerQuery(tf.keras.layers.Layer):
    """Base: cosines of each query with its positive [B] and negatives [B, N]."""

    def call(self, query, positive, negatives, batch=None, training=False):
        batch = batch or {}
        pos = tf.reduce_sum(query * positive, axis=-1)
        neg = tf.einsum("bd,bnd->bn", query, negatives)
        valid = batch.get("neg_valid")
        valid = tf.ones_like(neg) if valid is None else tf.cast(valid, neg.dtype)
        return self.loss_from_scores(pos, neg, valid, batch)

    def loss_from_scores(self, pos, neg, valid, batch):  # pragma: no cover - abstract
        raise NotImplementedError


@_serializable
class Pointwise(_PerQuery):
    """Binary classification of (query, item) pairs on logit = cos / temperature.

    The positive has label 1, each negative label 0, so the loss pushes cos
    toward +1 for positives and -1 for negatives:
    sum_b [softplus(-cos+/T) + sum_n softplus(cos-_n/T)].
    """

    def __init__(self, temperature: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.temperature = temperature

    def loss_from_scores(self, pos, neg, valid, batch):
        t = self.temperature
        return (tf.reduce_sum(tf.nn.softplus(-pos / t))
                + tf.reduce_sum(valid * tf.nn.softplus(neg / t)))


@_serializable
class PairwiseHinge(_PerQuery):
    """Triplet hinge: sum over (b, n) of max(0, cos(a, b-) + margin - cos(a, b+))."""

    def __init__(self, margin: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.margin = margin

    def loss_from_scores(self, pos, neg, valid, batch):
        return tf.reduce_sum(valid * tf.nn.relu(neg + self.margin - pos[:, None]))


@_serializable
class PairwiseLogistic(_PerQuery):
    """Smooth triplet loss: sum over (b, n) of log(1 + exp(sigma (cos- - cos+)))."""

    def __init__(self, sigma: float = 10.0, **kwargs):
        super().__init__(**kwargs)
        self.sigma = sigma

    def loss_from_scores(self, pos, neg, valid, batch):
        return tf.reduce_sum(valid * tf.nn.softplus(self.sigma * (neg - pos[:, None])))


@_serializable
class Listwise(_PerQuery):
    """Softmax cross-entropy over one positive and its N negatives: -log s+.

    Logits are cos / T. With ``logq_correction`` each sampled negative's logit
    is reduced by w ``batch["neg_logq"]`` [B, N] = w log(N_easy q_i), log of its
    expected count under the sampler (sampled-softmax correction; w =
    ``logq_weight``, 1 = full); hard negatives carry 0 there (no known
    proposal). The positive is not a draw, so it is never corrected.
    """

    def __init__(self, temperature: float = 0.2, logq_correction: bool = True,
                 logq_weight: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.temperature = temperature
        self.logq_correction = logq_correction
        self.logq_weight = logq_weight

    def loss_from_scores(self, pos, neg, valid, batch):
        neg = neg / self.temperature
        if self.logq_correction and batch.get("neg_logq") is not None:
            neg = neg - self.logq_weight * batch["neg_logq"]
        neg = tf.where(valid > 0, neg, _MASKED)
        logits = tf.concat([pos[:, None] / self.temperature, neg], axis=1)
        return -tf.reduce_sum(tf.nn.log_softmax(logits, axis=1)[:, 0])


@_serializable
class MatrixFactorization(tf.keras.layers.Layer):
    """The baseline: squared error of the inner product on labelled pairs.

    loss = sum_b w_b (<u_b, v_b> - y_b)^2 + l2 sum_b (|u_b|^2 + |v_b|^2), y = 1
    for a click and 0 for an exposure without one (or a sampled unobserved
    item, weight ``batch["weight"]``). Towers must not be L2-normalised.
    """

    def __init__(self, l2_regularization: float = 1e-4, **kwargs):
        super().__init__(**kwargs)
        self.l2_regularization = l2_regularization

    def call(self, query, item, batch, training=False):
        pred = tf.reduce_sum(query * item, axis=-1)
        y = tf.cast(batch["label"], pred.dtype)
        w = tf.cast(batch.get("weight", tf.ones_like(y)), pred.dtype)
        reg = tf.reduce_sum(tf.square(query)) + tf.reduce_sum(tf.square(item))
        return tf.reduce_sum(w * tf.square(pred - y)) + self.l2_regularization * reg


def make_objective(config: ObjectiveConfig) -> tf.keras.layers.Layer:
    """The loss layer of ``config.kind`` (trainer.objective_registry), with its options."""
    entry = OBJECTIVES[config.kind]
    return globals()[entry.loss](**{name: getattr(config, name) for name in entry.loss_options},
                                 name="objective")
