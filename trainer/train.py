"""One training run in named steps: prepare -> build -> fit -> evaluate -> save.

``train()`` chains them; model updates and tests call the same steps.
Everything is written into a staging directory and committed to the run
directory only when the run finished (trainer.run_dir, docs/ARTIFACTS.md):
tower SavedModels, the catalog, metrics, history, report and plot. An
interrupted run started again with the same config and output directory
resumes from its last epoch (Keras BackupAndRestore) and logs so.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd
import tensorflow as tf

from trainer import run_dir
from trainer.batches import TrainingBatches
from trainer.config import RunConfig, dump_config, streamed
from trainer.data import Tables, load_tables
from trainer.distributed import Distribution
from trainer.ease import fit_ease
from trainer.evaluation import EvalSet, embedding_scores, evaluate, popularity_scores
from trainer.frequency import StreamingFrequency
from trainer.model import TwoTowerModel
from trainer.objective_registry import OBJECTIVES, check_distributed
from trainer.objectives import make_objective
from trainer.prepare import EncodedTables, PreparedData, prepare_data
from trainer.saving import save_run_artifacts
from trainer.streaming import StreamedData, StreamingBatches, prepare_streamed
from trainer.towers import Tower, TowerEmbedder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitResult:
    history: dict                 # metric -> per-epoch values, resumed epochs included
    train_seconds: float          # this fit only
    resumed_after_epoch: int      # epochs restored from a backup (0: a fresh start)


@dataclass(frozen=True)
class Evaluation:
    model: dict                   # metrics of the two towers (trainer.evaluation)
    popularity: dict              # the most-popular baseline on the same test set


@dataclass(frozen=True)
class TrainingResult:
    """What ``train()`` returns; the run on disk is read by export.run_artifacts."""

    model: TwoTowerModel
    metrics: dict
    history: dict
    output_dir: Path


def model_scores(model: TwoTowerModel, encoded: EncodedTables):
    """score_fn(user rows) -> [n, num_items] dot products of the towers."""
    user_emb = TowerEmbedder(model.query_tower)(encoded.user_features)
    item_emb = TowerEmbedder(model.candidate_tower)(encoded.item_features)
    return embedding_scores(user_emb, item_emb)


class ValidationHitRate(tf.keras.callbacks.Callback):
    """Adds ``val_hr@K`` to the epoch logs (for EarlyStopping and the plot)."""

    def __init__(self, encoded: EncodedTables, data: EvalSet, ks=(10, 100)):
        super().__init__()
        self.encoded, self.data, self.ks = encoded, data, ks
        self._embedders = None

    def on_epoch_end(self, epoch, logs=None):
        if self._embedders is None:   # traced once, reused every epoch
            self._embedders = (TowerEmbedder(self.model.query_tower),
                               TowerEmbedder(self.model.candidate_tower))
        users, items = self._embedders
        scores = embedding_scores(users(self.encoded.user_features),
                                  items(self.encoded.item_features))
        result = evaluate(scores, self.data, ks=self.ks)
        if logs is not None:
            for k in self.ks:
                logs[f"val_hr@{k}"] = result[f"hr@{k}"]


class _ResumeLog(tf.keras.callbacks.Callback):
    """Logs (and keeps) the epoch a fit restored by BackupAndRestore starts at."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs, self.resumed_after = epochs, 0
        self._first = True

    def on_epoch_begin(self, epoch, logs=None):
        if self._first and epoch > 0:
            self.resumed_after = epoch
            log.warning("resumed an interrupted training: epochs 1-%d restored from its "
                        "backup, continuing with epoch %d of %d", epoch, epoch + 1,
                        self.epochs)
        self._first = False


def has_backup(out: Path) -> bool:
    """Whether ``out/backup`` holds a BackupAndRestore checkpoint to resume from
    (a finished fit leaves the directory empty)."""
    backup = out / "backup"
    return backup.is_dir() and any(backup.iterdir())


def build_model(config: RunConfig, prepared: PreparedData) -> TwoTowerModel:
    """Towers adapted on training data: ids see only trained-on users/items.

    Vocabularies of the id features come from the training positives (a new
    item's id is OOV and the item is represented through its other features);
    every other feature adapts on the rows of users/items that appear in them.
    """
    train_users, train_items = prepared.trained_users(), prepared.trained_items()
    candidate = Tower(config.features.item, config.model.candidate_tower,
                      name="candidate_tower")
    query = Tower(config.features.user, config.model.query_tower, name="query_tower",
                  item_encoder=None if candidate.members else candidate.encoders["item_id"])
    query.adapt(train_users, "users")
    candidate.adapt(train_items, "items")
    objective = config.objective
    frequency = (StreamingFrequency(**objective.streaming.model_dump(), name="item_frequency")
                 if objective.logq == "streaming" else None)
    model = TwoTowerModel(query, candidate, make_objective(objective),
                          OBJECTIVES[objective.kind].batch, prepared.negatives.num_mined,
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


def fit(model: TwoTowerModel, prepared: PreparedData, config: RunConfig, out: Path,
        verbose: Optional[int] = None,
        extra_callbacks: Sequence[tf.keras.callbacks.Callback] = (),
        distribution: Optional[Distribution] = None, resumable: bool = True) -> FitResult:
    """Fit on the prepared batches, with backup / checkpoints / logs under ``out``.

    A backup in ``out/backup`` (an interrupted fit) is resumed from; under a
    strategy (trainer.distributed) the input is the strategy's and the backup
    the chief's. ``resumable=False``: no backup is kept, for a fit whose run
    directory is never resumed (a model update starts over).
    """
    tc = config.training
    dist = distribution or Distribution()
    batches = (StreamingBatches(prepared, config) if isinstance(prepared, StreamedData)
               else TrainingBatches(prepared, config))
    data = dist.fit_input(batches, tc.batch_size, tc.seed)
    ds = batches.dataset(tc.batch_size, tc.seed) if data is None else data.dataset
    if not model.built:   # make the variables so BackupAndRestore can restore them all
        with dist.scope():
            model(next(iter(ds)) if data is None else data.sample)
    dist.prepare_model(model, batches)
    backup = dist.backup_dir(out)
    # Every finished epoch's logs, across interruptions: a resumed fit only
    # reports the epochs it ran itself.
    history_csv = out / "history.csv"
    if not has_backup(out):
        history_csv.unlink(missing_ok=True)   # a fresh run: nothing to continue
    resume = _ResumeLog(tc.epochs)
    callbacks = [
        *([tf.keras.callbacks.BackupAndRestore(str(backup))] if resumable else []),
        resume,
        tf.keras.callbacks.ModelCheckpoint(str(out / "checkpoints" / "epoch-{epoch:03d}"),
                                           save_weights_only=True),
        tf.keras.callbacks.TensorBoard(str(out / "tensorboard"), write_graph=False),
    ]
    validation = prepared.validation_set()
    if validation is not None:
        callbacks.insert(0, ValidationHitRate(prepared.encoded, validation,
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
    fitted = model.fit(ds, epochs=tc.epochs, callbacks=callbacks, verbose=verbose,
                       steps_per_epoch=None if data is None else data.steps_per_epoch)
    if dist.is_chief and (out / "backup").is_dir() and not has_backup(out):
        (out / "backup").rmdir()   # a finished fit: Keras emptied it
    return FitResult(_epoch_history(history_csv, fitted.history),
                     time.perf_counter() - started, resume.resumed_after)


def evaluate_model(model: TwoTowerModel, prepared: PreparedData,
                   ks: Sequence[int]) -> Evaluation:
    """Exact full-catalog top-K of the towers and of the popularity baseline."""
    test = prepared.test_set()
    return Evaluation(evaluate(model_scores(model, prepared.encoded), test, ks),
                      evaluate(popularity_scores(test), test, ks))


def ease_reference(config: RunConfig, prepared: PreparedData) -> dict:
    """EASE on the test split, its L2 chosen on the validation split
    (trainer.ease); {"skipped": why} above ``evaluation.ease_max_items``."""
    ev = config.evaluation
    test = prepared.test_set()
    k = max(ev.ks)
    fitted = fit_ease(test, len(prepared.encoded.user_index),
                      prepared.reference_validation_set(config), ev.ease_l2, k,
                      ev.ease_max_items)
    if fitted.skipped:
        log.info("%s", fitted.skipped)
        return {"skipped": fitted.skipped}
    return {**evaluate(fitted.score_fn, test, ev.ks), "l2": fitted.l2,
            "validation": {f"{l2:g}": hr for l2, hr in fitted.validation.items()},
            "selection_metric": f"validation {fitted.selection_metric}",
            "seconds": fitted.seconds}


def run_metrics(config: RunConfig, prepared: PreparedData, fitted: FitResult,
                evaluation: Evaluation, ease: Optional[dict] = None) -> dict:
    """metrics.json of a run (docs/ARTIFACTS.md)."""
    return {
        "dataset": prepared.tables.name,
        "protocol": config.evaluation.protocol,
        "train_positives": prepared.num_train_positives,
        "train_seconds": round(fitted.train_seconds, 2),
        "epochs_run": len(fitted.history.get("loss", [])),
        "model": evaluation.model,
        "popularity": evaluation.popularity,
        **({} if ease is None else {"ease": ease}),
        "validation": ({} if prepared.splits.validation is None else
                       {k: v[-1] for k, v in fitted.history.items() if k.startswith("val_")}),
    }


def train(config: RunConfig, output_dir: str | Path, tables: Optional[Tables] = None,
          verbose: Optional[int] = None,
          extra_callbacks: Sequence[tf.keras.callbacks.Callback] = (),
          distribution: Optional[Distribution] = None) -> TrainingResult:
    """Run the whole job and commit its run directory; returns model and metrics.

    ``distribution`` (trainer.distributed): the strategy and this task's role;
    only the chief commits the run directory, other tasks write a temporary one.
    """
    out = Path(output_dir)
    dist = distribution or Distribution()
    if dist.strategy is not None:
        check_distributed(config, dist.kind)
    staging = dist.staging(out, resumable=has_backup)
    (staging / run_dir.RUN_MARKER).write_text(dump_config(config), encoding="utf-8")
    tf.keras.utils.set_random_seed(config.training.seed)

    if streamed(config.data):
        prepared = prepare_streamed(config)
    else:
        prepared = prepare_data(config, tables if tables is not None
                                else load_tables(config.data))
    with dist.scope():
        model = build_model(config, prepared)
    fitted = fit(model, prepared, config, staging, verbose, extra_callbacks, dist)
    # EASE is a reference for the report, which only the chief writes
    ease = ease_reference(config, prepared) if config.evaluation.ease and dist.is_chief \
        else None
    metrics = run_metrics(config, prepared, fitted,
                          evaluate_model(model, prepared, config.evaluation.ks), ease)
    save_run_artifacts(staging, config, model, prepared.tables, prepared.seen_clicks(),
                       metrics, fitted.history)
    dist.finish(out, staging)
    return TrainingResult(model, metrics, fitted.history, out)
