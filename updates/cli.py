"""``python -m updates full|incremental --runs RUNS_DIR --models MODEL_BASE``."""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> int:
    """'30m', '6h', '1d', '3600' -> seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30m, 6h, 1d)")
    return int(float(m.group(1)) * _UNITS[m.group(2) or "s"])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m updates",
        description="Update the latest published model on new data and publish it as the "
                    "next served version: 'full' trains every weight on the window (default "
                    "the last day), 'incremental' only the user/item id embeddings (default "
                    "window: everything since the parent run). The candidate is published "
                    "only if its HR@K on the newest part of the window is not worse than the "
                    "served version's by more than the margin (exit 3 otherwise). 'init' "
                    "trains RUNS/initial from --config (a full run config), publishes it as "
                    "the first version and prints how to serve and query it.")
    p.add_argument("kind", choices=["init", "full", "incremental"])
    p.add_argument("--runs", type=Path, required=True,
                   help="runs directory: the latest published run (or an initial "
                        "python -m trainer run) is the parent, the new run is written here")
    p.add_argument("--models", type=Path, required=True,
                   help="served model base (TF Serving layout) to publish into")
    p.add_argument("--config", type=Path, default=None,
                   help="partial YAML config merged over the parent run's config (init: "
                        "the run config, e.g. configs/synthetic.yaml)")
    p.add_argument("--data", default=None, help="override data.path (kinds that read files)")
    p.add_argument("--until", default=None,
                   help="window end, unix seconds or ISO-8601 (default: end of the data)")
    p.add_argument("--window", type=duration, default=None,
                   help="window length, e.g. 6h, 1d (default: full 1d, incremental since "
                        "the parent)")
    p.add_argument("--epochs", type=int, default=1, help="epochs over the window (default 1)")
    p.add_argument("--holdout", type=float, default=0.1,
                   help="newest share of the window held out for the gate (default 0.1)")
    p.add_argument("--gate-k", type=int, default=10, help="the gate compares HR@K (default 10)")
    p.add_argument("--gate-margin", type=float, default=0.05,
                   help="relative HR@K loss tolerated against the served version "
                        "(default 0.05)")
    p.add_argument("--min-count", type=int, default=1,
                   help="clicks an id needs (in all data seen so far) to get its own row")
    p.add_argument("--expire-days", type=float, default=None,
                   help="ids without a click for this many days lose their row (reused by "
                        "later admissions); default: never")
    p.add_argument("--keep", type=int, default=None,
                   help="versions to keep per model after publishing (default: all)")
    p.add_argument("--model-config-file", type=Path, default=None,
                   help="the server's model config: --keep never goes below its "
                        "latest { num_versions } + 1")
    p.add_argument("-k", "--k", type=int, default=100, help="results per query (default 100)")
    p.add_argument("--recall-target", type=float, default=0.95,
                   help="ScaNN recall@k against exact (default 0.95)")
    p.add_argument("--rebuild-index", action="store_true",
                   help="incremental: build and tune the ScaNN index from scratch instead of "
                        "refreshing the served version's (a full update always rebuilds)")
    p.add_argument("--max-changed-fraction", type=float, default=0.1,
                   help="incremental: when (inserted + updated + deleted items) / the "
                        "served catalog exceeds this, the index is rebuilt instead of "
                        "refreshed (default 0.1)")
    p.add_argument("--native-check", action="store_true",
                   help="also load every version with the C++ SavedModel loader")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not 0.0 < args.holdout < 1.0:
        p.error(f"--holdout must be in (0, 1), got {args.holdout}")
    if args.kind == "init" and args.config is None:
        p.error("init needs --config (the run config to train, e.g. configs/synthetic.yaml)")
    if args.max_changed_fraction <= 0.0:
        p.error(f"--max-changed-fraction must be positive, got {args.max_changed_fraction}")
    if args.epochs < 1 or args.min_count < 1:
        p.error("--epochs and --min-count must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("updates", "trainer"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).propagate = False
    import tensorflow as tf   # after --help: it takes seconds
    if tf.get_logger().handlers:   # TF's own; absl's first log gives root one too
        tf.get_logger().propagate = False   # so each TF message prints once, not twice
    from export.run_artifacts import RunError
    from export.verify import ExportCheckError
    from export.versioning import VersionError
    from trainer.config import ConfigError, unix_seconds
    from trainer.data import DataError
    from updates.lineage import LineageError
    from updates.model_state import StateError
    from updates.publish import PublishOptions, serving_num_versions
    from updates.update import GateRefused, UpdateError, UpdateOptions, run_update

    try:
        options = UpdateOptions(
            config=args.config, data_path=args.data,
            until=None if args.until is None else unix_seconds(args.until),
            window_seconds=args.window, epochs=args.epochs, holdout=args.holdout,
            gate_k=args.gate_k, gate_margin=args.gate_margin, min_count=args.min_count,
            expire_days=args.expire_days, verbose=0 if args.quiet else 2,
            rebuild_index=args.rebuild_index,
            publish=PublishOptions(
                k=args.k, recall_target=args.recall_target, native_check=args.native_check,
                progress=not args.quiet, keep=args.keep,
                max_changed_fraction=args.max_changed_fraction,
                serving_num_versions=serving_num_versions(args.model_config_file)))
        if args.kind == "init":
            from updates.init import start_lineage
            started = start_lineage(args.config, args.runs, args.models, options.publish,
                                    verbose=2 if args.quiet else None)
            print(f"trained {started.run}, published version {started.version} into "
                  f"{args.models}\nserve it:\n  {started.serve_command}\nquery it:\n  "
                  f"{started.curl_command}")
            return 0
        result = run_update(args.kind, args.runs, args.models, options)
    except GateRefused as err:
        print(f"update refused: {err}", file=sys.stderr)
        return 3
    except (UpdateError, LineageError, StateError, ConfigError, DataError, RunError,
            VersionError, ExportCheckError, ValueError, OSError) as err:
        print(f"update failed, nothing published: {err}", file=sys.stderr)
        return 2
    print(f"{args.kind} update {result.run.name}: published version {result.version} "
          f"into {args.models}")
    print(f"  {result.gate.describe()}")
    print(f"  {result.index}")
    print("  vocabulary: " + "; ".join(f"{f} +{v['admitted']} -{v['expired']} ({v['rows']} rows)"
                                       for f, v in result.vocabulary.items()))
    print("  seconds: " + ", ".join(f"{k} {v}" for k, v in result.seconds.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
