"""Refresh a served ScaNN index in place: keep its tree and codebooks, upsert and
delete items through ScaNN's own searcher.

The ``retrieval`` SavedModel keeps its index as TFRS's ScaNN layer does: a
``ScannState`` (scann/scann_ops/py/scann_ops.py) of nine tensors - config,
partitioner (the k-means tree), datapoint -> leaf tokens, AH codebook, AH codes,
int8 parts, the float dataset. The TF ops can only build or search a searcher,
so the refresh goes through ScaNN's pybind searcher, which can mutate one:

    checkpoint tensors ─▶ ScaNN's serialized-searcher files (on /dev/shm) ─▶
    scann_pybind.ScannNumpy ─▶ delete / upsert (new points go to their nearest
    existing leaf and are coded with the existing codebook; the row -> item id
    list kept here as ScaNN's Python wrapper keeps it) ─▶ serialize ─▶ tensors
    ─▶ the TFRS ScaNN layer's ScannState variables, as they are (the served
    graph's tensors_to_scann builds the searcher from them when the model is
    loaded: the export's session check proves it accepts them).

Both serialized forms are the same bytes (binary protos, ``.npy`` arrays), so the
conversion is file I/O, not re-encoding.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
import tensorflow_recommenders as tfrs
from scann.scann_ops.py import scann_ops, scann_ops_pybind  # noqa: F401 (puts scann_pybind on the path)
from scann.scann_ops.py.scann_ops_pybind_backcompat import populate_and_save_assets_proto

from export.catalog import id_index
from export.scann_tuning import ScannParams
from export.serving_models import aligned_empty, as_tensor
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
    ids = np.array([b.decode() for b in value("item_ids").ravel()], dtype=object)  # UTF-8
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
        searcher = _load_searcher(src)
        shutil.rmtree(src)  # its memory, for the files serialize writes next
        before = searcher.get_health_stats()
        old_index = id_index(state.item_ids)  # one id -> row table, refresh and check
        ids = list(state.item_ids)
        rows, moved = _delete_rows(ids, old_index, delete_ids)
        if rows:
            searcher.delete(rows)
        if upsert_ids:
            searcher.upsert(_upsert_rows(ids, old_index, set(delete_ids), moved, upsert_ids),
                            upsert_vectors, upsert_batch)
        after = searcher.get_health_stats()
        searcher.serialize(str(dst), False)
        del searcher
        refreshed = IndexState(_read_searcher_files(dst, state.tensors),
                               np.asarray(ids, dtype=object))
    _check_rows(state, refreshed, set(delete_ids), upsert_ids, upsert_vectors, old_index)
    return RefreshResult(refreshed, before, after)


def _load_searcher(path: Path):
    """ScaNN's pybind searcher (``scann_pybind.ScannNumpy``) from serialized files,
    without ScaNN's Python wrapper: the wrapper keeps the row -> id list in a
    pickle and a 1M-entry dict (~1.2 s at 1M items); the rows are tracked here by
    ``_delete_rows`` / ``_upsert_rows`` instead, as the wrapper does, and every
    row is checked afterwards (``_check_rows``)."""
    import scann_pybind  # on sys.path once scann_ops_pybind is imported

    with open(path / "scann_assets.pbtxt") as f:
        return scann_pybind.ScannNumpy(str(path), f.read())


def _delete_rows(ids: list, old_index: pd.Index, delete_ids: list) -> tuple[list, dict]:
    """The rows to hand ScaNN's ``delete`` for ``delete_ids`` (unique), with ``ids``
    (the index's items, ``old_index``'s order) updated as ScaNN moves its rows
    (each deletion moves the last row into the freed one, as ScannSearcher.delete
    in scann_ops_pybind tracks it); also item -> row of every remaining item that
    moved."""
    if len(set(delete_ids)) != len(delete_ids):
        raise IndexStateError("ScaNN refresh: an item is deleted twice")
    start = old_index.get_indexer(delete_ids) if delete_ids else []
    moved, rows = {}, []
    for item, row in zip(delete_ids, start):
        row = moved.pop(item, row)
        if row < 0:
            raise IndexStateError(f"ScaNN refresh: cannot delete {item!r}, not in the index")
        rows.append(int(row))
        last = len(ids) - 1
        if row != last:
            ids[row] = ids[last]
            moved[ids[row]] = row
        ids.pop()
    return rows, moved


def _upsert_rows(ids: list, original: pd.Index, deleted: set, moved: dict,
                 upsert_ids: list) -> list:
    """The rows to hand ScaNN's ``upsert`` (None: a new item, appended in order),
    with ``ids`` extended by the new items. ``ids`` is ``original`` after
    ``_delete_rows``: an item is at its original row unless it moved or was
    deleted (then it is inserted anew, as the wrapper does)."""
    rows = original.get_indexer(upsert_ids)
    out = []
    for item, row in zip(upsert_ids, rows):
        row = -1 if item in deleted else moved.get(item, row)
        if row < 0:
            out.append(None)
            ids.append(item)
        else:
            out.append(int(row))
    return out


def _write_searcher_files(state: IndexState, out: Path) -> None:
    """The files ``ScannSearcher.serialize`` writes, from the state's tensors."""
    for field in STATE_FIELDS:
        value = state.tensors[field]
        if field in _PROTO_FIELDS:
            (out / f"{field}.pb").write_bytes(value.reshape(-1)[0])
        elif value.ndim > 0:  # absent parts (int8 without int8 scoring) are empty scalars
            np.save(out / f"{field}.npy", value)
    populate_and_save_assets_proto(str(out))


def _read_searcher_files(path: Path, previous: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tensors = {}
    for field in STATE_FIELDS:
        if field in _PROTO_FIELDS:
            tensors[field] = np.array([(path / f"{field}.pb").read_bytes()], dtype=object)
        elif (path / f"{field}.npy").is_file():
            tensors[field] = _load_aligned(path / f"{field}.npy")
        else:
            tensors[field] = np.zeros((), previous[field].dtype)
    return tensors


def _load_aligned(path: Path) -> np.ndarray:
    """``np.load`` into a 64-byte aligned buffer, which the ScaNN layer's variables
    then take without a copy (export.serving_models.as_tensor)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran_order, dtype = read_header(f)
        if fortran_order or dtype.hasobject:
            return np.load(path)
        out = aligned_empty(shape, dtype)
        if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
            raise IndexStateError(f"{path}: shorter than its header says")
    return out


def _check_rows(old: IndexState, new: IndexState, deleted: set, upsert_ids: list,
                upsert_vectors: np.ndarray, old_index: pd.Index) -> None:
    """Every item of the refreshed index holds its expected vector, at its row:
    the old items less ``deleted``, each once, with its old vector unless it was
    upserted, and every upserted item with its new vector; nothing else.

    ScaNN keeps most rows where they were (a delete moves the last row into the
    freed one, an insert appends), so the rows whose id did not move are checked
    with whole-array comparisons and only the others are looked up: at 1M items
    one hash table of the old ids instead of one per lookup direction.
    """
    ids, old_ids = new.item_ids, old.item_ids   # old_index: id_index(old_ids)
    n, n_old = len(ids), len(old_ids)
    # (get_indexer below refuses duplicate old ids)
    upserted = pd.Index(upsert_ids, dtype=object)
    upsert_old_row = old_index.get_indexer(upserted)
    deleted_old_row = old_index.get_indexer(pd.Index(sorted(deleted), dtype=object))
    if not upserted.is_unique or (deleted_old_row < 0).any() or deleted & set(upsert_ids):
        raise IndexStateError("ScaNN refresh: an item upserted twice, or deleted although "
                              "not in the index or also upserted")
    expected_count = n_old - len(deleted) + int((upsert_old_row < 0).sum())

    # each new row's source: a row of old.vectors (< n_old), n_old + a row of
    # upsert_vectors, or -1 for an item that should not be there
    stays = np.zeros(n, bool)
    stays[:min(n, n_old)] = ids[:n_old] == old_ids[:n]
    upsert_at = np.full(max(n, n_old), -1)
    upsert_at[upsert_old_row[upsert_old_row >= 0]] = np.flatnonzero(upsert_old_row >= 0)
    at_upserted = stays & (upsert_at[:n] >= 0)
    source = np.where(stays, np.arange(n), -1)
    source[at_upserted] = n_old + upsert_at[:n][at_upserted]
    moved = np.flatnonzero(~stays)
    moved_ids = pd.Index(ids[moved], dtype=object)
    from_upsert, from_old = upserted.get_indexer(moved_ids), old_index.get_indexer(moved_ids)
    source[moved] = np.where(from_upsert >= 0, n_old + from_upsert, from_old)
    is_deleted = np.zeros(n_old + len(upsert_ids) + 1, bool)  # [-1]: False
    is_deleted[deleted_old_row] = True
    # an old item that moved must not also have stayed at its old row
    also_stayed = (from_old >= 0) & (from_old < n) & stays[np.clip(from_old, 0, max(0, n - 1))]
    if (n != expected_count or (source < 0).any() or is_deleted[source].any()
            or not moved_ids.is_unique or also_stayed.any()
            or len(new.vectors) != n or len(new.tensors["datapoint_to_token"]) != n):
        raise IndexStateError("ScaNN refresh: the refreshed index does not hold exactly the "
                              "expected items")
    # (unique, all expected, as many as expected: exactly the expected items)
    wrong = np.zeros(n, bool)
    shared = min(n, n_old)
    wrong[:shared] = _rows_differ(new.vectors[:shared], old.vectors[:shared])
    rest = np.flatnonzero(~stays | at_upserted)   # rows not expected to hold their old vector
    if len(rest):
        src = source[rest]
        fresh = src >= n_old
        want = np.empty((len(rest), new.vectors.shape[1]), new.vectors.dtype)
        want[~fresh] = old.vectors[src[~fresh]]
        want[fresh] = upsert_vectors[src[fresh] - n_old]
        wrong[rest] = _rows_differ(new.vectors[rest], want)
    if wrong.any():
        bad = int(np.flatnonzero(wrong)[0])
        raise IndexStateError(f"ScaNN refresh: row {bad} (item {ids[bad]}) does not hold "
                              "its expected vector")


def _rows_differ(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N] bool: row i of ``a`` and ``b`` (same shape and dtype) differ in some
    byte (compared as integers: a NaN equals itself, -0.0 differs from 0.0)."""
    if not len(a):
        return np.zeros(0, bool)
    width = a.dtype.itemsize * int(np.prod(a.shape[1:]))
    word = np.uint64 if width % 8 == 0 else np.uint8
    a, b = (np.ascontiguousarray(x).reshape(len(x), -1).view(word) for x in (a, b))
    return (a != b).any(axis=1)


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
        return scann_ops.ScannState([as_tensor(self.tensors[f]) for f in STATE_FIELDS])


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
    # index() only checks the candidates' shape here (_StateScaNN keeps the given
    # state): an empty [n, 0] tensor instead of a copy of the [n, d] dataset
    return layer.index(tf.zeros([n, 0]), tf.range(n, dtype=tf.int64))
