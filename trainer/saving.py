"""Write a finished run's artifacts (layout in docs/ARTIFACTS.md).

Towers are saved as SavedModels with an explicit ``serving_default``
signature (one named ``[None]`` input per raw feature, output ``embedding``)
and a callable ``embed(features)``, so export can load them with plain
``tf.saved_model.load`` - no trainer code needed downstream.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf

try:  # tf-keras's own switch, not public API: without it a save only traces more
    from tf_keras.src.saving.legacy.saved_model.utils import keras_option_scope
except ImportError:  # pragma: no cover - a tf-keras that moved it
    def keras_option_scope(**_):
        return contextlib.nullcontext()

from trainer.config import RunConfig
from trainer.features import RAW_DTYPES
from trainer.report import write_report
from trainer.towers import Tower


def save_tower(tower: Tower, path: Path) -> None:
    """SavedModel: raw feature dict -> {"embedding": [batch, d] float32}.

    Only ``embed`` and its signature are traced: Keras's own traces of every
    layer's ``call`` (which nothing downstream loads: export and serving use
    the signature) took half the save, about 4 s per update of the drifting
    world.
    """
    module = tf.Module()
    module.tower = tower
    module.embed = tf.function(lambda features: {"embedding": tower(features, training=False)},
                               input_signature=[tower.input_signature])
    signature = module.embed.get_concrete_function()
    with keras_option_scope(save_traces=False):
        tf.saved_model.save(module, str(path), signatures={"serving_default": signature})


MODEL_STATE = "model"   # config.json, optimizer.json, state.* (a tf.train.Checkpoint)


def save_model_state(out: Path, model, optimizer=None) -> None:
    """What a model update restores: the model's config (vocabularies included),
    its optimizer's config and one checkpoint of weights plus optimizer slots.

    The per-epoch ``checkpoints/`` may predate an early-stopping restore; this
    is the model as saved (model updates restore it: docs/UPDATES.md).
    ``optimizer``: the one whose config is recorded (default the model's); the
    checkpoint holds the model's own optimizer's slots.
    """
    state = out / MODEL_STATE
    state.mkdir(parents=True, exist_ok=True)
    (state / "config.json").write_text(json.dumps(model.get_config()))
    (state / "optimizer.json").write_text(
        json.dumps(tf.keras.optimizers.serialize(optimizer or model.optimizer)))
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(str(state / "state"))


def feature_spec(config: RunConfig, embedding_dim: int) -> dict:
    def describe(specs):
        out = []
        for s in specs:
            # A history is a multi-valued string to everything downstream.
            kind = "multi_categorical" if s.type == "history" else s.type
            d = {"name": s.name, "kind": kind, "dtype": RAW_DTYPES[s.type].name}
            if kind == "multi_categorical":
                d["separator"] = s.separator
            out.append(d)
        return out

    return {"query": describe(config.features.user),
            "candidate": describe(config.features.item),
            "embedding_dim": embedding_dim,
            # false for the matrix-factorization baseline: inner products, not cosines
            "l2_normalized": bool(config.model.query_tower.l2_normalize
                                  and config.model.candidate_tower.l2_normalize),
            "user_id_feature": "user_id", "item_id_feature": "item_id"}


def write_seen(path: Path, clicks) -> None:
    """seen.parquet: (user_id, item_id, timestamp) of the training clicks, from a
    DataFrame or an iterable of them (a streamed run's blocks)."""
    frames = [clicks] if isinstance(clicks, pd.DataFrame) else clicks
    writer = None
    for frame in frames:
        table = pa.Table.from_pandas(frame[["user_id", "item_id", "timestamp"]],
                                     preserve_index=False)
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    if writer is None:
        raise ValueError("no training clicks to write to seen.parquet")
    writer.close()


def save_run_artifacts(out: Path, config: RunConfig, model, tables, train_pos,
                       metrics: dict, history: dict, towers: bool = True,
                       optimizer=None) -> None:
    """``train_pos``: the training clicks, a DataFrame or an iterable of them.
    ``towers=False`` leaves out the tower SavedModels (half the save) and the
    report's plot, for runs that are only ever restored by a model update,
    never exported or looked at (replays).
    ``optimizer``: the config recorded for it (``save_model_state``)."""
    if towers:
        save_tower(model.query_tower, out / "towers" / "query")
        save_tower(model.candidate_tower, out / "towers" / "candidate")
    save_model_state(out, model, optimizer)
    dim = model.candidate_tower.embedding_dim
    (out / "feature_spec.json").write_text(json.dumps(feature_spec(config, dim), indent=2))
    item_cols = [s.name for s in config.features.item]
    user_cols = ["user_id"] + [s.name for s in config.features.user if s.name != "user_id"]
    tables.items[item_cols].to_parquet(out / "items.parquet", index=False)
    tables.users[[c for c in user_cols if c in tables.users]].to_parquet(
        out / "users.parquet", index=False)
    write_seen(out / "seen.parquet", train_pos)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "history.json").write_text(json.dumps(history, indent=2))
    write_report(out, config, metrics, history, plot=towers)
