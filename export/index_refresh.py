"""Refresh a served ScaNN index in place: keep its tree and codebooks, upsert and
delete items through ScaNN's own searcher.

The ``retrieval`` SavedModel keeps its index as TFRS's ScaNN layer does: a
``ScannState`` (scann/scann_ops/py/scann_ops.py) of nine tensors - config,
partitioner (the k-means tree), datapoint -> leaf tokens, AH codebook, AH codes,
int8 parts, the float dataset. The TF ops can only build or search a searcher,
so the refresh goes through ScaNN's pybind searcher, which can mutate one:

    checkpoint tensors ─▶ ScaNN's serialized-searcher files ─▶ scann_ops_pybind
    load_searcher ─▶ delete / upsert (new points go to their nearest existing
    leaf and are coded with the existing codebook) ─▶ serialize ─▶ tensors
    ─▶ the TFRS ScaNN layer's ScannState variables, as they are (the served
    graph's tensors_to_scann builds the searcher from them when the model is
    loaded: the export's session check proves it accepts them).

Both serialized forms are the same bytes (binary protos, ``.npy`` arrays), so the
conversion is file I/O, not re-encoding.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
import tensorflow_recommenders as tfrs
from scann.scann_ops.py import scann_ops, scann_ops_pybind
from scann.scann_ops.py.scann_ops_pybind_backcompat import populate_and_save_assets_proto

from export.scann_tuning import ScannParams
from export.verify import checkpoint_keys

# ScannState's tensors, in tensors_to_scann's argument order after `dataset`;
# each is also the stem of ScaNN's serialized-searcher file for it.
STATE_FIELDS = ("scann_config", "serialized_partitioner", "datapoint_to_token", "ah_codebook",
                "hashed_dataset", "int8_dataset", "int8_multipliers", "dp_norms", "dataset")
_PROTO_FIELDS = ("scann_config", "serialized_partitioner", "ah_codebook")  # [1] string tensors
IMBALANCE_STAT = "partition_weighted_avg_relative_imbalance"


class IndexStateError(ValueError):
    """A previous retrieval version whose ScaNN state cannot be refreshed."""


@dataclass
class IndexState:
    """A ScaNN index as the retrieval SavedModel holds it.

    ``tensors``: STATE_FIELDS -> numpy arrays; ``item_ids`` [N] str: the item of
    each datapoint row (``tensors["dataset"]`` [N, d] holds the exact vectors).
    """
    tensors: dict[str, np.ndarray]
    item_ids: np.ndarray

    @property
    def vectors(self) -> np.ndarray:
        return self.tensors["dataset"]


@dataclass
class RefreshResult:
    state: IndexState
    health_before: dict  # ScaNN's get_health_stats() on the loaded, then the mutated searcher
    health_after: dict


def read_index_state(version_dir: Path) -> IndexState:
    """The ScaNN state and row -> item id map of a published ``retrieval`` version,
    read from its checkpoint (no graph is loaded)."""
    prefix = Path(version_dir) / "variables" / "variables"
    try:
        reader = tf.train.load_checkpoint(str(prefix))
    except (tf.errors.NotFoundError, tf.errors.DataLossError, ValueError) as err:
        raise IndexStateError(f"{prefix}: cannot read the checkpoint ({err})") from None
    keys = checkpoint_keys(reader)

    def value(path: str) -> np.ndarray:
        if path not in keys:
            raise IndexStateError(f"{version_dir}: no variable '{path}' in the checkpoint "
                                  "(not a ScaNN retrieval model?)")
        return reader.get_tensor(keys[path])

    tensors = {f: value(f"index/_serialized_searcher/{f}") for f in STATE_FIELDS}
    rows = value("index/_identifiers")
    ids = value("item_ids").astype(str).astype(object)
    if not np.array_equal(rows, np.arange(len(rows))):
        raise IndexStateError(f"{version_dir}: the index identifiers are not the rows 0..N-1")
    if tensors["dataset"].ndim != 2 or len(tensors["dataset"]) != len(ids):
        raise IndexStateError(f"{version_dir}: the ScaNN state keeps no float dataset for "
                              f"its {len(ids)} items (built without re-ordering?)")
    return IndexState(tensors, ids)


def refresh(state: IndexState, delete_ids, upsert_ids, upsert_vectors: np.ndarray,
            upsert_batch: int = 1024) -> RefreshResult:
    """Delete ``delete_ids`` and insert/update ``upsert_ids`` [M] with vectors [M, d]
    in ``state`` through ScaNN's searcher; the tree and codebooks stay as they are.

    Rows move (ScaNN deletes by swapping the last row in), so the result carries
    its own ``item_ids``; every row's vector is checked against what it must hold.
    """
    upsert_ids = [str(i) for i in upsert_ids]
    delete_ids = [str(i) for i in delete_ids]
    upsert_vectors = np.ascontiguousarray(upsert_vectors, dtype=np.float32)
    # the state passes through files twice (ScaNN's pybind searcher loads and
    # serializes only through a directory): in memory where the system has it
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="scann-refresh-", dir=shm) as tmp:
        src, dst = Path(tmp, "in"), Path(tmp, "out")
        src.mkdir()
        dst.mkdir()
        _write_searcher_files(state, src)
        searcher = scann_ops_pybind.load_searcher(str(src))
        before = searcher.get_health_stats()
        if delete_ids:
            searcher.delete(delete_ids)
        if upsert_ids:
            searcher.upsert(upsert_ids, upsert_vectors, batch_size=upsert_batch)
        after = searcher.get_health_stats()
        searcher.serialize(str(dst))
        refreshed = IndexState(_read_searcher_files(dst, state.tensors),
                               np.asarray(searcher.docids, dtype=object))
    _check_rows(state, refreshed, set(delete_ids), upsert_ids, upsert_vectors)
    return RefreshResult(refreshed, before, after)


def _write_searcher_files(state: IndexState, out: Path) -> None:
    """The files ``ScannSearcher.serialize`` writes, from the state's tensors."""
    for field in STATE_FIELDS:
        value = state.tensors[field]
        if field in _PROTO_FIELDS:
            (out / f"{field}.pb").write_bytes(value.reshape(-1)[0])
        elif value.ndim > 0:  # absent parts (int8 without int8 scoring) are empty scalars
            np.save(out / f"{field}.npy", value)
    with open(out / "scann_docids.pkl", "wb") as f:
        pickle.dump(list(state.item_ids), f)  # read back by scann_ops_pybind.load_searcher
    populate_and_save_assets_proto(str(out))


def _read_searcher_files(path: Path, previous: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tensors = {}
    for field in STATE_FIELDS:
        if field in _PROTO_FIELDS:
            tensors[field] = np.array([(path / f"{field}.pb").read_bytes()], dtype=object)
        elif (path / f"{field}.npy").is_file():
            tensors[field] = np.load(path / f"{field}.npy")
        else:
            tensors[field] = np.zeros((), previous[field].dtype)
    return tensors


def _check_rows(old: IndexState, new: IndexState, deleted: set, upsert_ids: list,
                upsert_vectors: np.ndarray) -> None:
    """Every item of the refreshed index holds its expected vector, at its row."""
    ids, old_ids = pd.Index(new.item_ids), pd.Index(old.item_ids)
    gone = pd.Index(sorted(deleted), dtype=object)
    upserted = pd.Index(upsert_ids, dtype=object)
    kept = (gone.get_indexer(old_ids) < 0) & (upserted.get_indexer(old_ids) < 0)
    expected_count = int(kept.sum()) + upserted.nunique()
    old_row = old_ids.get_indexer(ids)
    new_row = upserted.get_indexer(ids)
    stale = (new_row < 0) & (gone.get_indexer(ids) >= 0)
    if (not ids.is_unique or len(ids) != expected_count or ((old_row < 0) & (new_row < 0)).any()
            or stale.any() or len(new.vectors) != len(ids)
            or len(new.tensors["datapoint_to_token"]) != len(ids)):
        raise IndexStateError("ScaNN refresh: the refreshed index does not hold exactly the "
                              "expected items")
    expected = np.where((new_row >= 0)[:, None], upsert_vectors[np.maximum(new_row, 0)]
                        if len(upsert_ids) else 0.0, old.vectors[np.maximum(old_row, 0)])
    wrong = (expected != new.vectors).any(axis=1)
    if wrong.any():
        bad = int(np.flatnonzero(wrong)[0])
        raise IndexStateError(f"ScaNN refresh: row {bad} (item {ids[bad]}) does not hold "
                              "its expected vector")


class _StateScaNN(tfrs.layers.factorized_top_k.ScaNN):
    """TFRS's ScaNN layer whose state is given tensors instead of a trained
    searcher; ``index()`` keeps TFRS's own identifiers handling. The state goes
    into the layer's ``ScannState`` variables as it is: no searcher is built here
    (the served graph builds one from them when loaded, which the export's
    session check does)."""

    def __init__(self, tensors: dict[str, np.ndarray], **kwargs):
        super().__init__(**kwargs)
        self._build_searcher = lambda candidates: _GivenState(tensors)


class _GivenState:
    """What TFRS's ScaNN.index() asks of a built searcher: its ScannState."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors = tensors

    def serialize_to_module(self) -> scann_ops.ScannState:
        return scann_ops.ScannState([tf.constant(self.tensors[f]) for f in STATE_FIELDS])


def searcher_from_tensors(tensors: dict[str, np.ndarray]) -> scann_ops.ScannSearcher:
    """The TF ops' searcher over these state tensors. Its own shared name: the op's
    default ("") would hand every later call in the process the first searcher."""
    args = [tf.constant(tensors[f]) for f in STATE_FIELDS]
    return scann_ops.ScannSearcher(scann_ops.tensors_to_scann(
        args[-1], *args[:-1], shared_name=f"refreshed-{uuid.uuid4()}"))


def saved_arrays(state: IndexState) -> dict[str, np.ndarray]:
    """Object path -> array the retrieval SavedModel's ScaNN variables must hold."""
    return {f"index/_serialized_searcher/{f}": state.tensors[f] for f in STATE_FIELDS}


def scann_layer_from_state(state: IndexState, k: int, params: ScannParams):
    """A served ScaNN layer over ``state`` (rows = ``state.item_ids``); ``params``
    are the previous build's, kept for the layer's config and the metadata."""
    layer = _StateScaNN(state.tensors, k=k, distance_measure="dot_product",
                        num_leaves=params.num_leaves,
                        num_leaves_to_search=params.num_leaves_to_search,
                        num_reordering_candidates=params.num_reordering_candidates,
                        dimensions_per_block=params.dimensions_per_block,
                        training_iterations=params.training_iterations)
    n = len(state.item_ids)
    return layer.index(tf.constant(state.vectors), tf.range(n, dtype=tf.int64))
