"""``python -m trainer --config CONFIG --output DIR``: train, evaluate, write a run."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 epochs would train nothing and still publish)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m trainer",
        description="Train a two-tower retrieval model (TFRS), evaluate it with exact "
                    "full-catalog top-K, and write towers, metrics, report and plot.")
    p.add_argument("--config", type=Path, required=True,
                   help="YAML run config, e.g. configs/synthetic.yaml (the embedded "
                        "synthetic data set) or configs/ml100k.yaml")
    p.add_argument("--override", type=Path, action="append", default=[],
                   help="partial YAML config merged over --config (repeatable), e.g. "
                        "configs/variants/listwise.yaml (docs/TOOLKIT.md)")
    p.add_argument("--output", type=Path, required=True,
                   help="run directory to write; it is replaced only when the training "
                        "finished (re-running resumes an interrupted run)")
    p.add_argument("--data-path", default=None,
                   help="override data.path in the config (e.g. a MovieLens directory)")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="override training.epochs (a positive integer)")
    p.add_argument("--strategy", default="auto",
                   choices=("auto", "default", "multi_worker", "parameter_server"),
                   help="tf.distribute strategy; auto (default): none without TF_CONFIG, "
                        "parameter_server if TF_CONFIG has ps tasks, else multi_worker "
                        "(docs/DISTRIBUTED.md)")
    p.add_argument("--min-shard-bytes", type=int, default=256 << 10,
                   help="parameter_server: variables from this size up (the id embedding "
                        "tables) are partitioned over the ps tasks (default 256 KiB)")
    p.add_argument("--quiet", action="store_true", help="one line per epoch, no progress bar")
    return p.parse_args(argv)


def _log_to_stderr(logger: logging.Logger) -> None:
    """The trainer's own messages (resume, commit) at INFO; other libraries' as they are."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv=None) -> int:
    args = parse_args(argv)
    _log_to_stderr(logging.getLogger("trainer"))
    import tensorflow as tf   # after --help: it takes seconds
    if tf.get_logger().handlers:   # TF's own; absl's first log gives root one too
        tf.get_logger().propagate = False   # so each TF message prints once, not twice
    from trainer.config import ConfigError, load_config
    from trainer.data import DataError

    try:
        config = load_config(args.config, args.override, args.data_path)
        if args.epochs is not None:
            config.training.epochs = args.epochs
        from trainer.distributed import Distribution
        from trainer.train import train

        dist = Distribution.from_flag(args.strategy, args.min_shard_bytes)
        run = train(config, args.output, verbose=2 if args.quiet else None,
                    distribution=dist)
    except (ConfigError, DataError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not dist.is_chief:
        print(f"{dist.task_type} {dist.task_id}: done (the chief writes {run.output_dir})")
        return 0
    m = run.metrics
    ks = sorted(config.evaluation.ks)
    print(f"\n{m['dataset']} ({m['protocol']}): trained {m['epochs_run']} epochs "
          f"in {m['train_seconds']:.1f} s")
    from trainer.report import reference_rows

    for name, result in reference_rows(m).items():
        print(f"  {name:16s} " + "  ".join(f"HR@{k}={result[f'hr@{k}']:.3f}" for k in ks))
    if "skipped" in m.get("ease", {}):
        print(f"  ({m['ease']['skipped']})")
    print(f"artifacts: {run.output_dir} (report.md, training.png, metrics.json, towers/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
