"""Canonical tables as sharded Parquet files with a manifest (docs/DISTRIBUTED.md).

Layout of a shard directory::

    manifest.json                  format, version, name, notes, and per table:
                                   schema (column -> Arrow type), total rows,
                                   shards [{path, rows, bytes, sha256,
                                   min_timestamp, max_timestamp}]
    interactions-00000.parquet     the canonical columns (trainer.data.tables)
    users-00000.parquet, items-00000.parquet, ranking_log-00000.parquet

``ShardWriter`` takes a table chunk by chunk (``append``), so a data set
larger than memory is written one chunk at a time; it rolls to a new file
every ``rows_per_shard`` rows. Readers check every file against the manifest
(exists, rows, schema) and name the file in every error.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from trainer.data.tables import DataError, Tables

MANIFEST = "manifest.json"
FORMAT, VERSION = "twotower-shards", 1
TABLES = ("interactions", "users", "items", "ranking_log")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Writes one table as ``{table}-NNNNN.parquet`` files of ``rows_per_shard``
    rows (the last one shorter); ``close()`` returns its manifest entry."""

    def __init__(self, out: Path, table: str, rows_per_shard: int):
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.out, self.table, self.rows_per_shard = Path(out), table, rows_per_shard
        self.out.mkdir(parents=True, exist_ok=True)
        self.schema: Optional[pa.Schema] = None
        self.shards: list[dict] = []
        self._writer: Optional[pq.ParquetWriter] = None
        self._rows = 0
        self._ts: list[int] = []

    def append(self, frame: pd.DataFrame) -> None:
        """Add rows; every chunk of a table must have the first chunk's columns."""
        batch = pa.Table.from_pandas(frame, preserve_index=False)
        if self.schema is None:
            self.schema = batch.schema.remove_metadata()
        elif batch.schema.remove_metadata() != self.schema:
            raise DataError(f"{self.table}: a chunk's columns {batch.schema.names} "
                            f"({batch.schema.types}) differ from the first chunk's "
                            f"{self.schema.names} ({self.schema.types})")
        batch = batch.replace_schema_metadata(None)
        start = 0
        while start < batch.num_rows:
            if self._writer is None:
                self._open()
            take = min(self.rows_per_shard - self._rows, batch.num_rows - start)
            part = batch.slice(start, take)
            self._writer.write_table(part)
            if "timestamp" in part.column_names and take:
                ts = part.column("timestamp")
                self._ts += [pc.min(ts).as_py(), pc.max(ts).as_py()]
            self._rows += take
            start += take
            if self._rows == self.rows_per_shard:
                self._close_shard()

    def _open(self) -> None:
        name = f"{self.table}-{len(self.shards):05d}.parquet"
        self._path = self.out / name
        self._writer = pq.ParquetWriter(self._path, self.schema)
        self._rows, self._ts = 0, []

    def _close_shard(self) -> None:
        self._writer.close()
        self._writer = None
        entry = {"path": self._path.name, "rows": self._rows,
                 "bytes": self._path.stat().st_size, "sha256": _sha256(self._path)}
        if self._ts:
            entry["min_timestamp"], entry["max_timestamp"] = min(self._ts), max(self._ts)
        self.shards.append(entry)

    def close(self) -> dict:
        if self._writer is not None:
            self._close_shard()
        if self.schema is None:
            raise DataError(f"{self.table}: no rows were written")
        return {"schema": {f.name: str(f.type) for f in self.schema},
                "rows": sum(s["rows"] for s in self.shards), "shards": self.shards}


def write_manifest(out: Path, name: str, tables: dict[str, dict], notes: dict) -> dict:
    manifest = {"format": FORMAT, "version": VERSION, "name": name, "notes": notes,
                "tables": tables}
    (Path(out) / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


def write_tables(tables: Tables, out: Path, rows_per_shard: int) -> dict:
    """Write in-memory canonical ``tables`` as shards under ``out``; the manifest."""
    entries = {}
    for table in TABLES:
        frame = getattr(tables, table)
        if frame is None:
            continue
        writer = ShardWriter(out, table, rows_per_shard)
        writer.append(frame)
        entries[table] = writer.close()
    return write_manifest(out, tables.name, entries, tables.notes)


@dataclass(frozen=True)
class ShardSet:
    """A shard directory's manifest, checked: ``files(table)`` are its paths."""

    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | Path) -> "ShardSet":
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise DataError(f"{path}: no shard manifest (write one with "
                            "python -m trainer.shards write|generate)")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not JSON ({err})") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise DataError(f"{path}: not a {FORMAT} v{VERSION} manifest")
        for table in ("interactions", "users", "items"):
            if table not in manifest["tables"]:
                raise DataError(f"{path}: no '{table}' table")
        return cls(root, manifest)

    def table(self, name: str) -> Optional[dict]:
        return self.manifest["tables"].get(name)

    def files(self, name: str) -> list[Path]:
        entry = self.table(name)
        return [] if entry is None else [self.root / s["path"] for s in entry["shards"]]

    @property
    def max_timestamp(self) -> int:
        return max(s["max_timestamp"] for s in self.table("interactions")["shards"])

    def check(self, name: str, checksums: bool = False) -> None:
        """Every shard of table ``name`` exists, opens as Parquet and has the
        manifest's rows and schema (``checksums``: and its sha256)."""
        entry = self.table(name)
        for shard in entry["shards"]:
            path = self.root / shard["path"]
            meta = _parquet_file(path).metadata
            if meta.num_rows != shard["rows"]:
                raise DataError(f"{path}: {meta.num_rows} rows, the manifest says "
                                f"{shard['rows']}")
            schema = {f.name: str(f.type) for f in meta.schema.to_arrow_schema()}
            if schema != entry["schema"]:
                raise DataError(f"{path}: columns {schema} differ from the manifest's "
                                f"{entry['schema']}")
            if checksums and _sha256(path) != shard["sha256"]:
                raise DataError(f"{path}: sha256 differs from the manifest's (the file "
                                "changed after it was written)")

    def read(self, name: str, columns: Optional[Sequence[str]] = None) -> pd.DataFrame:
        """A whole table in memory (the users / items tables, or small data)."""
        frames = [frame for path in self.files(name)
                  for frame in iter_frames(path, columns)]
        return pd.concat(frames, ignore_index=True)


def _parquet_file(path: Path) -> pq.ParquetFile:
    if not path.is_file():
        raise DataError(f"{path}: shard file missing")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet shard ({err})") from None


def iter_frames(path: Path, columns: Optional[Sequence[str]] = None,
                batch_rows: int = 1 << 16) -> Iterator[pd.DataFrame]:
    """The rows of one shard file, ``batch_rows`` at a time (never the whole file)."""
    handle = _parquet_file(path)
    try:
        for batch in handle.iter_batches(batch_size=batch_rows, columns=columns):
            yield batch.to_pandas()
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: cannot read the shard ({err})") from None


def load_shards(root: str | Path) -> Tables:
    """All tables of a shard directory in memory (``data.stream: false``)."""
    shards = ShardSet.open(root)
    for name in TABLES:
        if shards.table(name) is not None:
            shards.check(name)
    log = shards.read("ranking_log") if shards.table("ranking_log") else None
    return Tables(shards.read("interactions"), shards.read("users"), shards.read("items"),
                  ranking_log=log, name=shards.manifest["name"],
                  notes=shards.manifest.get("notes", {}))
