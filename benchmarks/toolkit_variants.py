"""Benchmark: every toolkit variant (objective x sampling) on the same data, one table.

Trains each variant in ``configs/variants/`` (a partial config merged over
the data set's base config) with fixed seeds, on the synthetic data set
(``configs/synthetic.yaml``) and on MovieLens 100K (``configs/ml100k.yaml``),
all under protocol ``ml100k-random`` (default_rng(42) permutation of the
interaction rows, first 80 % train; exact full-catalog top-K, train items
excluded), next to the most-popular and EASE references. Writes
``results.md`` (one Markdown table per data set: HR@10/50/100, Recall@K,
NDCG@K, coverage, popularity bias, training seconds), ``results.png`` and
``results.json``; every variant's run directory (towers included, so each is
exportable) is kept under ``OUTPUT/<dataset>/<variant>/``.

    python benchmarks/toolkit_variants.py [--data ../shared/data/ml-100k] [--output DIR]
        [--datasets ml100k synthetic] [--variants listwise history ...] [--epochs N]

One process, about 40 minutes on 2 shared cores for everything.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ml100k_retrieval import ease_scores  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.data import load_tables  # noqa: E402
from trainer.data.movielens import load_ml100k  # noqa: E402
from trainer.prepare import EncodedTables  # noqa: E402
from trainer.evaluation import EvalSet, evaluate, popularity_scores, split_interactions  # noqa: E402
from trainer.train import train  # noqa: E402

KS = [10, 50, 100]
VARIANTS = ROOT / "configs" / "variants"
# Table order: the baseline, the default, then objectives, sampling, features.
ORDER = ["matrix_factorization", "in_batch_softmax", "pointwise", "pointwise_n3",
         "pairwise_hinge", "pairwise_logistic", "listwise", "listwise_hard_mix",
         "in_batch_hard_mined", "mixed_negatives", "subsample_hot", "upsample_cold",
         "history", "in_batch_tuned", "ensemble"]
DATASETS = {"ml100k": ROOT / "configs" / "ml100k.yaml",
            "synthetic": ROOT / "configs" / "synthetic.yaml"}
COLUMNS = ([f"hr@{k}" for k in KS] + [f"recall@{k}" for k in KS] + [f"ndcg@{k}" for k in KS]
           + ["coverage@100", "popularity_bias@100"])


def variant_files(names=None) -> list[Path]:
    found = {p.stem: p for p in sorted(VARIANTS.glob("*.yaml"))}
    names = names or ([n for n in ORDER if n in found] + [n for n in found if n not in ORDER])
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(f"unknown variant(s) {missing}; have {sorted(found)}")
    return [found[n] for n in names]


def references(tables) -> dict:
    """Most popular and EASE on the same split (clicked rows only)."""
    train_rows, test_rows = split_interactions(tables.interactions, "ml100k-random")
    train_pos = train_rows[train_rows["clicked"] == 1]
    test_pos = test_rows[test_rows["clicked"] == 1]
    enc = EncodedTables.build(tables.users, tables.items, [], [])
    su, si = enc.rows(train_pos)
    tu, ti = enc.rows(test_pos)
    pop = np.bincount(si, minlength=len(enc.item_index)).astype(np.float64)
    data = EvalSet(tu, ti, su, si, len(enc.item_index), pop)
    rows, seconds = {}, {}
    rows["most popular"] = evaluate(popularity_scores(data), data, KS)
    seconds["most popular"] = 0.0
    start = time.perf_counter()
    rows["EASE (L2=500)"] = evaluate(ease_scores(data, len(enc.user_index)), data, KS)
    seconds["EASE (L2=500)"] = time.perf_counter() - start
    return {"metrics": rows, "seconds": seconds}


def run_variants(dataset: str, base: Path, tables, variants: list[Path], out: Path,
                 data_path: str | None, epochs: int | None) -> dict:
    result = {"metrics": {}, "seconds": {}, "errors": {}}
    for path in variants:
        name = path.stem
        try:
            config = load_config(base, [path])
            if data_path is not None:
                config.data.path = data_path
            config.evaluation.protocol = "ml100k-random"
            config.evaluation.ks = KS
            if epochs:
                config.training.epochs = epochs
            run = train(config, out / dataset / name, tables=tables, verbose=0)
        except Exception as err:  # noqa: BLE001 - a failed variant is reported, not hidden
            result["errors"][name] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
            print(f"[{dataset}] {name}: FAILED {err}", flush=True)
            continue
        m = run.metrics["model"]
        result["metrics"][name] = m
        result["seconds"][name] = run.metrics["train_seconds"]
        print(f"[{dataset}] {name:26s} HR@10 {m['hr@10']:.3f}  HR@50 {m['hr@50']:.3f}  "
              f"HR@100 {m['hr@100']:.3f}  ({run.metrics['train_seconds']:.0f} s)", flush=True)
    return result


def markdown(dataset: str, refs: dict, res: dict) -> str:
    head = ["model"] + [c.replace("popularity_bias", "pop. bias") for c in COLUMNS] + ["train s"]
    lines = [f"### {dataset}", "", "| " + " | ".join(head) + " |",
             "|---" * len(head) + "|"]
    for group in (refs, res):
        for name, m in group["metrics"].items():
            cells = [f"{m[c]:.3f}" for c in COLUMNS] + [f"{group['seconds'][name]:.0f}"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, err in res.get("errors", {}).items():
        lines.append(f"| {name} | failed: {err} |")
    return "\n".join(lines)


def plot(all_results: dict, path: Path) -> None:
    n = len(all_results)
    fig, axes = plt.subplots(1, n, figsize=(7 * n, 7), squeeze=False)
    for ax, (dataset, (refs, res)) in zip(axes[0], all_results.items()):
        names = list(res["metrics"])
        y = np.arange(len(names))
        for off, k, color in ((-0.2, 100, "tab:blue"), (0.2, 10, "tab:orange")):
            ax.barh(y + off, [res["metrics"][v][f"hr@{k}"] for v in names], 0.4,
                    color=color, label=f"HR@{k}")
        for (ref, m), style in zip(refs["metrics"].items(), (":", "--")):
            ax.axvline(m["hr@100"], color="k", linestyle=style, label=f"{ref} HR@100")
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(f"{dataset} (protocol ml100k-random)")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ml-100k"),
                   help="MovieLens 100K directory (default: ../shared/data/ml-100k)")
    p.add_argument("--output", default=str(ROOT / "runs" / "toolkit-benchmark"))
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--variants", nargs="+", default=None,
                   help="variant names (files in configs/variants/); default: all")
    p.add_argument("--epochs", type=int, default=None, help="override training.epochs")
    args = p.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    variants = variant_files(args.variants)

    all_results, text = {}, ["# Toolkit variants, protocol ml100k-random", ""]
    for dataset in args.datasets:
        base = DATASETS[dataset]
        data_path = None
        if dataset == "ml100k":
            if not Path(args.data).is_dir():
                print(f"MovieLens 100K not found at {args.data}; skipping (pass --data)",
                      file=sys.stderr)
                continue
            data_path = str(Path(args.data).resolve())
            tables = load_ml100k(data_path)
        else:
            tables = load_tables(load_config(base).data)
        refs = references(tables)
        res = run_variants(dataset, base, tables, variants, out, data_path, args.epochs)
        all_results[dataset] = (refs, res)
        text += [markdown(dataset, refs, res), ""]
        if dataset == "ml100k" and res["metrics"]:
            best = max(res["metrics"], key=lambda v: res["metrics"][v]["hr@100"])
            hr = res["metrics"][best]["hr@100"]
            ease = refs["metrics"]["EASE (L2=500)"]["hr@100"]
            default = res["metrics"].get("in_batch_softmax", {}).get("hr@100", float("nan"))
            text += [f"Best ML-100K variant: `{best}`, HR@100 {hr:.3f} (target >= 0.64: "
                     f"{'met' if hr >= 0.64 else 'MISSED'}; EASE {ease:.3f}; in-batch default "
                     f"{default:.3f}).", ""]
        (out / "results.md").write_text("\n".join(text) + "\n")
        (out / "results.json").write_text(json.dumps(
            {d: {"references": r, "variants": v} for d, (r, v) in all_results.items()},
            indent=2))
        plot(all_results, out / "results.png")
    print("\n".join(text))
    print(f"written to {out} (results.md, results.png, results.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
