"""Restore a run's model with its optimizer, carry optimizer slots through
vocabulary growth, and freeze everything but the id embeddings.

A run directory's ``model/`` (trainer.saving.save_model_state) holds the
model config (vocabularies inside), the optimizer config and one checkpoint
of weights and optimizer slots. ``restore_model`` rebuilds the model from the
config, makes its variables and the optimizer's slots, then reads the
checkpoint, so every weight and slot is the saved one bit for bit.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import tensorflow as tf

from trainer.model import TwoTowerModel
from trainer.optimizers import LazyAdam
from trainer.saving import MODEL_STATE
from trainer.towers import Tower

# optimizer class name -> its slot lists (tf-keras optimizers, one slot per variable)
_SLOTS = {"Adam": ("_momentums", "_velocities"), "LazyAdam": ("_momentums", "_velocities"),
          "Adagrad": ("_accumulators",), "SGD": ("momentums",)}
ID_FEATURES = {"query": "user_id", "candidate": "item_id"}


class StateError(ValueError):
    """A run directory whose model cannot be restored; the message names the file."""


def restore_model(run_dir: Path, sample_batch, lazy_sparse: bool = False) -> TwoTowerModel:
    """The run's model and optimizer as saved. ``sample_batch``: one training
    batch (trainer.batches) to make the variables with. ``lazy_sparse``
    (incremental updates): a saved Adam comes back as LazyAdam with the same
    config, slots and step count, so an id row moves only when its id is in a
    batch (Adam's momentum would move every row ever trained, and with it
    every item's served vector); save it with ``configured_optimizer``."""
    state = Path(run_dir) / MODEL_STATE
    for name in ("config.json", "optimizer.json", "state.index"):
        if not (state / name).is_file():
            raise StateError(f"{state / name}: missing; the run was trained before model "
                             "state was saved, or is not a finished run: train it again")
    model = TwoTowerModel.from_config(json.loads((state / "config.json").read_text()))
    optimizer = tf.keras.optimizers.deserialize(
        json.loads((state / "optimizer.json").read_text()))
    if lazy_sparse and type(optimizer) is tf.keras.optimizers.Adam:
        optimizer = LazyAdam.from_config(optimizer.get_config())
    model.compile(optimizer=optimizer)
    model(sample_batch)
    optimizer.build(model.trainable_variables)
    tf.train.Checkpoint(model=model, optimizer=optimizer).read(
        str(state / "state")).assert_existing_objects_matched()
    return model


def slot_lists(optimizer) -> tuple[str, ...]:
    name = type(optimizer).__name__
    if name not in _SLOTS:
        raise StateError(f"optimizer {name}: carrying its slots through vocabulary growth "
                         f"is supported for {sorted(_SLOTS)}")
    return tuple(s for s in _SLOTS[name] if hasattr(optimizer, s))


def _slot(optimizer, slots: str, variable) -> tf.Variable:
    return getattr(optimizer, slots)[optimizer._index_dict[optimizer._var_key(variable)]]


def id_encoders(model: TwoTowerModel) -> list[tuple[str, tf.keras.layers.Layer]]:
    """(side, encoder) of the user and item id features (ensemble members too)."""
    out = []
    for side, tower in (("query", model.query_tower), ("candidate", model.candidate_tower)):
        for t in tower.members or [tower]:
            encoder = t.encoders.get(ID_FEATURES[side])
            if encoder is not None and hasattr(encoder, "set_terms"):
                out.append((side, encoder))
    return out


def set_vocabularies(model: TwoTowerModel, changes: dict) -> None:
    """Give id encoders new vocabularies and carry the optimizer along.

    ``changes``: encoder -> (terms, fresh_rows) (see ``_Vocabulary.set_terms``).
    The optimizer is replaced by one of the same config whose slots equal the
    old ones for every variable, and for a grown table on every kept row;
    appended and fresh rows start from the optimizer's initial slot values.
    The iteration count is carried (Adam's bias correction goes on).
    """
    old_opt = model.optimizer
    slots = slot_lists(old_opt)   # an unsupported optimizer fails before anything changes
    before = {id(v): v for v in model.trainable_variables}
    grown = {}   # new table variable -> (old table variable, fresh rows)
    for encoder, (terms, fresh) in changes.items():
        old_table = encoder.embedding.embeddings
        encoder.set_terms(terms, fresh)
        grown[id(encoder.embedding.embeddings)] = (old_table, np.asarray(list(fresh), np.int64))
    new_opt = type(old_opt).from_config(old_opt.get_config())
    variables = model.trainable_variables
    new_opt.build(variables)
    new_opt.iterations.assign(old_opt.iterations)
    for var in variables:
        old_var, fresh = grown.get(id(var), (before.get(id(var)), None))
        if old_var is None:
            raise StateError(f"variable {var.name} appeared without a known predecessor")
        for name in slots:
            src, dst = _slot(old_opt, name, old_var), _slot(new_opt, name, var)
            if fresh is None:
                dst.assign(src)
                continue
            value = dst.numpy()
            kept = np.ones(src.shape[0], dtype=bool)
            kept[fresh] = False
            value[:src.shape[0]][kept] = src.numpy()[kept]
            dst.assign(value)
    model.compile(optimizer=new_opt)


def configured_optimizer(model: TwoTowerModel):
    """The optimizer a run records: an incremental update's LazyAdam stands in
    for the configured Adam (same config and slots, so the checkpoint is
    Adam's too); Adagrad and plain SGD already update sparse gradients row by
    row and are recorded as they are."""
    if type(model.optimizer) is LazyAdam:
        return tf.keras.optimizers.Adam.from_config(model.optimizer.get_config())
    return model.optimizer


def freeze_all_but_ids(model: TwoTowerModel) -> list[tf.keras.layers.Layer]:
    """Make every layer but the id encoders non-trainable (incremental update);
    returns the layers frozen, for ``unfreeze``. The streaming frequency
    estimate is state, not a weight: it keeps updating in the training step."""
    ids = {id(e) for _, e in id_encoders(model)}
    frozen = []

    def freeze(layers: Iterable):
        for layer in layers:
            if isinstance(layer, Tower):
                freeze(layer.members)
                if not layer.members:
                    freeze(list(layer.encoders.values()) + list(layer.hidden)
                           + [layer.projection])
            elif id(layer) not in ids and layer.trainable:
                layer.trainable = False
                frozen.append(layer)

    freeze([model.query_tower, model.candidate_tower, model.objective])
    for _, encoder in id_encoders(model):   # a history encoder may hold the item table
        encoder.trainable = True
    model.compile(optimizer=model.optimizer)   # the train step sees the new trainable set
    return frozen


def unfreeze(model: TwoTowerModel, frozen: list) -> None:
    """Undo ``freeze_all_but_ids`` (before saving: a saved config stays trainable,
    so the next restore builds the optimizer over every variable)."""
    for layer in frozen:
        layer.trainable = True
    model.compile(optimizer=model.optimizer)
