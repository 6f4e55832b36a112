"""Training on sharded interactions streamed from disk (``data: {kind: shards}``).

The interactions never sit in memory whole: ``prepare_streamed`` reads the
shard files (trainer.data.shard_files) in blocks of 65,536 rows and keeps
only per-entity counts, and ``StreamingBatches`` streams them through
tf.data for every epoch. What is held in memory: the users and items tables
(their feature columns feed the towers, as in the in-memory path), one
float per user and item, the test slice and the training clicks of the
test users (evaluation), and the training split's exposed-not-clicked
(user, item) pairs, 8 bytes each, that mask the in-batch negatives
(docs/DISTRIBUTED.md).

The streamed pass gives exactly what the in-memory path computes from its
tables (tests/test_streaming_input.py checks it): the temporal split's
boundary (from the manifest's largest timestamp), the users and items with
a training click (the encoders adapt their vocabularies and statistics on
those rows of the users / items tables, as ``build_model`` always does),
and the item click counts behind the logQ correction (or
``objective.logq: streaming`` estimates them in-graph instead).

Per worker, the input is sharded by FILE (``assign_files``): under
``--strategy multi_worker`` input pipeline k of n reads files k, k + n, ...
Shuffling, every epoch anew: the worker's files in random order, read
``cycle_length`` at a time; each block of 65,536 rows permuted, cut into
chunks of ``CHUNK_ROWS`` rows, and the chunks of all open files mixed in a
shuffle buffer of ``data.shuffle_buffer`` rows.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf

from trainer import sampling as S
from trainer.batches import TrainingBatches
from trainer.config import RunConfig
from trainer.data.shard_files import ShardSet, iter_frames
from trainer.data.tables import DataError, Tables
from trainer.evaluation import EvalSet
from trainer.objective_registry import NegativesPlan
from trainer.prepare import EncodedTables, PreparedData, Splits

log = logging.getLogger(__name__)
_DAY = 86_400
_CLICK_COLUMNS = ["user_id", "item_id", "timestamp", "clicked"]
# Rows the streamed input moves as one element: shuffling whole chunks keeps
# tf.data's per-element cost off the rows (measured on 2 cores: 216K rows/s,
# against 72K with a buffer of single rows).
CHUNK_ROWS = 256


def assign_files(files: list, num_shards: int, index: int) -> list:
    """Input pipeline ``index`` of ``num_shards``: files index, index + n, ...
    (each file read by exactly one pipeline)."""
    if len(files) < num_shards:
        raise ValueError(f"{len(files)} interaction shard files for {num_shards} input "
                         "pipelines: every worker needs at least one file (write the "
                         "shards with a smaller --rows-per-shard)")
    return list(files[index::num_shards])


class _Rows:
    """Maps a block's id strings to table rows; an unknown id is an error naming
    the file and its row (``offset`` + the frame's index: 0-based, in the file)."""

    def __init__(self, encoded: EncodedTables):
        self.users, self.items = encoded.user_index, encoded.item_index

    def __call__(self, frame: pd.DataFrame, path: Path, offset: Optional[int]):
        u = self.users.get_indexer(frame["user_id"])
        i = self.items.get_indexer(frame["item_id"])
        for rows, col in ((u, "user_id"), (i, "item_id")):
            if (rows < 0).any():
                k = int(np.flatnonzero(rows < 0)[0])
                table = "users" if col == "user_id" else "items"
                where = ("a test row" if offset is None
                         else f"row {offset + int(frame.index[k])}")
                raise DataError(f"{path}: {where}: {col} {frame[col].iloc[k]!r} is not in "
                                f"the {table} table")
        return u.astype(np.int64), i.astype(np.int64)


def train_blocks(path: Path, boundary: float
                 ) -> Iterator[tuple[int, pd.DataFrame, pd.DataFrame]]:
    """(row offset of the block in the file, its clicked training rows, its
    exposed-not-clicked training rows) of one shard, a block at a time."""
    offset = 0
    for frame in iter_frames(path, _CLICK_COLUMNS):
        train = frame["timestamp"].to_numpy() <= boundary
        clicked = frame["clicked"].to_numpy()
        yield offset, frame[train & (clicked == 1)], frame[train & (clicked == 0)]
        offset += len(frame)


def train_clicks(path: Path, boundary: float) -> Iterator[tuple[int, pd.DataFrame]]:
    """(row offset of the block in the file, its clicked training rows) of one
    shard: what every epoch streams, so the exposures are not sliced out too."""
    offset = 0
    for frame in iter_frames(path, _CLICK_COLUMNS):
        keep = (frame["timestamp"].to_numpy() <= boundary) & (frame["clicked"].to_numpy() == 1)
        yield offset, frame[keep]
        offset += len(frame)


@dataclass(frozen=True)
class StreamedData(PreparedData):
    """``PreparedData`` whose training clicks stay on disk.

    ``splits`` has only ``test`` (the clicked test slice, in memory, also
    ``tables.interactions``);
    ``train_positives``, ``known`` and ``exposed`` are None. ``user_counts`` /
    ``item_counts`` [users] / [items]: training clicks per row;
    ``known_rows``: (user rows, item rows) of the test users' training
    clicks (excluded from their rankings); ``boundary``: training rows have
    ``timestamp <= boundary``; ``exposures``: the training split's
    exposed-not-clicked (user row, item row) pairs, never the user's in-batch
    negatives (an ``ExclusionSet``, 8 bytes a pair; None without exposures).
    """

    shards: ShardSet = None
    boundary: float = 0.0
    user_counts: np.ndarray = None
    known_rows: tuple = ()
    exposures: Optional[S.ExclusionSet] = None
    shuffle_buffer: int = 100_000

    @property
    def num_train_positives(self) -> int:
        return int(self.item_counts.sum())

    def train_rows(self):
        raise TypeError("streamed data: the training rows are read from the shards "
                        "(trainer.streaming.StreamingBatches), not held in memory")

    def trained_users(self) -> pd.DataFrame:
        return self.tables.users[self.user_counts > 0]

    def trained_items(self) -> pd.DataFrame:
        return self.tables.items[self.item_counts > 0]

    def validation_set(self) -> Optional[EvalSet]:
        return None

    def test_set(self) -> EvalSet:
        tu, ti = self.encoded.rows(self.splits.test)
        su, si = self.known_rows
        return EvalSet(tu, ti, su, si, len(self.encoded.item_index), self.item_counts)

    def seen_clicks(self) -> Iterator[pd.DataFrame]:
        """The training clicks (user_id, item_id, timestamp), a block at a time."""
        for path in self.shards.files("interactions"):
            for _, frame in train_clicks(path, self.boundary):
                yield frame[["user_id", "item_id", "timestamp"]]


def prepare_streamed(config: RunConfig) -> StreamedData:
    """The streamed counterpart of ``prepare_data`` (temporal protocol only,
    checked by the config): two passes over the shards, bounded memory."""
    shards = ShardSet.open(config.data.path)
    for table in ("interactions", "users", "items"):
        shards.check(table)
    users, items = shards.read("users"), shards.read("items")
    users["user_id"], items["item_id"] = users["user_id"].astype(str), items["item_id"].astype(str)
    encoded = EncodedTables.build(users, items, config.features.user, config.features.item)
    boundary = shards.max_timestamp - config.evaluation.test_days * _DAY
    files, rows = shards.files("interactions"), _Rows(encoded)
    test = pd.concat([_test_clicks(path, boundary, rows) for path in files],
                     ignore_index=True)
    test = test.sort_values("timestamp", kind="stable").reset_index(drop=True)
    user_counts = np.zeros(len(encoded.user_index))
    item_counts = np.zeros(len(encoded.item_index))
    is_test_user = np.zeros(len(encoded.user_index), bool)
    is_test_user[encoded.rows(test)[0]] = True
    num_items = len(item_counts)
    _check_keys_fit(len(user_counts), num_items, config.data.path)
    known_u, known_i = [], []
    exposed = np.zeros(0, np.int64)
    for path in files:
        file_exposed = []
        for offset, clicks, shown in train_blocks(path, boundary):
            u, i = rows(clicks, path, offset)
            user_counts += np.bincount(u, minlength=len(user_counts))
            item_counts += np.bincount(i, minlength=num_items)
            mine = is_test_user[u]
            known_u.append(u[mine])
            known_i.append(i[mine])
            eu, ei = rows(shown, path, offset)
            file_exposed.append(np.unique(eu * num_items + ei))
        if file_exposed:   # distinct per file, then merged: memory ~ the distinct pairs
            exposed = np.union1d(exposed, np.concatenate(file_exposed))
    if not len(test) or not item_counts.sum():
        raise ValueError(f"temporal split with test_days={config.evaluation.test_days} "
                         f"leaves an empty train or test set ({config.data.path})")
    tables = Tables(test, users, items, name=shards.manifest["name"],
                    notes=shards.manifest.get("notes", {}))
    splits = Splits(None, None, test, None, None)
    return StreamedData(tables, splits, encoded, item_counts, NegativesPlan(),
                        shards=shards, boundary=boundary, user_counts=user_counts,
                        known_rows=(np.concatenate(known_u), np.concatenate(known_i)),
                        exposures=S.ExclusionSet.from_keys(exposed, num_items)
                        if len(exposed) else None,
                        shuffle_buffer=config.data.shuffle_buffer)


def _check_keys_fit(num_users: int, num_items: int, where) -> None:
    """Exposure keys are user * num_items + item in int64: refuse what overflows."""
    if num_users * num_items >= 2 ** 63:
        raise DataError(f"{where}: {num_users:,} users x {num_items:,} items do not fit "
                        "the int64 (user, item) keys of the exposures mask")


def _test_clicks(path: Path, boundary: float, rows: _Rows) -> pd.DataFrame:
    """The clicked rows after ``boundary`` of one shard (a filtered read), their
    ids checked against the tables."""
    try:
        table = pq.read_table(path, columns=["user_id", "item_id", "timestamp"],
                              filters=[("timestamp", ">", boundary), ("clicked", "=", 1)])
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: cannot read the shard ({err})") from None
    frame = table.to_pandas().astype({"user_id": str, "item_id": str})
    rows(frame, path, None)
    return frame


class StreamingBatches(TrainingBatches):
    """``TrainingBatches``' in-batch batches, their (user row, item row) pairs
    streamed from the shard files instead of held in memory.

    Same batch dict (``query``, ``candidate``, ``item_prob``, ``item_row``,
    ``user_row`` and, when the training split has exposures, ``score_mask``)
    from the same code: the mask is ``TrainingBatches.score_mask`` over the
    exposures the counting pass collected (``StreamedData.exposures``),
    so a user's exposed-not-clicked items are never its in-batch negatives.
    """

    def __init__(self, prepared: StreamedData, config: RunConfig, cycle_length: int = 4):
        self.encoded, self.config, self.prepared = prepared.encoded, config, prepared
        self.batch_kind, self.plan = "in_batch", prepared.negatives
        counts = prepared.item_counts
        self.keep = np.ones(len(counts), np.float32)
        self.item_prob = S.effective_item_probability(counts, self.keep)
        self.catalog = S.CatalogSampler(counts, config.sampling.negatives.alpha)
        self.exclusion = self.ranking_log = None   # per-query / extras: refused
        self.exposures = prepared.exposures
        self.history = self.labelled = None
        self.cycle_length = cycle_length
        self._rows = _Rows(prepared.encoded)

    @property
    def num_rows(self) -> int:
        return self.prepared.num_train_positives

    def dataset(self, batch_size: int, seed: int, shuffle: bool = True,
                shard: tuple[int, int] = (1, 0), drop_remainder: bool = False
                ) -> tf.data.Dataset:
        """Batches of ``batch_size`` from this pipeline's files (``shard`` =
        (num_pipelines, index), ``assign_files``)."""
        num_shards, index = shard
        files = assign_files([str(p) for p in self.prepared.shards.files("interactions")],
                             num_shards, index)
        log.info("input pipeline %d of %d streams %d shard files: %s", index, num_shards,
                 len(files), ", ".join(Path(f).name for f in files))
        self._hold_tables(seed)
        ds = tf.data.Dataset.from_tensor_slices(files)
        if shuffle:
            ds = ds.shuffle(len(files), seed=seed + index, reshuffle_each_iteration=True)
        spec = (tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64))
        seeds = self._seeds(seed + 3 + 7919 * index).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).interleave(
            lambda path, s: tf.data.Dataset.from_generator(
                self._file_chunks, args=(path, s, shuffle), output_signature=spec),
            cycle_length=min(self.cycle_length, len(files)),
            num_parallel_calls=tf.data.AUTOTUNE)
        if shuffle:
            ds = ds.shuffle(max(1, self.prepared.shuffle_buffer // CHUNK_ROWS),
                            seed=seed + index, reshuffle_each_iteration=True)
        ds = ds.unbatch().batch(batch_size, drop_remainder)
        ds = tf.data.Dataset.zip((ds, self._seeds(seed + 1 + 7919 * index)))
        ds = ds.map(lambda ui, r: self._batch(ui[0], ui[1], r),
                    num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

    def _file_chunks(self, path: bytes, seed: np.ndarray, shuffle: bool
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(user rows, item rows) of one file's training clicks, ``CHUNK_ROWS`` at a
        time; with ``shuffle``, each block of the file permuted (``seed`` [2])."""
        path = Path(path.decode())
        rng = np.random.default_rng([int(x) & 0xFFFFFFFF for x in seed])
        for offset, frame in train_clicks(path, self.prepared.boundary):
            u, i = self._rows(frame, path, offset)
            if shuffle:
                order = rng.permutation(len(u))
                u, i = u[order], i[order]
            for start in range(0, len(u), CHUNK_ROWS):
                yield u[start:start + CHUNK_ROWS], i[start:start + CHUNK_ROWS]
