"""Benchmark: tuned and history-reading towers vs the default, EASE and popularity.

In one run, on one data set and one split protocol (ML-100K: ml100k-random):

- most popular and EASE (L2 chosen on the validation split), from the default run;
- the default config, trained on the whole training part;
- the tuned config: ``python -m trainer.tune``'s study within ``--minutes``
  (TPE, median pruning, choices on the validation split), refitted on the
  whole training part;
- user-tower variants reading the user's history through the item tower's
  own table (attention / recency pooling): each fitted with a validation
  split, the best by validation HR@100 refitted on the whole training part.

Every choice is made on the validation split (10 % of the training clicks);
the test split is scored once per row. Writes ``results.json``,
``results.md`` and ``results.png`` into ``--output``.

    python benchmarks/tuning.py --data ../shared/data/ml-100k --minutes 30 --output out/tuning
    python benchmarks/tuning.py --config configs/synthetic.yaml --minutes 10 --output out/tuning-syn
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trainer.config import load_config, parse_config  # noqa: E402
from trainer.data import load_tables  # noqa: E402
from trainer.report import metrics_table  # noqa: E402
from trainer.train import train  # noqa: E402
from trainer.tune import run_study  # noqa: E402

KS = [10, 50, 100]
VARIANTS = {
    "history, attention (shared item table)": {"name": "history", "type": "history",
                                               "pooling": "attention",
                                               "share_item_embeddings": True},
    "history, recency (shared item table)": {"name": "history", "type": "history",
                                             "pooling": "recency",
                                             "share_item_embeddings": True},
}


def _with(raw: dict, **training) -> dict:
    out = copy.deepcopy(raw)
    out["training"] = {**out["training"], **training}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "ml100k.yaml")
    p.add_argument("--data", default=None, help="data.path override (e.g. an ml-100k directory)")
    p.add_argument("--minutes", type=float, default=30.0, help="tuning budget (wall clock)")
    p.add_argument("--trials", type=int, default=200, help="tuning trial cap")
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args(argv)

    base = load_config(args.config)
    if args.data:
        base.data.path = str(Path(args.data).resolve())
    raw = base.model_dump(mode="json")
    raw["tuning"] = None
    tables = load_tables(base.data)
    args.output.mkdir(parents=True, exist_ok=True)
    rows, seconds, notes = {}, {}, {}

    started = time.perf_counter()
    default = train(base, args.output / "default", tables, verbose=0)
    seconds["default"] = time.perf_counter() - started
    rows["most popular"] = default.metrics["popularity"]
    ease = default.metrics["ease"]
    rows[f"EASE (L2={ease['l2']:g}, chosen on validation)"] = ease
    rows["two-tower, default config"] = default.metrics["model"]

    started = time.perf_counter()
    study_config = parse_config({**raw, "tuning": {"metric": "val_hr@100",
                                                  "trials": args.trials,
                                                  "timeout_minutes": args.minutes}})
    study = run_study(study_config, args.output / "study", tables=tables)
    seconds["tuned"] = time.perf_counter() - started
    rows["two-tower, tuned (TPE on validation)"] = study.test
    notes["tuned"] = {"trial": study.best_trial, "params": study.best_params,
                      "validation_hr@100": study.validation,
                      "trials": study.finished_trials}

    validation = {}
    for name, feature in VARIANTS.items():
        variant = copy.deepcopy(raw)
        variant["features"]["user"].append(feature)
        started = time.perf_counter()
        fitted = train(parse_config(_with(variant, validation_fraction=0.1)),
                       args.output / "variants" / name.split(",")[1].split()[0],
                       tables, verbose=0)
        seconds[name] = time.perf_counter() - started
        validation[name] = (fitted.metrics["validation"]["val_hr@100"], variant)
    best = max(validation, key=lambda n: validation[n][0])
    started = time.perf_counter()
    refit = train(parse_config(validation[best][1]), args.output / "variants" / "best",
                  tables, verbose=0)
    seconds["best variant refit"] = time.perf_counter() - started
    rows[f"two-tower + {best} (best of {len(VARIANTS)} on validation)"] = refit.metrics["model"]
    notes["variants_validation_hr@100"] = {n: v for n, (v, _) in validation.items()}

    table = metrics_table(rows, KS)
    print(table)
    result = {"config": str(args.config), "dataset": default.metrics["dataset"],
              "protocol": default.metrics["protocol"], "rows": rows, "seconds": seconds,
              "notes": notes}
    (args.output / "results.json").write_text(json.dumps(result, indent=2, default=float))
    (args.output / "results.md").write_text(
        f"{default.metrics['dataset']} ({default.metrics['protocol']}), test split\n\n"
        + table + "\n\n```\n" + json.dumps({"seconds": seconds, **notes}, indent=2,
                                           default=float) + "\n```\n")
    _plot(rows, args.output / "results.png", default.metrics["dataset"])
    return 0


def _plot(rows: dict, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(rows)
    for n, (name, m) in enumerate(rows.items()):
        off = (n - (len(rows) - 1) / 2) * width
        ax.bar([x + off for x in range(len(KS))], [m[f"hr@{k}"] for k in KS], width,
               label=name)
    ax.set_xticks(range(len(KS)), [f"HR@{k}" for k in KS])
    ax.set_title(f"{title}: test hit rate (choices on the validation split)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
