"""The two-tower retrieval model: query tower, candidate tower, objective.

A ``tfrs.Model`` so that ``fit`` drives ``compute_loss``. Batches are dicts:
``{"query": {user features}, "candidate": {item features}, "item_prob": [B],
"item_row": [B]}`` (item_row: the item's integer row in the catalog table).
"""
from __future__ import annotations

import tensorflow as tf
import tensorflow_recommenders as tfrs

from trainer.towers import Tower


class TwoTowerModel(tfrs.Model):
    def __init__(self, query_tower: Tower, candidate_tower: Tower,
                 objective: tf.keras.layers.Layer, **kwargs):
        super().__init__(**kwargs)
        self.query_tower = query_tower
        self.candidate_tower = candidate_tower
        self.objective = objective

    def call(self, batch, training=False):
        """(query embeddings [B, d], candidate embeddings [B, d]) for a batch."""
        return (self.query_tower(batch["query"], training=training),
                self.candidate_tower(batch["candidate"], training=training))

    def compute_loss(self, batch, training=False) -> tf.Tensor:
        query, candidate = self(batch, training=training)
        return self.objective(query, candidate, batch, training=training)
