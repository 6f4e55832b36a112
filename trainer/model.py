"""The two-tower retrieval model: query tower, candidate tower, objective.

A ``tfrs.Model`` so that ``fit`` drives ``compute_loss``. Batches are dicts
(trainer.dataset): ``{"query": {user features}, "candidate": {item
features}, "item_prob": [B], "item_row": [B], ...}`` (item_row: the item's
integer row in the catalog table) plus what the objective needs: extra
candidates, sampled negatives, a mining pool, or labels
(trainer.objectives describes the three input shapes).
"""
from __future__ import annotations

from typing import Optional

import tensorflow as tf
import tensorflow_recommenders as tfrs

from trainer.frequency import StreamingFrequency
from trainer.sampling import mine_hard_negatives
from trainer.towers import Tower


class TwoTowerModel(tfrs.Model):
    def __init__(self, query_tower: Tower, candidate_tower: Tower,
                 objective: tf.keras.layers.Layer, num_mined: int = 0,
                 frequency: Optional[StreamingFrequency] = None, **kwargs):
        super().__init__(**kwargs)
        self.query_tower = query_tower
        self.candidate_tower = candidate_tower
        self.objective = objective
        self.num_mined = num_mined
        self.num_members = query_tower.tower_config.members
        # objective.logq=streaming: each batch's item_prob comes from this estimate
        self.frequency = frequency

    def _per_member(self, loss_fn, *embeddings):
        """Sum of ``loss_fn`` over the ensemble members' slices of each embedding.

        A member's slice is rescaled by sqrt(members) to undo the tower's
        1/sqrt(members), so each member trains on its own (unit) vectors.
        """
        k = self.num_members
        if k == 1:
            return loss_fn(*embeddings)
        parts = [tf.split(e, k, axis=-1) for e in embeddings]
        scale = float(k) ** 0.5
        return tf.add_n([loss_fn(*[p[m] * scale for p in parts]) for m in range(k)])

    def call(self, batch, training=False):
        """(query embeddings [B, d], candidate embeddings [B, d]) for a batch."""
        return (self.query_tower(batch["query"], training=training),
                self.candidate_tower(batch["candidate"], training=training))

    def compute_loss(self, batch, training=False) -> tf.Tensor:
        query, candidate = self(batch, training=training)
        inputs = getattr(self.objective, "inputs", "in_batch")
        if inputs == "in_batch":
            if self.frequency is not None:  # updated with this batch, then read
                batch = dict(batch, item_prob=self.frequency(batch["candidate"]["item_id"],
                                                             training=training))
            if "extra" in batch:  # mixed negative sampling: catalog draws after the batch
                extra = self.candidate_tower(batch["extra"], training=training)
                candidate = tf.concat([candidate, extra], axis=0)
            return self._per_member(
                lambda q, c: self.objective(q, c, batch, training=training), query, candidate)
        if inputs == "labelled":
            return self._per_member(
                lambda q, c: self.objective(q, c, batch, training=training), query, candidate)
        # per-query: sampled negatives [B, N_s, d] (+ mined ones [B, k, d])
        b, d = tf.shape(query)[0], tf.shape(query)[1]
        negs, valid, logq = [], [], []
        if "negatives" in batch:
            emb = self.candidate_tower(batch["negatives"], training=training)
            negs.append(tf.reshape(emb, [b, -1, d]))
            valid.append(tf.cast(batch["neg_valid"], tf.float32))
            logq.append(batch["neg_logq"])
        if "pool" in batch and self.num_mined:
            pool = self.candidate_tower(batch["pool"], training=training)
            mined, ok = mine_hard_negatives(query, pool, batch["pool_excluded"], self.num_mined)
            negs.append(mined)
            valid.append(tf.cast(ok, tf.float32))
            logq.append(tf.zeros_like(valid[-1]))  # hard: no known proposal, no logQ
        batch = dict(batch, neg_valid=tf.concat(valid, 1), neg_logq=tf.concat(logq, 1))
        return self._per_member(
            lambda q, c, n: self.objective(q, c, n, batch, training=training),
            query, candidate, tf.concat(negs, 1))
