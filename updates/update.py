"""One model update, end to end: restore -> grow -> train -> gate -> publish.

    latest published run (lineage) ─▶ its model + optimizer (model_state)
    ─▶ window of new data ─▶ id vocabularies grown (vocabulary) ─▶ fit one
    epoch: every weight (full) or only the id tables, each row moved only
    when its id is in a batch (incremental)
    ─▶ gate on the window's newest slice vs the served version (gate)
    ─▶ run committed ─▶ next served version (publish: a full update rebuilds
    and re-tunes the ScaNN index, an incremental one refreshes the served
    index) ─▶ pruned

A killed update leaves a staging run directory (removed by the next one)
and, at worst, a cut publish (repaired by the next one); the served version
only changes through export's atomic publish.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

import pandas as pd
import tensorflow as tf
import yaml

from trainer import run_dir as run_dirs
from trainer.batches import TrainingBatches
from trainer.config import (ObjectiveConfig, RunConfig, resolve_paths, deep_merge, dump_config,
                            load_config, parse_config)
from trainer.data import DataError, load_tables
from trainer.data.tables import ensure_entity_table
from trainer.data.windows import cut_window, describe_window
from trainer.objective_registry import OBJECTIVES
from trainer.objectives import make_objective
from trainer.prepare import prepare_data
from trainer.saving import save_run_artifacts
from trainer.train import evaluate_model, fit, run_metrics
from updates import gate as gates
from updates.lineage import (PUBLISHED_FILE, UPDATE_FILE, latest_run, next_run_dir,
                             read_update, update_lock, write_json_atomic)
from updates.model_state import (configured_optimizer, freeze_all_but_ids, id_encoders,
                                 restore_model, set_vocabularies, unfreeze)
from updates.publish import (PublishOptions, describe_index, prune, publish_run,
                             repair_cut_publish)
from updates.vocabulary import IdStats, plan_vocabulary

log = logging.getLogger(__name__)
Kind = Literal["full", "incremental"]
_DAY = 86400
_ID_COLUMNS = {"user_id": "user_id", "item_id": "item_id"}


class UpdateError(ValueError):
    """An update that cannot run (no data, bad input); nothing was published."""


class GateRefused(RuntimeError):
    """The candidate is worse than the served version by more than the margin."""

    def __init__(self, result: gates.GateResult, run: Path):
        super().__init__(f"{result.describe()}; not published (candidate kept in {run})")
        self.result = result


@dataclass
class UpdateOptions:
    config: Optional[Path] = None         # partial YAML merged over the parent's config
    data_path: Optional[str] = None       # data.path for kinds that read files
    until: Optional[int] = None           # window end (default: the end of the data)
    window_seconds: Optional[int] = None  # default: full 1 day, incremental since the parent
    epochs: int = 1
    holdout: float = 0.1                  # newest share of the window held out for the gate
    gate_k: int = 10
    gate_margin: float = 0.05
    min_count: int = 1
    expire_days: Optional[float] = None
    publish: PublishOptions = field(default_factory=PublishOptions)
    rebuild_index: bool = False           # incremental: rebuild the index instead of refreshing
    # a window of at most this many training steps trains eagerly: tracing the
    # train step (~1 s for these towers) costs more than a few eager steps
    eager_max_steps: int = 4
    verbose: int = 0
    tables: Optional[object] = None       # the whole data, already loaded (benchmarks)
    # False: the run keeps its model state but no tower SavedModels (nor the
    # report's plot), so it can be updated but never exported (replays that score
    # it in memory); run_update exports
    servable: bool = True


@dataclass
class UpdateResult:
    run: Path
    version: int
    gate: gates.GateResult
    seconds: dict                         # prepare / train / gate / save / export / publish
    vocabulary: dict                      # feature -> {"admitted", "expired", "reused", "rows"}
    index: str = ""                       # how the retrieval index was made (describe_index)


def _config(parent: Path, options: UpdateOptions) -> RunConfig:
    """The parent's config with ``--config`` merged over it (a data section of
    another kind replaces the parent's instead of merging into it)."""
    raw = yaml.safe_load((parent / "config.yaml").read_text())
    # A run config written before logq_weight existed trained with weight 1; the
    # lineage keeps it (an unset weight now means 1.25) unless --config says otherwise.
    raw.setdefault("objective", {}).setdefault("logq_weight", 1.0)
    parent_kind = raw["objective"].get("kind", ObjectiveConfig().kind)
    if options.config:
        over = yaml.safe_load(Path(options.config).read_text()) or {}
        if over.get("data", {}).get("kind", raw["data"]["kind"]) != raw["data"]["kind"]:
            raw["data"] = {}
        raw = deep_merge(raw, over)
    config = parse_config(raw, f"{parent / 'config.yaml'} + {options.config}")
    if OBJECTIVES[config.objective.kind].batch != OBJECTIVES[parent_kind].batch:
        raise UpdateError(f"{options.config}: objective.kind={config.objective.kind} trains "
                          f"on other batches than the parent run's {parent_kind}; an update "
                          "cannot change that: train a new run")
    if options.config:   # relative data paths are relative to the file that names them
        config = resolve_paths(config, Path(options.config).parent)
    if options.data_path:
        if not hasattr(config.data, "path"):
            raise UpdateError(f"--data given but data.kind={config.data.kind} reads no path")
        config.data.path = str(Path(options.data_path).resolve())
    return config


def _parent_end(parent: Path, config: RunConfig) -> int:
    """Where the parent's data window ended (new data starts here)."""
    update = read_update(parent)
    if update is not None:
        return int(update["window"]["until"])
    return config.data.until if config.data.until is not None else _trained_until(parent)


def _trained_until(parent: Path) -> int:
    """The end of what the parent trained on (its held-out slice starts here)."""
    update = read_update(parent)
    if update is not None:
        return int(update["trained_until"])
    return int(pd.read_parquet(parent / "seen.parquet")["timestamp"].max()) + 1


def _window(config: RunConfig, parent: Path, kind: Kind, options: UpdateOptions):
    """(tables of the window, the clicks before it, since, until); errors name
    the window or the file. The earlier clicks feed a history feature only."""
    data = config.data.model_copy(update={"since": None, "until": None})
    try:
        everything = options.tables if options.tables is not None else load_tables(data)
    except (DataError, OSError) as err:
        raise UpdateError(f"cannot read the update's data: {err}") from err
    ts = everything.interactions["timestamp"]
    until = options.until if options.until is not None else int(ts.max()) + 1
    parent_end = _parent_end(parent, load_config(parent / "config.yaml"))
    if options.window_seconds is not None:
        since = until - options.window_seconds
    elif kind == "full":
        since = until - _DAY
    else:   # incremental: everything after what the parent trained on
        since = _trained_until(parent)
    try:
        tables = cut_window(everything, since, until)
    except DataError as err:
        raise UpdateError(str(err)) from err
    if until <= parent_end or not ((ts >= max(since, parent_end)) & (ts < until)).any():
        raise UpdateError(f"data window {describe_window(since, until)} holds no data newer "
                          f"than the parent run {parent}, whose data ends at {parent_end} "
                          "(unix seconds)")
    tables.users = ensure_entity_table(tables.users, "user_id",
                                       tables.interactions["user_id"].to_numpy())
    tables.items = ensure_entity_table(tables.items, "item_id",
                                       tables.interactions["item_id"].to_numpy())
    clicks = everything.interactions
    earlier = clicks[(clicks["timestamp"] < since) & (clicks["clicked"] == 1)]
    return tables, earlier, since, until


def _grow(model, parent: Path, prepared, options: UpdateOptions, since: int, until: int):
    """Admit / expire ids by the clicks seen so far; returns (stats, per-feature summary)."""
    clicks = prepared.splits.train_positives   # windows overlap: count each click once
    clicks = clicks[clicks["timestamp"] >= _trained_until(parent)]
    stats = IdStats.load(parent, _ID_COLUMNS).plus(IdStats.of_clicks(clicks, _ID_COLUMNS))
    changes, summary = {}, {}
    for side, encoder in id_encoders(model):
        feature = "user_id" if side == "query" else "item_id"
        plan = plan_vocabulary(encoder.vocabulary_terms(), encoder.num_oov_buckets,
                               stats.of(feature), options.min_count, until,
                               options.expire_days)
        if plan.changed:
            changes[encoder] = (plan.terms, plan.fresh_rows)
        summary[feature] = {"admitted": len(plan.admitted), "expired": len(plan.expired),
                            "reused": len(plan.fresh_rows),
                            "rows": encoder.num_oov_buckets + len(plan.terms)}
    if changes:
        set_vocabularies(model, changes)
    return stats, summary


@dataclass
class Candidate:
    """A trained, gated update run, still in its staging directory."""

    out: Path                             # the run directory it is committed to
    staging: Path
    model: object                         # the TwoTowerModel as trained
    gate: gates.GateResult
    seconds: dict
    vocabulary: dict


def train_candidate(kind: Kind, runs_dir: Path, model_base: Path,
                    options: UpdateOptions = UpdateOptions()) -> Candidate:
    """Restore, grow, train and gate one update into a staging run directory
    (nothing committed or published); raises UpdateError."""
    if kind not in ("full", "incremental"):
        raise UpdateError(f"unknown update kind {kind!r} (full or incremental)")
    runs_dir, model_base = Path(runs_dir), Path(model_base)
    started = time.perf_counter()
    parent = latest_run(runs_dir)
    config = _config(parent, options)
    tables, earlier_clicks, since, until = _window(config, parent, kind, options)
    holdout_days = options.holdout * (until - since) / _DAY
    raw = config.model_dump(mode="json")
    raw["data"].update(since=since, until=until)
    raw["training"].update(epochs=options.epochs, early_stopping_patience=0, **{
        k: 0.0 for k in ("validation_fraction", "validation_days") if k in raw["training"]})
    raw["evaluation"].update(protocol="temporal", test_days=holdout_days,
                             ks=sorted(set(config.evaluation.ks) | {options.gate_k}))
    config = parse_config(raw, f"the update's config (parent {parent})")
    try:
        prepared = prepare_data(config, tables, earlier_clicks)
    except ValueError as err:
        raise UpdateError(f"data window {describe_window(since, until)}: {err}") from err

    out = next_run_dir(runs_dir, kind)
    staging = run_dirs.open_staging(out, resumable=lambda _: False)
    (staging / run_dirs.RUN_MARKER).write_text(dump_config(config), encoding="utf-8")
    tf.keras.utils.set_random_seed(config.training.seed)
    tc = config.training
    batches = TrainingBatches(prepared, config)
    sample = next(iter(batches.dataset(tc.batch_size, tc.seed)))
    model = restore_model(parent, sample, lazy_sparse=kind == "incremental")
    # train with the loss the config names (--config may change its options), not
    # the one restored with the parent's weights: loss layers hold no weights
    model.objective = make_objective(config.objective)
    stats, vocabulary = _grow(model, parent, prepared, options, since, until)
    frozen = freeze_all_but_ids(model) if kind == "incremental" else []
    steps = -(-batches.num_rows // tc.batch_size) * tc.epochs
    model.run_eagerly = steps <= options.eager_max_steps   # reset by the next compile
    seconds = {"prepare": round(time.perf_counter() - started, 2)}   # window, restore, grow
    fitted = fit(model, prepared, config, staging, options.verbose, resumable=False)
    seconds["train"] = round(fitted.train_seconds, 2)
    unfreeze(model, frozen)

    started = time.perf_counter()
    evaluation = evaluate_model(model, prepared, config.evaluation.ks)
    served = gates.served_version(model_base)
    metric = f"hr@{options.gate_k}"
    served_value = None if served is None else gates.served_metrics(
        model_base, served, prepared.tables.users, prepared.tables.items,
        prepared.test_set(), [options.gate_k])[metric]
    gate = gates.GateResult(metric, evaluation.model[metric], served_value, served,
                            options.gate_margin)
    seconds["gate"] = round(time.perf_counter() - started, 2)
    log.info("%s", gate.describe())

    started = time.perf_counter()
    metrics = run_metrics(config, prepared, fitted, evaluation)
    save_run_artifacts(staging, config, model, prepared.tables, prepared.splits.known,
                       metrics, fitted.history, towers=options.servable,
                       optimizer=configured_optimizer(model))
    stats.save(staging)
    test_ts = prepared.splits.test["timestamp"]
    write_json_atomic(staging / UPDATE_FILE, {
        "kind": kind, "parent": str(parent.resolve()),
        "window": {"since": since, "until": until,
                   "text": describe_window(since, until)},
        "trained_until": int(test_ts.min()) if len(test_ts) else until,
        "holdout_share": options.holdout, "gate": gate.as_dict(),
        "vocabulary": vocabulary, "min_count": options.min_count,
        "expire_days": options.expire_days})
    seconds["save"] = round(time.perf_counter() - started, 2)      # the run's artifacts
    return Candidate(out, staging, model, gate, seconds, vocabulary)


def run_update(kind: Kind, runs_dir: Path, model_base: Path,
               options: UpdateOptions = UpdateOptions()) -> UpdateResult:
    """Train, gate and publish one update; raises UpdateError / GateRefused."""
    with update_lock(runs_dir):
        return _run_update(kind, runs_dir, model_base, options)


def _run_update(kind, runs_dir, model_base, options) -> UpdateResult:
    if not options.servable:
        raise ValueError("run_update publishes its run: UpdateOptions.servable must be True")
    skip = repair_cut_publish(Path(model_base))
    if skip is not None:
        log.warning("removed version %d, left half-published by a killed update", skip)
    candidate = train_candidate(kind, runs_dir, model_base, options)
    out, gate, seconds = candidate.out, candidate.gate, candidate.seconds
    if not gate.passed:
        rejected = out.parent / f"{out.name}.rejected"
        shutil.rmtree(rejected, ignore_errors=True)
        candidate.staging.rename(rejected)
        raise GateRefused(gate, rejected)
    run_dirs.commit(out)

    started = time.perf_counter()
    refresh = kind == "incremental" and not options.rebuild_index
    result = publish_run(out, model_base, replace(options.publish, refresh_index=refresh))
    seconds["export"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    write_json_atomic(out / PUBLISHED_FILE, {"version": result.version,
                                             "model_base": str(model_base.resolve())})
    if options.publish.keep is not None:
        prune(model_base, options.publish.keep, options.publish.serving_num_versions)
    seconds["publish"] = round(time.perf_counter() - started, 2)
    return UpdateResult(out, result.version, gate, seconds, candidate.vocabulary,
                        describe_index(result))
