"""``twotower-client`` / ``python -m serving.client_cli``: ask a served retrieval model.

    twotower-client --target localhost:8500 --feature user_id=u12 --feature age=31 \\
        --feature favorite_genres='action|drama' --k 10
    twotower-client --rest http://localhost:8501 --users-table run/users.parquet \\
        --user-id u12 --seen i3,i9 --json
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from serving.client import ClientError, RetrievalClient


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="twotower-client",
        description="Top-k items for one user from a retrieval model served by TensorFlow "
                    "Serving (or python -m serving), over gRPC or REST.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--target", default=None,
                       help="gRPC address host:port (default localhost:8500)")
    where.add_argument("--rest", metavar="URL", default=None,
                       help="use REST instead, e.g. http://localhost:8501")
    p.add_argument("--model", default="retrieval",
                   help="served model name (retrieval or retrieval_exact; default retrieval)")
    p.add_argument("--feature", action="append", default=[], metavar="NAME=VALUE",
                   help="a raw user feature (repeatable); multi-valued features as 'a|b'")
    p.add_argument("--users-table", metavar="PATH",
                   help="read the user's features from a table (.parquet or .csv), "
                        "e.g. the run's users.parquet")
    p.add_argument("--user-id", help="the user to look up in --users-table")
    p.add_argument("--user-id-column", default="user_id",
                   help="the id column of --users-table (default user_id)")
    p.add_argument("--seen", default="", metavar="I1,I2",
                   help="comma-separated item ids to exclude (uses retrieve_excluding)")
    p.add_argument("--k", type=int, default=None, help="how many items (default: all served)")
    version = p.add_mutually_exclusive_group()
    version.add_argument("--version", type=int, default=None, help="a specific model version")
    version.add_argument("--label", default=None, help="a version label (e.g. stable)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per attempt (10)")
    p.add_argument("--retries", type=int, default=3,
                   help="retries on UNAVAILABLE / RESOURCE_EXHAUSTED (3)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _table_features(path: str, user_id: str, id_column: str, names: list[str]) -> dict:
    import pandas as pd  # only the --users-table path needs it

    # a CSV is read as text ("02134" stays "02134", an empty cell is ""); the
    # client converts each feature to its signature dtype
    table = pd.read_csv(path, dtype=str, keep_default_na=False) if path.endswith(".csv") \
        else pd.read_parquet(path)
    if id_column not in table.columns:
        raise ClientError(f"{path}: no column '{id_column}' (columns: {list(table.columns)})")
    rows = table[table[id_column].astype(str) == str(user_id)]
    if rows.empty:
        raise ClientError(f"{path}: no user with {id_column} == {user_id!r}")
    missing = [n for n in names if n not in table.columns]
    if missing:
        raise ClientError(f"{path}: no column(s) {missing}, which the model reads")
    row = rows.iloc[0]
    return {n: ("" if _isna(row[n]) else row[n]) for n in names}


def _isna(value) -> bool:
    try:
        return bool(value != value)   # NaN
    except (TypeError, ValueError):
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.users_table and not args.user_id:
        _parser().error("--users-table needs --user-id")
    if args.user_id and not args.users_table:
        _parser().error("--user-id needs --users-table")
    if not args.users_table and not args.feature:
        _parser().error("give the user's features: --feature NAME=VALUE ... or "
                        "--users-table PATH --user-id ID")
    features = {}
    for item in args.feature:
        name, sep, value = item.partition("=")
        if not sep or not name:
            _parser().error(f"--feature expects NAME=VALUE, got {item!r}")
        features[name] = value
    seen = [s.strip() for s in args.seen.split(",") if s.strip()] or None
    transport, target = ("rest", args.rest) if args.rest else \
        ("grpc", args.target or "localhost:8500")
    try:
        with RetrievalClient(target, model_name=args.model, transport=transport,
                             timeout_s=args.timeout, retries=args.retries,
                             version=args.version, version_label=args.label) as client:
            if args.users_table:
                table = _table_features(args.users_table, args.user_id, args.user_id_column,
                                        client.feature_names())
                features = {**table, **features}   # --feature overrides the table
            results = client.recommend(features, k=args.k, seen_item_ids=seen)
            version = client.last_model_version
    except (ClientError, ValueError, OSError) as err:
        print(f"twotower-client: error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"model": args.model, "version": version,
                          "results": [{"rank": i, "item_id": r.item_id, "score": r.score}
                                      for i, r in enumerate(results, 1)]}, indent=2))
    else:
        width = max([len("item_id")] + [len(r.item_id) for r in results])
        print(f"{'rank':>4}  {'item_id':<{width}}  score")
        for i, r in enumerate(results, 1):
            print(f"{i:>4}  {r.item_id:<{width}}  {r.score:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
