"""tf.data pipelines of training positives joined with user and item features.

Feature tables are held once as tensors; the pipeline streams (user row,
item row) index pairs and gathers features per batch, so memory grows with
the tables, not with tables x interactions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import tensorflow as tf

from trainer.towers import features_of


@dataclass
class EncodedTables:
    """User/item feature columns plus id -> row maps."""

    user_features: dict
    item_features: dict
    user_index: pd.Index
    item_index: pd.Index

    @classmethod
    def build(cls, users: pd.DataFrame, items: pd.DataFrame, user_specs, item_specs):
        return cls(features_of(users, user_specs, "users"),
                   features_of(items, item_specs, "items"),
                   pd.Index(users["user_id"].astype(str)),
                   pd.Index(items["item_id"].astype(str)))

    def rows(self, interactions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        u = self.user_index.get_indexer(interactions["user_id"].astype(str))
        i = self.item_index.get_indexer(interactions["item_id"].astype(str))
        if (u < 0).any() or (i < 0).any():
            raise ValueError("interactions reference users/items missing from the tables")
        return u.astype(np.int64), i.astype(np.int64)


def item_sampling_probability(item_rows: np.ndarray, num_items: int) -> np.ndarray:
    """p_i = (clicks on item i) / (all clicks) in the training positives, [num_items].

    Items never clicked get the smallest positive mass so log p stays finite.
    """
    counts = np.bincount(item_rows, minlength=num_items).astype(np.float64)
    counts = np.maximum(counts, 0.5)
    return (counts / counts.sum()).astype(np.float32)


def positives_dataset(tables: EncodedTables, user_rows: np.ndarray, item_rows: np.ndarray,
                      item_prob: np.ndarray, batch_size: int, seed: int,
                      shuffle: bool = True) -> tf.data.Dataset:
    """Batches of {"query", "candidate", "item_prob", "item_row"} for positive pairs."""
    user_cols = {k: tf.constant(v) for k, v in tables.user_features.items()}
    item_cols = {k: tf.constant(v) for k, v in tables.item_features.items()}
    prob = tf.constant(item_prob)

    def gather(u, i):
        return {
            "query": {k: tf.gather(v, u) for k, v in user_cols.items()},
            "candidate": {k: tf.gather(v, i) for k, v in item_cols.items()},
            "item_prob": tf.gather(prob, i),
            "item_row": i,  # integer id: accidental-hit checks compare ints, not strings
        }

    ds = tf.data.Dataset.from_tensor_slices((user_rows, item_rows))
    if shuffle:
        ds = ds.shuffle(len(user_rows), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size, drop_remainder=False).map(
        gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
