"""A run that descends from another by an incremental update, for the incremental
export's tests and benchmark.

Stands in for issue 13's incremental training (not built yet): the parent run
is copied and some rows of its candidate tower's item id embedding table are
moved through the tower's real weights (the restored variable is assigned and
the tower SavedModel saved again), every other weight left bit-identical, as an
update that trains only the id embeddings leaves them. Catalog changes (new
items, changed features) are the caller's item table.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from export.change_detection import tower_state

_SKIP = ("checkpoints", "backup", "tensorboard")


def descend(parent: Path, child: Path, item_ids: Sequence[str], scale: float = 0.5,
            seed: int = 0, dense_layer_delta: Optional[float] = None) -> list[str]:
    """Copy ``parent`` to ``child`` and move the id embedding rows of ``item_ids``
    (those in the vocabulary) by ``scale`` x N(0, row std); returns the ids moved.
    ``dense_layer_delta``: also shift the first other float matrix found (a frozen
    weight changed: the incremental export must fall back to a full one)."""
    shutil.copytree(parent, child, ignore=shutil.ignore_patterns(*_SKIP))
    path = child / "towers" / "candidate"
    loaded = tf.saved_model.load(str(path))
    state = tower_state(loaded)
    table = state.variables[state.id_embedding("item_id")]
    variable = state.objects[state.id_embedding("item_id")]
    keys, rows = state.tables[state.id_vocabulary("item_id")]
    row_of = dict(zip(keys, rows))
    moved = [i for i in map(str, item_ids) if i in row_of]
    rng = np.random.default_rng(seed)
    target = np.array([row_of[i] for i in moved], np.int64)
    if len(target):
        table = table.copy()
        table[target] += scale * table.std() * rng.standard_normal(
            (len(target), table.shape[1])).astype(np.float32)
        variable.assign(table)
    if dense_layer_delta is not None:
        other = next(p for p, v in state.variables.items()
                     if v.ndim == 2 and p != state.id_embedding("item_id")
                     and not any("item_id" in q.split("/") for q in state.paths[p]))
        state.objects[other].assign(state.variables[other] + dense_layer_delta)
    tmp = child / "towers" / "candidate.new"
    tf.saved_model.save(loaded, str(tmp), signatures={
        "serving_default": loaded.signatures["serving_default"]})
    shutil.rmtree(path)
    tmp.rename(path)
    return moved
