"""Training objectives: tower outputs of one batch -> a scalar loss.

Every loss is summed over the batch's queries, as TFRS Retrieval does, so
learning rates mean the same thing across objectives. Three input shapes:

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

_MASKED = -1e9


class InBatchSoftmax(tf.keras.layers.Layer):
    """TFRS Retrieval: in-batch sampled softmax with temperature and logQ.

    Each query's negatives are the other candidates of its batch. An item
    shows up among them in proportion to its sampling probability q_i, so
    its logit is corrected by -log q_i (``batch["candidate_prob"]`` [B + E]
    when extra candidates are mixed in, else ``batch["item_prob"]`` [B]).
    ``batch["score_mask"]`` [B, B + E] (optional) drops pairs that must not
    be negatives (the user's own clicked/exposed items). With
    ``num_hard_negatives`` only the k highest-scoring negatives per query stay
    in the softmax (TFRS hard-negative mining).
    """

    inputs = "in_batch"

    def __init__(self, temperature: float = 0.2, logq_correction: bool = True,
                 remove_accidental_hits: bool = True, num_hard_negatives=None, **kwargs):
        super().__init__(**kwargs)
        self.logq_correction = logq_correction
        self.remove_accidental_hits = remove_accidental_hits
        self.task = tfrs.tasks.Retrieval(
            metrics=None, temperature=temperature,
            remove_accidental_hits=remove_accidental_hits,
            num_hard_negatives=num_hard_negatives)

    def call(self, query, candidate, batch, training=False):
        prob = batch.get("candidate_prob", batch.get("item_prob"))
        ids = batch.get("candidate_row", batch.get("item_row"))
        return self.task(
            query, candidate,
            candidate_sampling_probability=prob if self.logq_correction else None,
            candidate_ids=ids if self.remove_accidental_hits else None,
            score_mask=batch.get("score_mask"),
            compute_metrics=False, compute_batch_metrics=False)


class _PerQuery(tf.keras.layers.Layer):
    """Base: cosines of each query with its positive [B] and negatives [B, N]."""

    inputs = "per_query"

    def call(self, query, positive, negatives, batch=None, training=False):
        batch = batch or {}
        pos = tf.reduce_sum(query * positive, axis=-1)
        neg = tf.einsum("bd,bnd->bn", query, negatives)
        valid = batch.get("neg_valid")
        valid = tf.ones_like(neg) if valid is None else tf.cast(valid, neg.dtype)
        return self.loss_from_scores(pos, neg, valid, batch)

    def loss_from_scores(self, pos, neg, valid, batch):  # pragma: no cover - abstract
        raise NotImplementedError


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


class PairwiseHinge(_PerQuery):
    """Triplet hinge: sum over (b, n) of max(0, cos(a, b-) + margin - cos(a, b+))."""

    def __init__(self, margin: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.margin = margin

    def loss_from_scores(self, pos, neg, valid, batch):
        return tf.reduce_sum(valid * tf.nn.relu(neg + self.margin - pos[:, None]))


class PairwiseLogistic(_PerQuery):
    """Smooth triplet loss: sum over (b, n) of log(1 + exp(sigma (cos- - cos+)))."""

    def __init__(self, sigma: float = 10.0, **kwargs):
        super().__init__(**kwargs)
        self.sigma = sigma

    def loss_from_scores(self, pos, neg, valid, batch):
        return tf.reduce_sum(valid * tf.nn.softplus(self.sigma * (neg - pos[:, None])))


class Listwise(_PerQuery):
    """Softmax cross-entropy over one positive and its N negatives: -log s+.

    Logits are cos / T. With ``logq_correction`` each sampled negative's logit
    is reduced by ``batch["neg_logq"]`` [B, N] = log(N_easy q_i), its expected
    count under the sampler (sampled-softmax correction); hard negatives carry
    0 there (no known proposal). The positive is not a draw, so it is never
    corrected.
    """

    def __init__(self, temperature: float = 0.2, logq_correction: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.temperature = temperature
        self.logq_correction = logq_correction

    def loss_from_scores(self, pos, neg, valid, batch):
        neg = neg / self.temperature
        if self.logq_correction and batch.get("neg_logq") is not None:
            neg = neg - batch["neg_logq"]
        neg = tf.where(valid > 0, neg, _MASKED)
        logits = tf.concat([pos[:, None] / self.temperature, neg], axis=1)
        return -tf.reduce_sum(tf.nn.log_softmax(logits, axis=1)[:, 0])


class MatrixFactorization(tf.keras.layers.Layer):
    """The baseline: squared error of the inner product on labelled pairs.

    loss = sum_b w_b (<u_b, v_b> - y_b)^2 + l2 sum_b (|u_b|^2 + |v_b|^2), y = 1
    for a click and 0 for an exposure without one (or a sampled unobserved
    item, weight ``batch["weight"]``). Towers must not be L2-normalised.
    """

    inputs = "labelled"

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
    kind = config.kind
    if kind == "in_batch_softmax":
        return InBatchSoftmax(config.temperature, config.logq_correction,
                              config.remove_accidental_hits, config.num_hard_negatives,
                              name="objective")
    if kind == "matrix_factorization":
        return MatrixFactorization(config.l2_regularization, name="objective")
    if kind == "pointwise":
        return Pointwise(config.temperature, name="objective")
    if kind == "pairwise_hinge":
        return PairwiseHinge(config.margin, name="objective")
    if kind == "pairwise_logistic":
        return PairwiseLogistic(config.sigma, name="objective")
    if kind == "listwise":
        return Listwise(config.temperature, config.logq_correction, name="objective")
    raise ValueError(f"objective.kind: unknown objective {kind!r}")
