"""``python -m export --run RUN_DIR --output MODEL_BASE``: publish served models."""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a trained run as TF Serving SavedModels "
                    "(MODEL_BASE/<model>/<version>/): query_tower, candidate_tower, "
                    "retrieval (ScaNN, tuned to a recall target) and retrieval_exact "
                    "(BruteForce). Every version is checked before it is published.")
    p.add_argument("--run", required=True, help="run directory written by python -m trainer")
    p.add_argument("--output", required=True, help="model base directory (TF Serving layout)")
    p.add_argument("--version", type=int, default=None,
                   help="version number (default: one above every existing version)")
    p.add_argument("--models", default=",".join(_all()),
                   help="comma-separated subset of models to export (default: all four)")
    p.add_argument("--items", default=None,
                   help="CSV/Parquet item table to index instead of the run's catalog "
                        "(catalog refresh without retraining; new items are embedded "
                        "from their features)")
    p.add_argument("-k", "--k", type=int, default=100, help="results per query (default 100)")
    p.add_argument("--recall-target", type=float, default=0.95,
                   help="ScaNN recall@k against exact retrieval to reach (default 0.95)")
    p.add_argument("--max-exclude", type=int, default=256,
                   help="most seen items retrieve_excluding removes per user (default 256)")
    p.add_argument("--native-check", action="store_true",
                   help="also load and warm every version with the C++ SavedModel loader")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    inc = p.add_argument_group(
        "incremental export", "refresh the previous version's ScaNN index instead of "
        "rebuilding it: only items whose vectors can have changed are embedded and "
        "upserted; falls back to a full export when that is not exact or too much changed "
        "(docs/ARTIFACTS.md, 'Incremental export')")
    inc.add_argument("--incremental-from", default=None, metavar="auto|VERSION",
                     help="published version to refresh ('auto': the newest)")
    inc.add_argument("--max-changed-fraction", type=float, default=0.1,
                     help="full export when more than this fraction of the catalog "
                          "changed (default 0.1)")
    inc.add_argument("--max-imbalance-increase", type=float, default=0.25,
                     help="full export when ScaNN's weighted relative leaf imbalance grew "
                          "by more than this since the last full build (default 0.25)")
    args = p.parse_args(argv)
    if args.incremental_from not in (None, "auto") and not args.incremental_from.isdigit():
        p.error(f"--incremental-from must be 'auto' or a version number, got "
                f"{args.incremental_from!r}")
    if not 0.0 <= args.max_changed_fraction <= 1.0:
        p.error(f"--max-changed-fraction must be in [0, 1], got {args.max_changed_fraction}")
    if args.k < 1:
        p.error(f"--k must be at least 1, got {args.k}")
    if not 0.0 < args.recall_target <= 1.0:
        p.error(f"--recall-target must be in (0, 1], got {args.recall_target}")
    if args.max_exclude < 1:
        p.error(f"--max-exclude must be at least 1, got {args.max_exclude}")
    return args


def _all():
    return ("query_tower", "candidate_tower", "retrieval", "retrieval_exact")


def main(argv=None) -> int:
    args = parse_args(argv)
    import tensorflow as tf   # after --help: it takes seconds
    if tf.get_logger().handlers:   # TF's own; absl's first log gives root one too
        tf.get_logger().propagate = False   # so each TF message prints once, not twice
    from export.exporter import ExportOptions, export_run
    from export.run_artifacts import RunError
    from export.verify import ExportCheckError
    from export.versioning import VersionError

    options = ExportOptions(
        k=args.k, recall_target=args.recall_target, max_exclude=args.max_exclude,
        models=[m.strip() for m in args.models.split(",") if m.strip()],
        version=args.version, items_path=args.items, native_check=args.native_check,
        progress=not args.no_progress)
    try:
        if args.incremental_from is None:
            result = export_run(args.run, args.output, options)
        else:
            from export.incremental import IncrementalOptions, export_incremental
            result = export_incremental(args.run, args.output, options, IncrementalOptions(
                args.incremental_from, args.max_changed_fraction,
                args.max_imbalance_increase))
    except (RunError, VersionError, ExportCheckError, ValueError, OSError) as err:
        print(f"export failed, nothing published: {err}", file=sys.stderr)
        return 2
    print(f"published version {result.version}:")
    update = next(iter(result.metadata.values()), {}).get("update")
    if update and update["kind"] == "incremental":
        from export.incremental import refresh_counts
        print(f"  incremental from version {update['base_version']}: {refresh_counts(update)}")
    elif update:
        print(f"  full export instead of incremental: {update['fallback_reason']}")
    for name, path in result.paths.items():
        meta = result.metadata[name]
        extra = ""
        if "latency" in meta:
            recall = next(v for k, v in meta.items() if k.startswith("recall@"))
            extra = (f"  recall vs exact {recall:.3f}, p50 {meta['latency']['p50_ms']} ms, "
                     f"p99 {meta['latency']['p99_ms']} ms")
        print(f"  {name:16s} {path}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
