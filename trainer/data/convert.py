"""A ``kind: tables`` data set whose interactions are a Parquet file, written as
shards a block at a time (``python -m trainer.shards write``).

The interactions file is never read whole: each block of ``chunk_rows`` rows
is mapped (``columns:``), made canonical and appended to the shard writer;
the ids seen are kept so that users / items without a table row get one (as
``load_tables`` does). The users, items and ranking-log tables are read into
memory. The result equals writing ``load_tables``' tables (tested).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainer.config import GenericData
from trainer.data.loading import load_entities
from trainer.data.readers import column_renames, require_file
from trainer.data.shard_files import ShardWriter, write_manifest
from trainer.data.tables import (DataError, RowError, canonical_interactions,
                                 ensure_entity_table)


def streamable(data) -> bool:
    """Whether ``convert_chunked`` can write this data config."""
    return (isinstance(data, GenericData) and data.since is None and data.until is None
            and Path(data.interactions.path).suffix.lower() in (".parquet", ".pq"))


def convert_chunked(data: GenericData, out: Path, rows_per_shard: int,
                    chunk_rows: int = 1 << 20) -> dict:
    """Write the tables of ``data`` as shards under ``out``; the manifest."""
    path = require_file(Path(data.interactions.path), "a Parquet interactions table")
    try:
        handle = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    renames = column_renames(path, handle.schema_arrow.names, data.interactions.columns,
                             ("user_id", "item_id"))
    writer = ShardWriter(out, "interactions", rows_per_shard)
    user_ids, item_ids, offset = {}, {}, 0   # ordered sets: ids by first appearance
    for batch in handle.iter_batches(batch_size=chunk_rows):
        frame = batch.to_pandas().rename(columns=renames)
        try:
            rows = canonical_interactions(frame, str(path))
        except RowError as err:
            raise DataError(f"{path}: row {offset + err.rows[-1]} column '{err.column}': "
                            f"{err.problem}") from None
        writer.append(rows)
        user_ids.update(dict.fromkeys(rows["user_id"].unique()))
        item_ids.update(dict.fromkeys(rows["item_id"].unique()))
        offset += len(frame)
    if not offset:
        raise DataError(f"{path}: no rows (expected rows with user_id, item_id)")
    entries = {"interactions": writer.close()}
    users, items, ranking_log = load_entities(data)
    tables = {"users": ensure_entity_table(users, "user_id", np.array(list(user_ids), object)),
              "items": ensure_entity_table(items, "item_id", np.array(list(item_ids), object)),
              "ranking_log": ranking_log}
    for name, frame in tables.items():
        if frame is not None:
            table_writer = ShardWriter(out, name, rows_per_shard)
            table_writer.append(frame)
            entries[name] = table_writer.close()
    return write_manifest(out, path.stem, entries, {})
