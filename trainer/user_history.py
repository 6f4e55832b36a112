"""The user-history feature: a user's past clicked items as a query-tower input.

``with_history`` adds the column to the users table from the training
clicks (never from test rows). ``HistoryLeaveOut`` is the training-time
guard against leakage: for a positive (user, item) it rebuilds the user's
history string without that very item (and, with dropout, without a random
share of the others), all as vectorised string ops on the batch.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import pandas as pd
import tensorflow as tf

from trainer.config import HistoryFeature


def history_spec(user_specs) -> Optional[HistoryFeature]:
    return next((s for s in user_specs if isinstance(s, HistoryFeature)), None)


def with_history(tables, train_pos: pd.DataFrame, user_specs):
    """``tables`` with the users table extended by the history column (if configured).

    The history is the user's last ``max_items`` training clicks in time order,
    joined by the separator; users without clicks get "" (an empty history).
    """
    spec = history_spec(user_specs)
    if spec is None:
        return tables
    ordered = train_pos.sort_values("timestamp", kind="stable")
    joined = ordered.groupby("user_id", sort=False)["item_id"].agg(
        lambda s: spec.separator.join(s.astype(str).tolist()[-spec.max_items:]))
    users = tables.users.copy()
    users[spec.name] = users["user_id"].astype(str).map(joined).fillna("")
    return dataclasses.replace(tables, users=users)


class HistoryLeaveOut:
    """Rebuilds history strings without the training target, in-graph.

    ``histories`` [num_users] strings (the users table column) are split once
    into a ragged [num_users, None] tensor; ``__call__(users [B], items [B],
    seed)`` returns [B] strings: row u's items except ``item_ids[items]``, each
    other item also dropped with probability ``dropout``.
    """

    def __init__(self, spec: HistoryFeature, histories: np.ndarray, item_ids: np.ndarray):
        self.spec = spec
        lists = [h.split(spec.separator) if h else [] for h in histories]
        self._ragged = tf.RaggedTensor.from_row_lengths(
            tf.constant(np.asarray([x for lst in lists for x in lst], dtype=object).astype(str)
                        if any(lists) else np.zeros(0, dtype=str), tf.string),
            tf.constant([len(lst) for lst in lists], tf.int64))
        self._item_ids = tf.constant(np.asarray(item_ids).astype(str), tf.string)

    def __call__(self, users, items, seed) -> tf.Tensor:
        h = tf.gather(self._ragged, users)
        rowids = h.value_rowids()
        target = tf.gather(tf.gather(self._item_ids, items), rowids)
        keep = tf.not_equal(h.flat_values, target)
        if self.spec.dropout > 0:
            u = tf.random.stateless_uniform(tf.shape(h.flat_values), seed)
            keep = tf.logical_and(keep, u >= self.spec.dropout)
        kept = tf.RaggedTensor.from_value_rowids(
            tf.boolean_mask(h.flat_values, keep), tf.boolean_mask(rowids, keep),
            nrows=tf.shape(users, out_type=tf.int64)[0])
        return tf.strings.reduce_join(kept, axis=1, separator=self.spec.separator)
