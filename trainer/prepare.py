"""Step 1 of a training run: tables -> splits -> encoded tables and frequencies.

``prepare_data(config, tables)`` is what training, updates and tests all
call to get the data a model trains and is evaluated on; nothing here builds
or fits a model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

from trainer.config import RunConfig
from trainer.data import Tables
from trainer.evaluation import EvalSet, split_interactions
from trainer.objective_registry import NegativesPlan, plan_negatives
from trainer.sampling import item_counts
from trainer.towers import features_of
from trainer.user_history import with_history


@dataclass(frozen=True)
class EncodedTables:
    """User/item feature columns (the towers' raw inputs) plus id -> row maps."""

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

    def eval_set(self, known: pd.DataFrame, test: pd.DataFrame) -> EvalSet:
        """Test pairs ``test`` ranked with each user's ``known`` clicks excluded;
        popularity = clicks per item in ``known``."""
        su, si = self.rows(known)
        tu, ti = self.rows(test)
        return EvalSet(tu, ti, su, si, len(self.item_index),
                       item_counts(si, len(self.item_index)))


@dataclass(frozen=True)
class Splits:
    """The interactions of one run, by role. Retrieval trains on clicks only:
    exposed-but-not-clicked rows are never retrieval negatives (they stay in
    the tables for ranking models and for matrix factorization's y = 0)."""

    train_positives: pd.DataFrame   # the clicks the model trains on
    validation: Optional[pd.DataFrame]   # clicks held out for val_hr@K, or None
    test: pd.DataFrame              # clicked test rows
    known: pd.DataFrame             # every train-split click: excluded at test, seen.parquet
    exposed: pd.DataFrame           # train-split rows without a click

    @property
    def labelled(self) -> pd.DataFrame:
        """Clicks (y = 1) and exposures (y = 0) of the train split, in that order."""
        return pd.concat([self.train_positives, self.exposed])


def split_data(config: RunConfig, tables: Tables) -> Splits:
    """The evaluation protocol's train/test split, then the validation cut."""
    ev, tc = config.evaluation, config.training
    train_rows, test_rows = split_interactions(
        tables.interactions, ev.protocol, ev.seed, ev.train_fraction, ev.test_days)
    train_pos = train_rows[train_rows["clicked"] == 1]
    # The test set is scored against the whole train split: validation clicks
    # are the user's known items too (excluded from the ranking, seen.parquet).
    known, val_pos = train_pos, None
    if tc.validation_fraction or tc.validation_days:
        train_pos, val_pos = validation_cut(config, train_pos, tc.validation_fraction,
                                            tc.validation_days)
    return Splits(train_pos, val_pos, test_rows[test_rows["clicked"] == 1], known,
                  train_rows[train_rows["clicked"] == 0])


def validation_cut(config: RunConfig, train_pos: pd.DataFrame, fraction: float,
                   days: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(fit clicks, validation clicks) cut from the training clicks by the rule
    of the test split: random protocols hold out a ``fraction`` drawn with
    ``training.seed``; the temporal protocol the last ``days`` days of the
    training part (the days just before the test days)."""
    if config.evaluation.protocol == "temporal":
        try:
            return split_interactions(train_pos, "temporal", test_days=days)
        except ValueError:
            raise ValueError(f"training.validation_days={days} leaves no training or no "
                             "validation clicks before the test days") from None
    idx = np.random.default_rng(config.training.seed).permutation(len(train_pos))
    cut = int(len(train_pos) * (1 - fraction))
    return train_pos.iloc[idx[:cut]], train_pos.iloc[idx[cut:]]


@dataclass(frozen=True)
class PreparedData:
    """Everything a run trains and evaluates on.

    ``tables``: the loaded tables, the users table with the history column if
    one is configured (computed from the training clicks only);
    ``item_counts`` [num_items]: training clicks per item row (the
    frequencies behind logQ and popularity sampling); ``negatives``: the
    objective's negatives plan for this data (trainer.objective_registry).
    """

    tables: Tables
    splits: Splits
    encoded: EncodedTables
    item_counts: np.ndarray
    negatives: NegativesPlan

    def train_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(user rows, item rows) [n] of the training positives."""
        return self.encoded.rows(self.splits.train_positives)

    @property
    def num_train_positives(self) -> int:
        return len(self.splits.train_positives)

    def trained_users(self) -> pd.DataFrame:
        """The users table's rows (in table order) with a training click."""
        users = self.tables.users
        return users[users["user_id"].isin(self.splits.train_positives["user_id"])]

    def trained_items(self) -> pd.DataFrame:
        """The items table's rows (in table order) with a training click."""
        items = self.tables.items
        return items[items["item_id"].isin(self.splits.train_positives["item_id"])]

    def seen_clicks(self) -> pd.DataFrame:
        """Every train-split click (seen.parquet; trainer.streaming: in blocks)."""
        return self.splits.known

    def validation_set(self) -> Optional[EvalSet]:
        s = self.splits
        return None if s.validation is None else self.encoded.eval_set(s.train_positives,
                                                                       s.validation)

    def test_set(self) -> EvalSet:
        return self.encoded.eval_set(self.splits.known, self.splits.test)

    def reference_validation_set(self, config: RunConfig) -> EvalSet:
        """The validation split reference models choose their settings on: the
        run's own, or (when the run has none) a default cut of the training
        clicks by the same rule (10 %, or the last ``test_days`` days)."""
        if self.splits.validation is not None:
            return self.validation_set()
        fit, val = validation_cut(config, self.splits.known, 0.1,
                                  config.evaluation.test_days)
        return self.encoded.eval_set(fit, val)


def prepare_data(config: RunConfig, tables: Tables,
                 earlier_clicks: Optional[pd.DataFrame] = None) -> PreparedData:
    """``earlier_clicks``: clicks before ``tables``' window (an update's data
    since the lineage began), which a history feature reads as training and
    serving do but nothing trains on; None for a run on all its data."""
    splits = split_data(config, tables)
    history_clicks = splits.train_positives
    if earlier_clicks is not None and len(earlier_clicks):
        history_clicks = pd.concat([earlier_clicks, history_clicks], ignore_index=True)
    tables = with_history(tables, history_clicks, config.features.user)
    encoded = EncodedTables.build(tables.users, tables.items, config.features.user,
                                  config.features.item)
    _, items = encoded.rows(splits.train_positives)
    log = tables.ranking_log
    plan = plan_negatives(config.objective.kind, config.sampling.negatives,
                          log is not None and len(log) > 0)
    return PreparedData(tables, splits, encoded, item_counts(items, len(encoded.item_index)),
                        plan)
