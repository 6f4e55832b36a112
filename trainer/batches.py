"""tf.data pipelines of training batches, one shape per objective batch kind.

Feature tables are held once as tensors; the pipeline streams (user row,
item row) index pairs and gathers features per batch, so memory grows with
the tables, not with tables x interactions. What goes into a batch (the
batch kind, how many negatives from where) is decided by
trainer.objective_registry; the samplers are trainer.sampling.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import tensorflow as tf

from trainer import sampling as S
from trainer.config import RunConfig
from trainer.objective_registry import OBJECTIVES
from trainer.prepare import PreparedData
from trainer.user_history import HistoryLeaveOut, history_spec


class TrainingBatches:
    """The tf.data pipeline an objective trains on (docs/TOOLKIT.md).

    Inputs (``PreparedData``) are the retrieval positives (clicked rows only),
    the users' exposed-not-clicked training rows (with the clicks, the
    exclusion set: never negatives), the item click counts and an optional
    ranking log. Batches always hold ``query``, ``candidate``, ``item_prob``
    [B] (the logQ term of in-batch negatives) and ``item_row`` [B]; then, by
    the objective's batch kind:

    - ``in_batch``: with ``extra_candidates`` E > 0, ``extra`` (item
      features [E]), ``candidate_row`` / ``candidate_prob`` [B + E] and a
      ``score_mask`` [B, B + E] that removes the users' own items from the
      extras and their exposed-not-clicked items from the in-batch ones (with
      ``mask_user_positives``, their clicked ones too);
    - ``per_query``: ``negatives`` (item features [B * N_s]),
      ``neg_row`` / ``neg_valid`` / ``neg_logq`` [B, N_s]; for mined hard
      negatives ``pool`` (features of [P] catalog draws) and
      ``pool_excluded`` [B, P] - the model picks the hardest in-graph;
    - ``labelled``: every training row (clicked -> 1, exposed -> 0) plus
      ``unobserved_per_row`` uniform draws per row (label 0), as
      ``label`` / ``weight`` [B'].

    All sampling is TensorFlow ops seeded from ``tf.data.Dataset.random``, so
    a fixed seed gives the same batches.
    """

    def __init__(self, prepared: PreparedData, config: RunConfig):
        encoded, splits = prepared.encoded, prepared.splits
        self.encoded = encoded
        self.config = config
        self.batch_kind = OBJECTIVES[config.objective.kind].batch
        self.plan = prepared.negatives
        neg, pos_cfg = config.sampling.negatives, config.sampling.positives
        num_items = len(encoded.item_index)
        u, i = prepared.train_rows()
        counts = prepared.item_counts
        self.keep = S.subsample_keep_probability(counts, pos_cfg.subsample_threshold)
        self.user_rows, self.item_rows = S.upsample_cold(
            u, i, counts, pos_cfg.upsample_below, pos_cfg.upsample_factor)
        self.item_prob = S.effective_item_probability(
            S.item_counts(self.item_rows, num_items), self.keep)
        self.catalog = S.CatalogSampler(counts, neg.alpha)
        eu, ei = encoded.rows(splits.exposed)
        self.exclusion = S.ExclusionSet(np.concatenate([u, eu]), np.concatenate([i, ei]),
                                        num_items)
        self.exclusion_keys = np.unique(np.concatenate([u, eu]) * num_items
                                        + np.concatenate([i, ei]))
        # A user's exposed-but-not-clicked items are never its in-batch negatives.
        self.exposures = S.ExclusionSet(eu, ei, num_items) if len(eu) else None
        self.ranking_log = None
        if self.plan.hard_source == "ranking_log":
            self.ranking_log = S.RankingLogSampler(
                *self._ranking_log_rows(prepared.tables.ranking_log), len(encoded.user_index))
        spec = history_spec(config.features.user)
        self.history = None
        if spec is not None:  # training targets leave the user's history
            self.history = HistoryLeaveOut(spec, encoded.user_features[spec.name],
                                           np.asarray(encoded.item_index))
        self.labelled = None
        if self.batch_kind == "labelled":
            labelled = splits.labelled
            lu, li = encoded.rows(labelled)
            self.labelled = (lu, li, labelled["clicked"].to_numpy().astype(np.float32))
            self.uniform = S.CatalogSampler(np.ones(num_items), 0.0)

    def _ranking_log_rows(self, ranking_log: pd.DataFrame):
        """Ranking-log pairs as rows; unknown ids and the user's own items dropped."""
        u = self.encoded.user_index.get_indexer(ranking_log["user_id"].astype(str))
        i = self.encoded.item_index.get_indexer(ranking_log["item_id"].astype(str))
        ok = (u >= 0) & (i >= 0)
        u, i = u[ok].astype(np.int64), i[ok].astype(np.int64)
        keys = u * len(self.encoded.item_index) + i
        ok = ~np.isin(keys, self.exclusion_keys)
        return u[ok], i[ok]

    @property
    def num_rows(self) -> int:
        """Rows of one epoch (expected, after hot-item sub-sampling)."""
        if self.labelled is not None:
            return len(self.labelled[0])
        return int(round(float(self.keep[self.item_rows].sum())))

    # ---------------------------------------------------------------- pipeline
    def dataset(self, batch_size: int, seed: int, shuffle: bool = True,
                shard: tuple[int, int] = (1, 0), drop_remainder: bool = False
                ) -> tf.data.Dataset:
        """Batches of ``batch_size``; ``shard`` = (num_shards, index) keeps one
        worker's share of the (shuffled, same seed everywhere) training rows and
        gives its samplers their own seed (trainer.distributed)."""
        num_shards, index = shard
        self._hold_tables(seed)
        if index:   # another worker: the same rows order, its own negatives draws
            seed += 7919 * index
        if self.labelled is not None:
            lu, li, y = self.labelled
            ds = tf.data.Dataset.from_tensor_slices((lu, li, y))
            if shuffle:
                ds = ds.shuffle(len(lu), seed=self._seed, reshuffle_each_iteration=True)
            ds = ds.shard(num_shards, index).batch(batch_size, drop_remainder)
            ds = tf.data.Dataset.zip((ds, self._seeds(seed + 1)))
            ds = ds.map(lambda b, r: self._labelled_batch(*b, r),
                        num_parallel_calls=tf.data.AUTOTUNE)
            return ds.prefetch(tf.data.AUTOTUNE)
        ds = tf.data.Dataset.from_tensor_slices((self.user_rows, self.item_rows))
        if shuffle:
            ds = ds.shuffle(len(self.user_rows), seed=self._seed,
                            reshuffle_each_iteration=True)
        ds = ds.shard(num_shards, index)
        if (self.keep < 1).any():
            keep = tf.constant(self.keep)
            ds = tf.data.Dataset.zip((ds, self._seeds(seed + 2)))
            ds = ds.filter(lambda ui, r: S.stateless_unit(r, seed) < tf.gather(keep, ui[1]))
            ds = ds.map(lambda ui, r: ui)
        ds = ds.batch(batch_size, drop_remainder)
        ds = tf.data.Dataset.zip((ds, self._seeds(seed + 1)))
        ds = ds.map(lambda ui, r: self._batch(ui[0], ui[1], r),
                    num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

    def _hold_tables(self, seed: int) -> None:
        """Feature columns and probabilities as tensors, gathered per batch."""
        t = self.encoded
        self._user_cols = {k: tf.constant(v) for k, v in t.user_features.items()}
        self._item_cols = {k: tf.constant(v) for k, v in t.item_features.items()}
        self._p = tf.constant(self.item_prob)
        self._q = tf.constant(self.catalog.prob.astype(np.float32))
        self._seed = seed

    @staticmethod
    def _seeds(seed: int) -> tf.data.Dataset:
        return tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)

    def _items(self, rows):
        flat = tf.reshape(rows, [-1])
        return {k: tf.gather(v, flat) for k, v in self._item_cols.items()}

    def _users(self, u, i, seed):
        query = {k: tf.gather(v, u) for k, v in self._user_cols.items()}
        if self.history is not None:
            query[self.history.spec.name] = self.history(
                u, i, seed + tf.constant([0, 5], tf.int64))
        return query

    def _batch(self, u, i, r):
        neg = self.config.sampling.negatives
        seed = tf.stack([r, tf.constant(self._seed, tf.int64)])
        out = {
            "query": self._users(u, i, seed),
            "candidate": self._items(i),
            "item_prob": tf.gather(self._p, i),
            "item_row": i,  # integer id: accidental-hit checks compare ints, not strings
        }
        if self.batch_kind == "in_batch":
            out["user_row"] = u   # a global batch recomputes the mask (trainer.global_batch)
            extra = None
            if neg.extra_candidates:
                extra = self.catalog.sample([neg.extra_candidates], seed)
                out["extra"] = self._items(extra)
                out["candidate_row"] = tf.concat([i, extra], 0)
                out["candidate_prob"] = S.mixed_candidate_probability(
                    tf.gather(self._p, i), tf.gather(self._q, i),
                    tf.gather(self._p, extra), tf.gather(self._q, extra), neg.extra_logq)
            mask = self.score_mask(u, i, extra)
            if mask is not None:
                out["score_mask"] = mask
            return out
        # per-query objectives: N_s sampled negatives (+ mined ones in the model)
        plan = self.plan
        rows, valid, logq = [], [], []
        if plan.num_easy:
            r_e, v_e = S.sample_excluding(self.catalog, self.exclusion, u, plan.num_easy,
                                          seed + tf.constant([0, 1], tf.int64))
            rows.append(r_e)
            valid.append(v_e)
            logq.append(tf.math.log(plan.num_easy * tf.gather(self._q, r_e)))
        if plan.hard_source == "ranking_log":
            r_h, has = self.ranking_log.sample(u, plan.num_hard,
                                               seed + tf.constant([0, 2], tf.int64))
            # Users without a logged item fall back to easy catalog draws.
            r_f, v_f = S.sample_excluding(self.catalog, self.exclusion, u, plan.num_hard,
                                          seed + tf.constant([0, 3], tf.int64))
            rows.append(tf.where(has, r_h, r_f))
            valid.append(tf.logical_or(has, v_f))
            logq.append(tf.where(has, 0.0, tf.math.log(plan.num_hard * tf.gather(self._q, r_f))))
        elif plan.hard_source == "mined":
            # distinct items: a popular item drawn twice must not be mined twice
            pool = tf.unique(self.catalog.sample([neg.mining_pool],
                                                 seed + tf.constant([0, 4], tf.int64))).y
            out["pool"] = self._items(pool)
            out["pool_excluded"] = self.exclusion.contains(u[:, None], pool[None, :])
        if rows:
            r_all = tf.concat(rows, 1)
            out["negatives"] = self._items(r_all)
            out["neg_row"] = r_all
            out["neg_valid"] = tf.concat(valid, 1)
            out["neg_logq"] = tf.concat(logq, 1)
        return out

    def score_mask(self, users, items, extra=None):
        """bool [B, C + E] (or None: nothing to mask): query b (user row
        ``users[b]``) may score candidate column j. ``items`` [C] are the in-batch
        candidates, query b's positive at column b (C >= B: a global batch's,
        this replica's first); ``extra`` [E] catalog draws after them. The user's
        own items are masked (exposed-not-clicked ones in-batch; with
        ``mask_user_positives`` or a history feature the clicked ones too, and
        always among the extras), never the positive itself.
        """
        neg = self.config.sampling.negatives
        # With a history feature the mask is always on: the user's other
        # items are in its history but never its left-out target, so as
        # in-batch negatives they would teach "in my history -> dislike".
        # Otherwise only the user's exposed-not-clicked items are masked.
        masked = (self.exclusion if neg.mask_user_positives or self.history is not None
                  else self.exposures)
        b, c = tf.shape(users)[0], tf.shape(items)[0]
        masks = []
        if masked is not None:
            own = masked.contains(users[:, None], items[None, :])
            masks.append(tf.logical_or(tf.logical_not(own), tf.eye(b, c, dtype=tf.bool)))
        if extra is not None:
            if not masks:
                masks.append(tf.ones([b, c], tf.bool))
            masks.append(tf.logical_not(self.exclusion.contains(users[:, None],
                                                                extra[None, :])))
        return tf.concat(masks, axis=1) if masks else None

    def _labelled_batch(self, u, i, y, r):
        k = self.config.objective.unobserved_per_row
        w = tf.ones_like(y)
        if k:
            seed = tf.stack([r, tf.constant(self._seed, tf.int64)])
            neg, valid = S.sample_excluding(self.uniform, self.exclusion, u, k, seed)
            u = tf.concat([u, tf.repeat(u, k)], 0)
            i = tf.concat([i, tf.reshape(neg, [-1])], 0)
            y = tf.concat([y, tf.zeros(tf.shape(neg)[0] * k)], 0)
            w = tf.concat([w, self.config.objective.unobserved_weight
                           * tf.cast(tf.reshape(valid, [-1]), tf.float32)], 0)
        return {
            "query": {k_: tf.gather(v, u) for k_, v in self._user_cols.items()},
            "candidate": self._items(i),
            "item_row": i,
            "label": y,
            "weight": w,
        }
