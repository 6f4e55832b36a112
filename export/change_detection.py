"""Which items' vectors can differ between a published version and a new run.

An item's vector is the candidate tower applied to its catalog row, so it can
only move when the tower or the row moves. Nothing the caller says is trusted:
the new run's candidate tower is compared with the previous version's,
variable by variable and lookup table by lookup table, bit for bit.

- Everything but the item id embedding table identical (the incremental
  update of issue 13: only id embeddings trainable, MLPs frozen): an item's
  vector can only change when its id's embedding row changed, its id now maps
  to another row (vocabulary grown, an id expired or its row reclaimed), its
  catalog row changed, or it is new. Only those items are embedded again.
- Anything else differs (a dense layer, a normaliser, another feature's
  embeddings or vocabulary, the architecture): every vector may have moved,
  ``FullBuildNeeded``.

Catalog rows are compared through a 64-bit fingerprint of each item's tower
inputs (``catalog_fingerprints``), stored beside every retrieval version.
What the comparison cannot see (graph constants such as bucket boundaries) is
caught by a probe in export.incremental: a sample of the items judged
unchanged is embedded again and must come out bit-identical.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf

from export.catalog import id_index
from export.run_artifacts import feature_columns, string_values

FINGERPRINTS_FILE = "catalog_fingerprints.parquet"   # in a version's assets.extra/
TOWER_STATE_FILE = "candidate_tower_state.npz"       # ... beside it
_MAX_DEPTH = 12


class FullBuildNeeded(Exception):
    """An incremental export cannot be exact here; the message says why."""


# -- catalog rows ---------------------------------------------------------------------

# How ``catalog_fingerprints`` hashes, stored with the fingerprints (parquet schema
# metadata): 1 = pandas.util.hash_pandas_object over the input columns (versions
# exported before 2026-12-01; a file without the field), 2 = _input_hashes.
FINGERPRINT_FORMAT = 2
_FORMAT_KEY = b"fingerprint_format"


def catalog_fingerprints(items: pd.DataFrame, candidate_spec: list[dict],
                         fmt: int = FINGERPRINT_FORMAT) -> pd.Series:
    """uint64 per item (index: item_id) over the columns the candidate tower reads,
    coerced as the tower gets them, so two rows with equal inputs hash equal;
    ``fmt``: a FINGERPRINT_FORMAT this code knows (else FullBuildNeeded)."""
    if fmt == 1:
        table = pd.DataFrame(feature_columns(items, candidate_spec, "item table"))
        hashes = pd.util.hash_pandas_object(table, index=False).to_numpy(dtype=np.uint64)
    elif fmt == 2:
        hashes = _input_hashes(items, candidate_spec)
    else:
        raise FullBuildNeeded(f"catalog fingerprints of format {fmt}: this code knows "
                              f"formats 1 to {FINGERPRINT_FORMAT}")
    return pd.Series(hashes, index=id_index(items["item_id"]).rename("item_id"),
                     name="fingerprint")


def write_fingerprints(version_dir: Path, fingerprints: pd.Series,
                       fmt: int = FINGERPRINT_FORMAT) -> Path:
    path = Path(version_dir) / "assets.extra" / FINGERPRINTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(fingerprints.reset_index(), preserve_index=False)
    pq.write_table(table.replace_schema_metadata(
        {**(table.schema.metadata or {}), _FORMAT_KEY: str(fmt).encode()}), path)
    return path


def read_fingerprints(version_dir: Path) -> tuple[pd.Series, int]:
    """The fingerprints stored with a version and their format."""
    path = Path(version_dir) / "assets.extra" / FINGERPRINTS_FILE
    if not path.is_file():
        raise FullBuildNeeded(f"{path} is missing (the version was exported before "
                              "incremental export existed), so changed catalog rows "
                              "cannot be told apart")
    table = pq.read_table(path)
    fmt = int((table.schema.metadata or {}).get(_FORMAT_KEY, b"1"))
    table = table.to_pandas()
    return pd.Series(table["fingerprint"].to_numpy(np.uint64),
                     index=id_index(table["item_id"]).rename("item_id")), fmt


_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping)."""
    x = (x ^ (x >> np.uint64(30))) * _MIX[0]
    x = (x ^ (x >> np.uint64(27))) * _MIX[1]
    return x ^ (x >> np.uint64(31))


def _input_hashes(items: pd.DataFrame, candidate_spec: list[dict]) -> np.ndarray:
    """Format 2: uint64 [n] over each feature's value in spec order, vectorised
    (numpy over the values' bytes, no per-row Python): a string's UTF-8 bytes in
    8-byte words, each word mixed with its position, summed, mixed with the
    length; a number's bits. The columns are combined in order, each salted with
    its position. Same inputs, same hash, in any process."""
    numbers = [f for f in candidate_spec if f["dtype"] != "string"]
    numeric = feature_columns(items, numbers, "item table")   # coerced, checked
    strings = [f["name"] for f in candidate_spec if f["dtype"] == "string"]
    feature_columns(items.iloc[:0], [f for f in candidate_spec if f["name"] in strings],
                    "item table")   # names every missing column as the tower would
    out = np.zeros(len(items), np.uint64)
    for i, f in enumerate(candidate_spec):
        salt = np.uint64((i + 1) * 0x9E3779B97F4A7C15 % 2**64)
        if f["dtype"] == "string":
            h = _string_hashes(pa.array(string_values(items[f["name"]]), pa.large_string()),
                               salt)
        else:
            v = np.ascontiguousarray(numeric[f["name"]])
            h = _mix(v.view(f"u{v.itemsize}").astype(np.uint64) ^ salt)
        out = _mix(out * np.uint64(0x100000001B3) + h)
    return out


def _string_hashes(arr, salt: np.uint64, chunk: int = 1 << 16) -> np.ndarray:
    """uint64 per string of a pyarrow large_string array without nulls, ``chunk``
    strings at a time (small temporaries: fresh memory is what costs here)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    out = np.empty(len(arr), np.uint64)
    for start in range(0, len(arr), chunk):
        part = arr.slice(start, chunk)
        _, offsets, data = part.buffers()
        offsets = np.frombuffer(offsets, np.int64, len(part) + 1, part.offset * 8)
        first, last = int(offsets[0]), int(offsets[-1])
        data = (np.frombuffer(data, np.uint8, last - first, first) if last > first
                else np.zeros(0, np.uint8))
        lengths = np.diff(offsets)
        pos = np.arange(len(data)) - np.repeat(offsets[:-1] - first, lengths)  # in its string
        shifted = data.astype(np.uint64) << ((pos & 7) * 8).astype(np.uint64)
        word_starts = np.flatnonzero((pos & 7) == 0)
        words = (np.bitwise_or.reduceat(shifted, word_starts) if len(word_starts)
                 else np.zeros(0, np.uint64))
        mixed = _mix(words ^ _mix((pos[word_starts] >> 3).astype(np.uint64) ^ salt))
        total = np.concatenate([np.zeros(1, np.uint64), np.cumsum(mixed, dtype=np.uint64)])
        bounds = np.concatenate([[0], np.cumsum((lengths + 7) // 8)])
        out[start:start + len(part)] = _mix((total[bounds[1:]] - total[bounds[:-1]])
                                            ^ _mix(lengths.astype(np.uint64) + salt))
    return out


# -- towers ---------------------------------------------------------------------------

@dataclass
class TowerState:
    """A restored tower's variables and lookup tables, by canonical object path
    (the shortest path from the tower's root; the same for the same architecture)."""
    variables: dict[str, np.ndarray]
    tables: dict[str, tuple[np.ndarray, np.ndarray]]  # path -> (keys, values), sorted by key
    paths: dict[str, list[str]] = field(default_factory=dict)  # canonical -> every path
    unreadable_tables: list[str] = field(default_factory=list)
    objects: dict[str, object] = field(default_factory=dict)  # canonical -> variable/table

    def id_embedding(self, id_feature: str) -> str:
        """Canonical path of the item id embedding table (FullBuildNeeded unless one)."""
        return _one(self, self.variables, id_feature, "embedding table",
                    lambda v: v.ndim == 2 and v.dtype.kind == "f")

    def id_vocabulary(self, id_feature: str) -> str:
        """Canonical path of the item id lookup table (FullBuildNeeded unless one)."""
        return _one(self, self.tables, id_feature, "vocabulary", lambda t: len(t[0]) > 0)


def tower_root(loaded):
    """The object holding ``embed`` and ``tower``: a run's ``towers/candidate`` as
    loaded, or the ``tower`` inside an exported ``candidate_tower`` module."""
    for obj in (loaded, getattr(loaded, "tower", None)):
        if obj is not None and hasattr(obj, "embed") and hasattr(obj, "tower"):
            return obj
    raise FullBuildNeeded("the candidate tower SavedModel has no embed()/tower to compare")


def tower_state(loaded) -> TowerState:
    """Walk a restored tower's object graph (every path to every variable/table)."""
    found, paths = {}, {}

    def walk(obj, path, on_path, depth):
        if isinstance(obj, tf.Variable) or _is_table(obj):
            found[id(obj)] = obj
            paths.setdefault(id(obj), []).append(path)
            return
        if depth > _MAX_DEPTH or id(obj) in on_path or not hasattr(obj, "_trackable_children"):
            return
        try:
            children = obj._trackable_children()
        except (TypeError, ValueError, AttributeError):
            return
        for name in sorted(children):
            walk(children[name], f"{path}/{name}" if path else name, on_path | {id(obj)},
                 depth + 1)

    walk(tower_root(loaded), "", frozenset(), 0)
    state = TowerState({}, {})
    for key, obj in found.items():
        canonical = min(paths[key], key=lambda p: (len(p), p))
        state.paths[canonical] = sorted(paths[key])
        state.objects[canonical] = obj
        if isinstance(obj, tf.Variable):
            state.variables[canonical] = obj.numpy()
        else:
            exported = _export_table(obj)
            if exported is None:
                state.unreadable_tables.append(canonical)
            else:
                state.tables[canonical] = exported
    return state


def _is_table(obj) -> bool:
    return (hasattr(obj, "resource_handle") and not isinstance(obj, tf.Variable)
            and ("Table" in type(obj).__name__ or type(obj).__name__ == "RestoredResource"))


def _export_table(table):
    """(keys, values) sorted by key of a string/int64 -> int64 lookup table, or None."""
    for key_dtype in (tf.string, tf.int64):
        try:
            keys, values = tf.raw_ops.LookupTableExportV2(
                table_handle=table.resource_handle, Tkeys=key_dtype, Tvalues=tf.int64)
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError,
                tf.errors.NotFoundError, tf.errors.FailedPreconditionError):
            continue
        keys = keys.numpy()
        keys = keys.astype(str).astype(object) if key_dtype == tf.string else keys
        order = np.argsort(keys, kind="stable")
        return keys[order], values.numpy()[order]
    return None


def write_tower_state(version_dir: Path, state: TowerState) -> Path:
    """The candidate tower's variables and tables, beside the version that was
    built with it: the next incremental export compares against this file
    instead of loading that tower's SavedModel again (seconds at every update)."""
    arrays = {"paths": np.array(json.dumps(state.paths))}
    for i, (path, value) in enumerate(sorted(state.variables.items())):
        arrays[f"variable{i}"], arrays[f"variable{i}_path"] = value, np.array(path)
    for i, (path, (keys, values)) in enumerate(sorted(state.tables.items())):
        arrays[f"table{i}_keys"] = keys.astype(str) if keys.dtype == object else keys
        arrays[f"table{i}_values"], arrays[f"table{i}_path"] = values, np.array(path)
    out = Path(version_dir) / "assets.extra" / TOWER_STATE_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    return out


def read_tower_state(version_dir: Path) -> TowerState | None:
    """The state ``write_tower_state`` stored with a version, or None (older version)."""
    path = Path(version_dir) / "assets.extra" / TOWER_STATE_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as f:
        state = TowerState({}, {}, paths=json.loads(str(f["paths"])))
        for name in f.files:
            if name.startswith("variable") and name.endswith("_path"):
                state.variables[str(f[name])] = f[name[:-len("_path")]]
            elif name.startswith("table") and name.endswith("_path"):
                stem = name[:-len("_path")]
                keys = f[f"{stem}_keys"]
                state.tables[str(f[name])] = (keys.astype(object) if keys.dtype.kind == "U"
                                              else keys, f[f"{stem}_values"])
    return state


@dataclass
class IdRowChanges:
    """How the item id embedding table moved between two towers."""
    variable: str                 # its canonical path
    old_rows: pd.Series           # item id -> row, in the old vocabulary
    new_rows: pd.Series           # ... in the new one
    changed_rows: np.ndarray      # bool [new table rows]: content differs or the row is new
    oov_changed: bool             # an out-of-vocabulary row changed

    def items_moved(self, item_ids: pd.Index) -> np.ndarray:
        """bool [n]: the item's id embedding differs between the towers
        (``item_ids``: str; the vocabularies are looked up, not the ids hashed
        into a new table)."""
        old, new = (np.where(pos >= 0, rows.to_numpy()[np.maximum(pos, 0)], -1)
                    for rows in (self.old_rows, self.new_rows)
                    for pos in [rows.index.get_indexer(item_ids)])
        in_old, in_new = old >= 0, new >= 0
        rows = np.maximum(new, 0)
        moved = (in_old != in_new) | (in_new & (old != new))
        moved |= in_new & self.changed_rows[rows]
        moved |= ~in_old & ~in_new & self.oov_changed
        return moved


def compare_towers(old: TowerState, new: TowerState, id_feature: str) -> IdRowChanges:
    """The id embedding changes, if nothing else differs; else FullBuildNeeded."""
    if set(old.variables) != set(new.variables) or set(old.tables) != set(new.tables):
        raise FullBuildNeeded("the candidate towers' variables or tables differ in name "
                              "(architecture changed)")
    variable, table = new.id_embedding(id_feature), new.id_vocabulary(id_feature)
    for path, value in new.variables.items():
        before = old.variables[path]
        if path == variable:
            if before.shape[1:] != value.shape[1:]:
                raise FullBuildNeeded(f"the item id embedding table {path} changed width")
        elif before.shape != value.shape or before.tobytes() != value.tobytes():
            raise FullBuildNeeded(f"candidate tower variable {path} differs (only the item "
                                  "id embeddings may change in an incremental export)")
    for path, (keys, values) in new.tables.items():
        old_keys, old_values = old.tables[path]
        if path != table and not (np.array_equal(keys, old_keys)
                                  and np.array_equal(values, old_values)):
            raise FullBuildNeeded(f"candidate tower lookup table {path} differs (another "
                                  "feature's vocabulary changed)")
    before, after = old.variables[variable], new.variables[variable]
    common = min(len(before), len(after))
    changed = np.ones(len(after), bool)
    changed[:common] = (before[:common] != after[:common]).any(axis=1)
    old_keys, old_values = old.tables[table]
    new_keys, new_values = new.tables[table]
    old_oov = set(range(common)) - set(old_values.tolist())
    new_oov = set(range(len(after))) - set(new_values.tolist())
    if old_oov != {r for r in new_oov if r < common}:
        raise FullBuildNeeded(f"the out-of-vocabulary rows of {table} changed")
    return IdRowChanges(
        variable,
        pd.Series(old_values, index=id_index(old_keys)),
        pd.Series(new_values, index=id_index(new_keys)),
        changed, bool(any(changed[r] for r in new_oov)))


def _one(state: TowerState, candidates: dict, id_feature: str, what: str, accept) -> str:
    """The single candidate reachable through a path with a component ``id_feature``."""
    hits = [p for p, v in candidates.items() if accept(v)
            and any(id_feature in q.split("/") for q in state.paths[p])]
    if len(hits) != 1:
        raise FullBuildNeeded(f"expected one item id ({id_feature!r}) {what} in the candidate "
                              f"tower, found {len(hits)}: {hits[:4]}")
    return hits[0]


# -- the plan -------------------------------------------------------------------------

def rows_of(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """int64 [len(ids)]: the position of each of ``ids`` in ``table``, -1 where
    absent (each array without duplicates).

    Where both hold the same id at the same position it is taken as it is (one
    vectorised comparison); only the rest is hashed. An update keeps almost
    every item at its row, so at 1M items this costs tens of ms instead of a
    1M-entry hash table (~0.3 s) per lookup.
    """
    ids, table = np.asarray(ids, dtype=object), np.asarray(table, dtype=object)
    m = min(len(ids), len(table))
    same = ids[:m] == table[:m]
    out = np.full(len(ids), -1, np.int64)
    out[:m][same] = np.flatnonzero(same)
    rest = np.concatenate([np.flatnonzero(~same), np.arange(m, len(ids))])
    others = np.concatenate([np.flatnonzero(~same), np.arange(m, len(table))])
    if len(rest) and len(others):   # (no others: the rest are all absent from table)
        found = pd.Index(table[others], dtype=object).get_indexer(ids[rest])
        out[rest] = np.where(found >= 0, others[np.maximum(found, 0)], -1)
    return out


@dataclass
class UpdatePlan:
    """Item ids to embed again, to delete, and why (counts may overlap); the
    ``*_rows`` are the new catalog's rows of ``reembed`` / ``unchanged`` and
    ``*_index_rows`` their rows in the previous index (-1: a new item)."""
    reembed: np.ndarray
    deleted: np.ndarray
    unchanged: np.ndarray
    reasons: dict[str, int]
    reembed_rows: np.ndarray
    reembed_index_rows: np.ndarray
    unchanged_rows: np.ndarray
    unchanged_index_rows: np.ndarray


def plan_update(index_ids: np.ndarray, old_fingerprints: pd.Series,
                new_fingerprints: pd.Series, id_changes: IdRowChanges) -> UpdatePlan:
    """Compare the previous index's items with the new catalog (ids matched by
    position where they line up, ``rows_of``; fingerprints and ids unique)."""
    index_ids = id_index(index_ids).to_numpy()
    fp_row = rows_of(index_ids, old_fingerprints.index.to_numpy(dtype=object))
    if len(index_ids) != len(old_fingerprints) or (fp_row < 0).any():
        raise FullBuildNeeded("the previous version's catalog fingerprints do not list "
                              "exactly its index's items")
    new_ids = new_fingerprints.index.to_numpy(dtype=object)
    row = rows_of(new_ids, index_ids)             # new item -> previous index row
    is_new = row < 0
    old_fp = old_fingerprints.to_numpy()[fp_row][np.maximum(row, 0)]
    row_changed = ~is_new & (old_fp != new_fingerprints.to_numpy())
    id_moved = id_changes.items_moved(new_fingerprints.index)
    reembed = is_new | row_changed | id_moved
    kept = np.zeros(len(index_ids), bool)
    kept[row[~is_new]] = True
    return UpdatePlan(
        reembed=new_ids[reembed], deleted=index_ids[~kept], unchanged=new_ids[~reembed],
        reasons={"new_items": int(is_new.sum()), "catalog_rows_changed": int(row_changed.sum()),
                 "id_embedding_changed": int((id_moved & ~is_new).sum())},
        reembed_rows=np.flatnonzero(reembed), reembed_index_rows=row[reembed],
        unchanged_rows=np.flatnonzero(~reembed), unchanged_index_rows=row[~reembed])
