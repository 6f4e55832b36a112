"""``python -m trainer.shards``: write canonical tables as sharded Parquet files.

- ``write --config C --out DIR``: the tables the config's ``data`` section
  loads as shards: ``kind: tables`` with Parquet interactions a block at a
  time (trainer.data.convert), every other kind read into memory first;
- ``generate --out DIR --users N ...``: the large synthetic world
  (trainer.data.synthetic_large), a chunk of users at a time, so a data set
  larger than memory is written with bounded memory;
- ``check DIR``: every shard against the manifest (rows, schema, sha256).

Train on a shard directory with ``data: {kind: shards, path: DIR}``
(streamed; ``stream: false`` reads it into memory), docs/DISTRIBUTED.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from trainer.data.shard_files import ShardSet, ShardWriter, write_manifest, write_tables


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.shards",
        description="Write canonical tables (interactions, users, items, ranking log) as "
                    "sharded Parquet files with a manifest, for streamed training "
                    "(data: {kind: shards, path: DIR}, docs/DISTRIBUTED.md).")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="a config's data tables as shards")
    w.add_argument("--config", type=Path, required=True, help="YAML run config (its data)")
    w.add_argument("--data-path", default=None, help="override data.path in the config")
    w.add_argument("--out", type=Path, required=True, help="shard directory to create")
    w.add_argument("--rows-per-shard", type=int, default=1_000_000,
                   help="rows per Parquet file (default 1,000,000)")
    w.add_argument("--chunk-rows", type=int, default=1 << 20,
                   help="kind: tables with Parquet interactions (no since/until): rows "
                        "converted at a time, the file is never read whole (default "
                        "1,048,576); every other data kind is read into memory first")
    g = sub.add_parser("generate", help="the large synthetic world, chunk by chunk")
    g.add_argument("--out", type=Path, required=True, help="shard directory to create")
    g.add_argument("--users", type=int, required=True, help="number of users")
    g.add_argument("--items", type=int, default=10_000, help="catalog size (default 10,000)")
    g.add_argument("--clicks-per-user", type=int, default=200, help="default 200")
    g.add_argument("--exposures-per-user", type=int, default=0,
                   help="shown-not-clicked rows per user (default 0)")
    g.add_argument("--days", type=int, default=14, help="time span (default 14 days)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chunk-users", type=int, default=1000,
                   help="users generated at a time (memory: chunk x items floats)")
    g.add_argument("--rows-per-shard", type=int, default=1_000_000,
                   help="rows per Parquet file (default 1,000,000)")
    c = sub.add_parser("check", help="check every shard against the manifest")
    c.add_argument("dir", type=Path)
    return p


def _fresh(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not empty (shards are never overwritten)")
    out.mkdir(parents=True, exist_ok=True)


def write(args) -> dict:
    from trainer.config import load_config
    from trainer.data import load_tables
    from trainer.data.convert import convert_chunked, streamable

    config = load_config(args.config, data_path=args.data_path)
    _fresh(args.out)
    if streamable(config.data):
        return convert_chunked(config.data, args.out, args.rows_per_shard, args.chunk_rows)
    return write_tables(load_tables(config.data), args.out, args.rows_per_shard)


def generate(args) -> dict:
    from trainer.data.synthetic_large import generate_chunks, generate_items

    _fresh(args.out)
    writers = {t: ShardWriter(args.out, t, args.rows_per_shard)
               for t in ("interactions", "users", "items")}
    writers["items"].append(generate_items(args.items, args.seed)[0])
    chunks = generate_chunks(args.users, args.items, args.clicks_per_user,
                             args.exposures_per_user, args.days, args.seed,
                             chunk_users=args.chunk_users)
    total = args.users * (args.clicks_per_user + args.exposures_per_user)
    with tqdm(total=total, unit="rows", desc="interactions", unit_scale=True) as bar:
        for users, interactions in chunks:
            writers["users"].append(users)
            writers["interactions"].append(interactions)
            bar.update(len(interactions))
    return write_manifest(args.out, f"synthetic-large-{args.users}u",
                          {t: w.close() for t, w in writers.items()}, {})


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from trainer.data import DataError
    from trainer.config import ConfigError

    try:
        if args.command == "check":
            shards = ShardSet.open(args.dir)
            for table in shards.manifest["tables"]:
                shards.check(table, checksums=True)
            manifest = shards.manifest
        else:
            manifest = write(args) if args.command == "write" else generate(args)
    except (ConfigError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for table, entry in manifest["tables"].items():
        n = len(entry["shards"])
        print(f"{table}: {entry['rows']:,} rows in {n} shard{'s' * (n != 1)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
