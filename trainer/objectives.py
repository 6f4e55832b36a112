"""Training objectives: (query emb [B, d], candidate emb [B, d], batch) -> loss.

``InBatchSoftmax`` is the default: TFRS Retrieval's in-batch sampled softmax.
Each query's negatives are the other positives in its batch; since an item
appears in batches in proportion to its popularity p_i, its logit is corrected
by -log p_i (logQ) so popular items are not over-punished as negatives.
"""
from __future__ import annotations

import tensorflow as tf
import tensorflow_recommenders as tfrs

from trainer.config import ObjectiveConfig


class InBatchSoftmax(tf.keras.layers.Layer):
    """TFRS Retrieval task with temperature, logQ and accidental-hit removal."""

    def __init__(self, temperature: float = 0.2, logq_correction: bool = True,
                 remove_accidental_hits: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.logq_correction = logq_correction
        self.remove_accidental_hits = remove_accidental_hits
        self.task = tfrs.tasks.Retrieval(
            metrics=None, temperature=temperature,
            remove_accidental_hits=remove_accidental_hits)

    def call(self, query, candidate, batch, training=False):
        return self.task(
            query, candidate,
            candidate_sampling_probability=(batch["item_prob"] if self.logq_correction
                                            else None),
            candidate_ids=batch["item_row"] if self.remove_accidental_hits else None,
            compute_metrics=False, compute_batch_metrics=False)


def make_objective(config: ObjectiveConfig) -> tf.keras.layers.Layer:
    if config.kind == "in_batch_softmax":
        return InBatchSoftmax(config.temperature, config.logq_correction,
                              config.remove_accidental_hits, name="objective")
    raise ValueError(f"objective.kind: unknown objective {config.kind!r}")
