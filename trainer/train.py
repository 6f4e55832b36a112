"""One training run: data -> split -> adapt towers -> fit -> evaluate -> artifacts.

Writes into the run directory (docs/ARTIFACTS.md): tower SavedModels, the
catalog, metrics, history, report and plot. An interrupted run started again
with the same config and output directory resumes from its last epoch
(Keras BackupAndRestore).
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import tensorflow as tf

from trainer.config import PER_QUERY_OBJECTIVES, RunConfig, dump_config
from trainer.data import Tables, load_tables
from trainer.dataset import EncodedTables, TrainingData
from trainer.history import with_history
from trainer.evaluation import (EvalSet, embedding_scores, evaluate, popularity_scores,
                                split_interactions)
from trainer.frequency import StreamingFrequency
from trainer.model import TwoTowerModel
from trainer.objectives import make_objective
from trainer.saving import save_run_artifacts
from trainer.towers import Tower, embed

log = logging.getLogger(__name__)


@dataclass
class TrainedRun:
    model: TwoTowerModel
    metrics: dict
    history: dict
    output_dir: Path


class ValidationHitRate(tf.keras.callbacks.Callback):
    """Adds ``val_hr@K`` to the epoch logs (for EarlyStopping and the plot)."""

    def __init__(self, encoded: EncodedTables, data: EvalSet, ks=(10, 100)):
        super().__init__()
        self.encoded, self.data, self.ks = encoded, data, ks

    def on_epoch_end(self, epoch, logs=None):
        scores = _model_scores(self.model, self.encoded)
        result = evaluate(scores, self.data, ks=self.ks)
        if logs is not None:
            for k in self.ks:
                logs[f"val_hr@{k}"] = result[f"hr@{k}"]


def _model_scores(model: TwoTowerModel, encoded: EncodedTables):
    user_emb = embed(model.query_tower, encoded.user_features)
    item_emb = embed(model.candidate_tower, encoded.item_features)
    return embedding_scores(user_emb, item_emb)


def _eval_set(encoded: EncodedTables, train_pos: pd.DataFrame,
              test_pos: pd.DataFrame) -> EvalSet:
    su, si = encoded.rows(train_pos)
    tu, ti = encoded.rows(test_pos)
    popularity = np.bincount(si, minlength=len(encoded.item_index)).astype(np.float64)
    return EvalSet(tu, ti, su, si, len(encoded.item_index), popularity)


def build_model(config: RunConfig, users: pd.DataFrame, items: pd.DataFrame,
                train_pos: pd.DataFrame, num_mined: Optional[int] = None) -> TwoTowerModel:
    """Towers adapted on training data: ids see only trained-on users/items.

    Vocabularies of the id features come from the training positives (a new
    item's id is OOV and the item is represented through its other features);
    every other feature adapts on the rows of users/items that appear in them.
    ``num_mined``: hard negatives per positive mined in-graph (default: what
    ``config.sampling`` asks of a per-query objective with hard_source mined).
    """
    train_users = users[users["user_id"].isin(train_pos["user_id"])]
    train_items = items[items["item_id"].isin(train_pos["item_id"])]
    query = Tower(config.features.user, config.model.query_tower, name="query_tower")
    candidate = Tower(config.features.item, config.model.candidate_tower,
                      name="candidate_tower")
    query.adapt(train_users, "users")
    candidate.adapt(train_items, "items")
    if num_mined is None:
        num_mined = _num_mined(config)
    objective = config.objective
    frequency = (StreamingFrequency(**objective.streaming.model_dump(), name="item_frequency")
                 if objective.logq == "streaming" else None)
    model = TwoTowerModel(query, candidate, make_objective(config.objective), num_mined,
                          frequency)
    optimizer = {
        "adam": tf.keras.optimizers.Adam,
        "adagrad": tf.keras.optimizers.Adagrad,
        "sgd": tf.keras.optimizers.SGD,
    }[config.training.optimizer](learning_rate=config.training.learning_rate)
    model.compile(optimizer=optimizer)
    return model


def _epoch_history(csv_path: Path, fitted: dict) -> dict:
    """metric -> per-epoch values of the whole run, resumed parts included
    (an epoch logged twice around a crash keeps its last row)."""
    try:
        table = pd.read_csv(csv_path)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        table = None
    if table is None or table.empty or "epoch" not in table:
        return {k: [float(v) for v in vals] for k, vals in fitted.items()}
    table = table.drop_duplicates("epoch", keep="last").sort_values("epoch")
    return {k: [float(v) for v in table[k]] for k in table.columns if k != "epoch"}


def _num_mined(config: RunConfig) -> int:
    neg = config.sampling.negatives
    if config.objective.kind not in PER_QUERY_OBJECTIVES or neg.hard_source == "ranking_log":
        return 0
    return int(round(neg.hard_fraction * neg.num_negatives))


def train(config: RunConfig, output_dir: str | Path, tables: Optional[Tables] = None,
          verbose: Optional[int] = None,
          extra_callbacks: Sequence[tf.keras.callbacks.Callback] = ()) -> TrainedRun:
    """Run the whole job and write its artifacts; returns model and metrics."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(config), encoding="utf-8")
    tf.keras.utils.set_random_seed(config.training.seed)

    tables = tables if tables is not None else load_tables(config.data)
    ev = config.evaluation
    train_rows, test_rows = split_interactions(
        tables.interactions, ev.protocol, ev.seed, ev.train_fraction, ev.test_days)
    # Retrieval trains on clicks only: exposed-but-not-clicked rows are never
    # retrieval negatives (they stay in the tables for ranking models).
    train_pos = train_rows[train_rows["clicked"] == 1]
    test_pos = test_rows[test_rows["clicked"] == 1]
    val_pos = None
    tc = config.training
    # The test set is scored against the whole train split: validation clicks
    # are the user's known items too (excluded from the ranking, seen.parquet).
    split_pos = train_pos
    if tc.validation_fraction > 0:
        idx = np.random.default_rng(tc.seed).permutation(len(train_pos))
        cut = int(len(train_pos) * (1 - tc.validation_fraction))
        train_pos, val_pos = train_pos.iloc[idx[:cut]], train_pos.iloc[idx[cut:]]

    # A configured history feature is computed from the training clicks only.
    tables = with_history(tables, train_pos, config.features.user)
    encoded = EncodedTables.build(tables.users, tables.items, config.features.user,
                                  config.features.item)
    # Negatives are never one of the user's training interactions, clicked or
    # exposed-not-clicked; only matrix_factorization trains on the y = 0 rows.
    exposed = train_rows[train_rows["clicked"] == 0]
    labelled = pd.concat([train_pos, exposed]) if config.objective.kind == \
        "matrix_factorization" else None
    data = TrainingData(encoded, train_pos, exposed, config, tables.ranking_log, labelled)
    model = build_model(config, tables.users, tables.items, train_pos, data.num_mined)
    ds = data.dataset(tc.batch_size, tc.seed)

    model(next(iter(ds)))  # build variables so BackupAndRestore can restore them all
    # Every finished epoch's logs, across interruptions: a resumed fit only
    # reports the epochs it ran itself.
    history_csv = out / "history.csv"
    if not (out / "backup").exists():
        history_csv.unlink(missing_ok=True)   # a fresh run: nothing to continue
    callbacks = [
        tf.keras.callbacks.BackupAndRestore(str(out / "backup")),
        tf.keras.callbacks.ModelCheckpoint(str(out / "checkpoints" / "epoch-{epoch:03d}"),
                                           save_weights_only=True),
        tf.keras.callbacks.TensorBoard(str(out / "tensorboard"), write_graph=False),
    ]
    if val_pos is not None:
        callbacks.insert(0, ValidationHitRate(encoded, _eval_set(encoded, train_pos, val_pos),
                                              ks=tuple(sorted({10, 100, tc.early_stopping_k}))))
        if tc.early_stopping_patience:
            callbacks.append(tf.keras.callbacks.EarlyStopping(
                tc.early_stopping_metric, mode="max", patience=tc.early_stopping_patience,
                restore_best_weights=True))
    callbacks.append(tf.keras.callbacks.CSVLogger(str(history_csv), append=True))
    callbacks += list(extra_callbacks)
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2
    started = time.perf_counter()
    fit = model.fit(ds, epochs=tc.epochs, callbacks=callbacks, verbose=verbose)
    train_seconds = time.perf_counter() - started

    history = _epoch_history(history_csv, fit.history)
    data = _eval_set(encoded, split_pos, test_pos)
    metrics = {
        "dataset": tables.name,
        "protocol": ev.protocol,
        "train_positives": int(len(train_pos)),
        "train_seconds": round(train_seconds, 2),
        "epochs_run": len(history.get("loss", [])),
        "model": evaluate(_model_scores(model, encoded), data, ev.ks),
        "popularity": evaluate(popularity_scores(data), data, ev.ks),
    }
    save_run_artifacts(out, config, model, tables, split_pos, metrics, history)
    return TrainedRun(model, metrics, history, out)
