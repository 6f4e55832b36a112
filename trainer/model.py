"""The two-tower retrieval model: query tower, candidate tower, objective.

A ``tfrs.Model`` so that ``fit`` drives ``compute_loss``. Batches are dicts
(trainer.batches): ``{"query": {user features}, "candidate": {item
features}, "item_prob": [B], "item_row": [B], ...}`` (item_row: the item's
integer row in the catalog table) plus what the objective's batch kind needs
(trainer.objective_registry): extra candidates, sampled negatives, a mining
pool, or labels (trainer.objectives describes the three input shapes).
"""
from __future__ import annotations

from typing import Optional

import tensorflow as tf
import tensorflow_recommenders as tfrs

from trainer.frequency import StreamingFrequency
from trainer.objective_registry import BatchKind
from trainer.sampling import mine_hard_negatives
from trainer.towers import Tower


@tf.keras.utils.register_keras_serializable(package="trainer")
class TwoTowerModel(tfrs.Model):
    """``batch``: the objective's batch kind; ``num_mined``: hard negatives per
    positive mined in-graph from a per-query batch's ``pool``."""

    def __init__(self, query_tower: Tower, candidate_tower: Tower,
                 objective: tf.keras.layers.Layer, batch: BatchKind = "in_batch",
                 num_mined: int = 0, frequency: Optional[StreamingFrequency] = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.query_tower = query_tower
        self.candidate_tower = candidate_tower
        self.objective = objective
        self.batch = batch
        self.num_mined = num_mined
        self.num_members = query_tower.tower_config.members
        # objective.logq=streaming: each in-batch batch's item_prob comes from this estimate
        self.frequency = frequency
        # under a synchronous strategy: the in-batch softmax over the global batch
        self.global_candidates = None
        if batch not in ("in_batch", "labelled", "per_query"):
            raise ValueError(f"TwoTowerModel: unknown batch kind {batch!r}")
        if frequency is not None and batch != "in_batch":
            raise ValueError("TwoTowerModel: a streaming frequency estimate needs in-batch "
                             f"batches, not {batch!r}")

    def get_config(self) -> dict:
        return {"name": self.name, "query_tower": self.query_tower.get_config(),
                "candidate_tower": self.candidate_tower.get_config(),
                "objective": tf.keras.layers.serialize(self.objective),
                "batch": self.batch, "num_mined": self.num_mined,
                "frequency": (None if self.frequency is None
                              else tf.keras.layers.serialize(self.frequency))}

    @classmethod
    def from_config(cls, config: dict, custom_objects=None) -> "TwoTowerModel":
        frequency = config.get("frequency")
        candidate = Tower.from_config(config["candidate_tower"])
        return cls(Tower.from_config(config["query_tower"],
                                     item_encoder=candidate.encoders.get("item_id")),
                   candidate,
                   tf.keras.layers.deserialize(config["objective"], custom_objects),
                   config["batch"], config["num_mined"],
                   None if frequency is None else
                   tf.keras.layers.deserialize(frequency, custom_objects),
                   name=config["name"])

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
        return getattr(self, f"_{self.batch}_loss")(batch, query, candidate, training)

    def _labelled_loss(self, batch, query, candidate, training):
        return self._per_member(
            lambda q, c: self.objective(q, c, batch, training=training), query, candidate)

    def _in_batch_loss(self, batch, query, candidate, training):
        if self.frequency is not None:  # updated with this batch, then read
            batch = dict(batch, item_prob=self.frequency(batch["candidate"]["item_id"],
                                                         training=training))
        extra = None
        if "extra" in batch:  # mixed negative sampling: catalog draws after the batch
            extra = self.candidate_tower(batch["extra"], training=training)
        if self.global_candidates is not None:   # trainer.global_batch (tf.distribute)
            candidate, batch = self.global_candidates(batch, candidate, extra)
        elif extra is not None:
            candidate = tf.concat([candidate, extra], axis=0)
        return self._labelled_loss(batch, query, candidate, training)

    def _per_query_loss(self, batch, query, candidate, training):
        """Sampled negatives [B, N_s, d] (+ mined ones [B, k, d]) per query."""
        b, d = tf.shape(query)[0], tf.shape(query)[1]
        negs, valid, logq = [], [], []
        if "negatives" in batch:
            emb = self.candidate_tower(batch["negatives"], training=training)
            negs.append(tf.reshape(emb, [b, -1, d]))
            valid.append(tf.cast(batch["neg_valid"], tf.float32))
            logq.append(batch["neg_logq"])
        if self.num_mined:
            pool = self.candidate_tower(batch["pool"], training=training)
            mined, ok = mine_hard_negatives(query, pool, batch["pool_excluded"], self.num_mined)
            negs.append(mined)
            valid.append(tf.cast(ok, tf.float32))
            logq.append(tf.zeros_like(valid[-1]))  # hard: no known proposal, no logQ
        batch = dict(batch, neg_valid=tf.concat(valid, 1), neg_logq=tf.concat(logq, 1))
        return self._per_member(
            lambda q, c, n: self.objective(q, c, n, batch, training=training),
            query, candidate, tf.concat(negs, 1))
