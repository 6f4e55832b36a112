"""Benchmark: which candidate defaults win on the validation split of every data set.

Each candidate (benchmarks/default_candidates.yaml: parameters of the default
tuning space, and optionally ``override``: a partial config, path from the
repository root, merged over the base config first; ``config``: an inline partial
config merged after it) is applied to each base config and fitted on its validation
split (the tuner's rule: 10 % of the training clicks under the random
protocols, the last ``test_days`` days before the test days under
``temporal``), once per training seed; the test split is never scored in this
phase. Results are appended to ``--results`` after every fit, so a run cut
short by ``--minutes`` resumes where it stopped (pairs (data set, candidate,
seed) already there are skipped).

Selection: per seed, a candidate's gain is its mean relative gain over the
``default`` candidate across data sets and metrics (val HR@10, val HR@100),
paired by seed (same validation split, same initial seed). It wins beyond
noise when the lower end of the 95 % confidence interval of its mean gain
over seeds (Student's t with seeds - 1 degrees of freedom: 4.3 standard errors
at 3 seeds, 2.8 at 5) is above zero; the winner is the one with the largest
mean gain among those, else ``default``.

``--test NAME ...`` then trains the named candidates on the whole training
part (train + validation, base seed) and scores the test split once each.

    python benchmarks/transfer_defaults.py --dataset ml100k=configs/ml100k.yaml \\
        --dataset synthetic=configs/synthetic.yaml --seeds 42 43 44 \\
        --results out/transfer/results.json --minutes 10
    python benchmarks/transfer_defaults.py ... --test default winner
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from trainer.config import deep_merge, load_config  # noqa: E402
from trainer.data import load_tables  # noqa: E402
from trainer.tune import refit_config, trial_config  # noqa: E402
from trainer.tuning_space import default_space  # noqa: E402

METRICS = ("val_hr@10", "val_hr@100")


def candidate_raw(base, candidate: dict, seed: int) -> tuple[dict, dict, dict]:
    """(the base config as a dict at training seed ``seed`` with the candidate's
    ``override`` file merged in, its default tuning space, the candidate's
    tuning-space parameters)."""
    params = dict(candidate)
    raw = base.model_dump(mode="json")
    if "override" in params:
        over = yaml.safe_load((ROOT / params.pop("override")).read_text(encoding="utf-8"))
        raw = deep_merge(raw, over)
    if "config" in params:   # an inline partial config, merged after the override file
        raw = deep_merge(raw, params.pop("config"))
    raw["tuning"] = None
    raw["training"]["seed"] = seed
    return raw, default_space(raw), params


def fit_fresh(config, tables, seed: int, scratch: Path):
    """(model, prepared data, per-epoch history) of ``config`` trained from seed
    ``seed`` in a fresh Keras session; ``scratch`` holds its checkpoints and is
    removed afterwards."""
    import tensorflow as tf

    from trainer.prepare import prepare_data
    from trainer.train import build_model, fit

    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(seed)
    prepared = prepare_data(config, tables)
    model = build_model(config, prepared)
    try:
        history = fit(model, prepared, config, scratch, verbose=0).history
    finally:
        shutil.rmtree(scratch, ignore_errors=True)   # checkpoints of a throw-away model
    return model, prepared, history


def validate(base, candidate: dict, seed: int, tables, scratch: Path) -> dict:
    """Fit on the validation split (test split untouched): final-epoch val HR@K."""
    raw, space, params = candidate_raw(base, candidate, seed)
    config = trial_config(raw, space, params, "val_hr@100")
    started = time.perf_counter()
    _, _, history = fit_fresh(config, tables, seed, scratch)
    return {**{m: float(history[m][-1]) for m in METRICS},
            "seconds": round(time.perf_counter() - started, 1)}


def score_test(base, candidate: dict, seed: int, tables, out: Path) -> dict:
    """Train on train + validation and score the test split once."""
    from trainer.train import train

    raw, space, params = candidate_raw(base, candidate, seed)
    config = refit_config(trial_config(raw, space, params, "val_hr@100").model_dump(mode="json"),
                          None, "candidate")
    started = time.perf_counter()
    metrics = train(config, out, tables, verbose=0).metrics
    keep = ("hr@10", "hr@50", "hr@100", "ndcg@10", "coverage@100")
    return {"model": {k: metrics["model"][k] for k in keep},
            "ease": {k: metrics["ease"][k] for k in keep + ("l2",)} if "l2" in metrics.get(
                "ease", {}) else metrics.get("ease"),
            "popularity": {k: metrics["popularity"][k] for k in keep},
            "seconds": round(time.perf_counter() - started, 1)}


def select(results: dict, candidates: dict, datasets: list[str]) -> tuple[str, dict]:
    """(winner, per-candidate summary) from the validation results (paired by seed)."""
    from scipy.stats import t

    val = results.get("validation", {})
    summary = {}
    for name in candidates:
        gains = []
        for seed in sorted({int(s) for d in datasets for s in val.get(d, {}).get(name, {})}):
            cells = []
            for d in datasets:
                mine = val.get(d, {}).get(name, {}).get(str(seed))
                ref = val.get(d, {}).get("default", {}).get(str(seed))
                if mine is None or ref is None:
                    break
                cells += [mine[m] / ref[m] - 1 for m in METRICS]
            else:
                gains.append(statistics.fmean(cells))
        per_data = {d: {m: [r[m] for r in val.get(d, {}).get(name, {}).values()]
                        for m in METRICS} for d in datasets}
        mean = statistics.fmean(gains) if gains else float("nan")
        se = statistics.stdev(gains) / len(gains) ** 0.5 if len(gains) > 1 else float("nan")
        low = mean - t.ppf(0.975, len(gains) - 1) * se if len(gains) > 1 else float("nan")
        summary[name] = {"seeds": len(gains), "gain": mean, "gain_se": se, "gain_low": low,
                         "beyond_noise": low > 0,
                         "per_data": per_data}
    winners = [n for n, s in summary.items() if n != "default" and s["beyond_noise"]]
    return (max(winners, key=lambda n: summary[n]["gain"]) if winners else "default"), summary


def report(results: dict, candidates: dict, datasets: list[str]) -> str:
    winner, summary = select(results, candidates, datasets)

    def cell(values: list) -> str:
        if not values:
            return "-"
        sd = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        return f"{statistics.fmean(values):.3f}{sd}"

    head = ["candidate", "seeds"] + [f"{d} val {m[4:].upper()}" for d in datasets
                                     for m in METRICS] + ["mean rel. gain ± SE (95 % CI low end)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, s in summary.items():
        gain = ("reference" if name == "default" else
                f"{100 * s['gain']:+.1f} % ± {100 * s['gain_se']:.1f} "
                f"(95 % low {100 * s['gain_low']:+.1f} %)")
        lines.append("| " + " | ".join(
            [name, str(s["seeds"])] + [cell(s["per_data"][d][m]) for d in datasets
                                       for m in METRICS] + [gain]) + " |")
    out = ["Validation split (mean ± sd over training seeds):", ""] + lines
    out += ["", f"winner on validation: **{winner}**", ""]
    if results.get("test"):
        out += ["Test split (scored once, after the selection above):", "",
                "| data set | row | HR@10 | HR@50 | HR@100 | NDCG@10 | coverage@100 |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for d, rows in ((d, r) for d, r in results["test"].items() if d in datasets):
            first = next(iter(rows.values()))
            refs = {"most popular": first["popularity"]}
            if isinstance(first["ease"], dict) and "l2" in first["ease"]:
                refs[f"EASE (L2 = {first['ease']['l2']:g})"] = first["ease"]
            mine = [(n, r["model"]) for n, r in rows.items() if n in candidates]
            for row, m in list(refs.items()) + mine:
                lines_ = [m["hr@10"], m["hr@50"], m["hr@100"], m["ndcg@10"], m["coverage@100"]]
                out.append(f"| {d} | {row} | " + " | ".join(f"{v:.3f}" for v in lines_) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", action="append", required=True, metavar="NAME=CONFIG",
                   help="a base config to score on (repeatable)")
    p.add_argument("--candidates", type=Path, default=ROOT / "benchmarks" / "default_candidates.yaml")
    p.add_argument("--only", nargs="*", default=None, help="candidates to fit (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--results", type=Path, required=True, help="results JSON (resumed)")
    p.add_argument("--minutes", type=float, default=None,
                   help="start no new fit after this many minutes")
    p.add_argument("--test", nargs="*", default=None, metavar="CANDIDATE",
                   help="score these on the test split ('winner' = the validation winner) "
                        "instead of fitting on validation")
    args = p.parse_args(argv)

    candidates = yaml.safe_load(args.candidates.read_text(encoding="utf-8"))
    if "default" not in candidates:
        p.error(f"{args.candidates}: needs a 'default' candidate (the reference)")
    bases = dict(d.split("=", 1) for d in args.dataset)
    results = (json.loads(args.results.read_text(encoding="utf-8"))
               if args.results.is_file() else {})
    args.results.parent.mkdir(parents=True, exist_ok=True)
    scratch = args.results.parent / "scratch"
    started = time.perf_counter()

    def save():
        args.results.write_text(json.dumps(results, indent=2), encoding="utf-8")

    if args.test is not None:
        winner, _ = select(results, candidates, list(bases))
        names = [winner if n == "winner" else n for n in args.test]
        for d, path in bases.items():
            base = load_config(path)
            tables = load_tables(base.data)
            for name in dict.fromkeys(names):
                if name in results.setdefault("test", {}).setdefault(d, {}):
                    continue
                row = score_test(base, candidates[name], base.training.seed, tables,
                           scratch / f"test-{d}-{name}")
                results["test"][d][name] = row
                save()
                print(f"test {d} {name}: {row['model']}", flush=True)
    else:
        names = args.only or list(candidates)
        todo = [(s, d, n) for s in args.seeds for d in bases for n in names
                if str(s) not in results.get("validation", {}).get(d, {}).get(n, {})]
        loaded = {}
        for seed, d, name in todo:
            if args.minutes and time.perf_counter() - started > 60 * args.minutes:
                print(f"budget of {args.minutes} min spent; run again to resume", flush=True)
                break
            if d not in loaded:
                base = load_config(bases[d])
                loaded[d] = (base, load_tables(base.data))
            base, tables = loaded[d]
            row = validate(base, candidates[name], seed, tables, scratch / f"{d}-{name}-{seed}")
            results.setdefault("validation", {}).setdefault(d, {}).setdefault(name, {})[
                str(seed)] = row
            save()
            print(f"validation {d} {name} seed {seed}: {row}", flush=True)
    text = report(results, candidates, list(bases))
    args.results.with_suffix(".md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
