"""Benchmark: what the towers and EASE know that the other does not.

Scores every user against the catalog with a trained two-tower candidate and
with EASE, and blends the two (each user's scores z-normalised, then
``alpha * towers + (1 - alpha) * EASE``). A blend is not a retrieval model
(EASE's item-item matrix is not a dot product of two towers); it is a bound: if
even the blend of the best towers and EASE stays below a quality target, no
distillation of EASE into the towers reaches it. Everything is chosen on the
validation split (EASE's L2 as ``trainer.ease`` does, alpha by HR@100); the
test split is scored once, with the towers and EASE refitted on the whole
training part.

    python benchmarks/ease_blend.py --config configs/ml100k.yaml \\
        --candidates benchmarks/ml100k_variants.yaml --candidate side_t025
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from benchmarks.transfer_defaults import candidate_raw, fit_fresh  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.data import load_tables  # noqa: E402
from trainer.ease import fit_ease  # noqa: E402
from trainer.evaluation import evaluate  # noqa: E402
from trainer.tune import refit_config, trial_config  # noqa: E402

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)   # 0 = EASE alone, 1 = the towers alone


def _z(scores: np.ndarray) -> np.ndarray:
    """Each row (a user's scores over the catalog, [n, I]) to mean 0, sd 1."""
    s = np.asarray(scores, dtype=np.float64)
    return (s - s.mean(axis=1, keepdims=True)) / (s.std(axis=1, keepdims=True) + 1e-12)


def blend(towers, ease, alpha: float):
    """score_fn(user rows [n]) -> [n, I] for ``evaluate``."""
    return lambda users: alpha * _z(towers(users)) + (1 - alpha) * _z(ease(users))


def fitted_scores(config, tables, seed: int, test: bool):
    """(towers score_fn, EASE score_fn, the eval set, EASE's L2): the towers
    fitted on the validation split's clicks (test=False) or the whole training part."""
    from trainer.train import model_scores

    model, prepared, _ = fit_fresh(config, tables, seed,
                                   Path(tempfile.mkdtemp(prefix="ease_blend_")))
    data = prepared.test_set() if test else prepared.validation_set()
    ev = config.evaluation
    ease = fit_ease(data, len(prepared.encoded.user_index),
                    prepared.reference_validation_set(config), ev.ease_l2, max(ev.ks))
    if ease.skipped:
        raise SystemExit(ease.skipped)
    return model_scores(model, prepared.encoded), ease.score_fn, data, ease.l2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="base run config")
    p.add_argument("--candidates", type=Path, required=True,
                   help="candidates YAML (benchmarks/transfer_defaults.py's format)")
    p.add_argument("--candidate", required=True, help="the towers: a candidate's name")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)

    base = load_config(args.config)
    candidates = yaml.safe_load(args.candidates.read_text(encoding="utf-8"))
    if args.candidate not in candidates:
        p.error(f"--candidate {args.candidate!r} is not in {args.candidates} "
                f"(has: {', '.join(candidates)})")
    raw, space, params = candidate_raw(base, candidates[args.candidate], args.seed)
    config = trial_config(raw, space, params, "val_hr@100")
    tables = load_tables(config.data)

    towers, ease, val, l2 = fitted_scores(config, tables, args.seed, test=False)
    rows = {a: evaluate(blend(towers, ease, a), val, ks=[10, 100]) for a in ALPHAS}
    best = max(ALPHAS, key=lambda a: rows[a]["hr@100"])
    print(f"| split | alpha (1 = {args.candidate}, 0 = EASE, L2 {l2:g}) | HR@10 | HR@100 |")
    print("| --- | --- | --- | --- |")
    for a, m in rows.items():
        print(f"| validation | {a:g}{' (chosen)' if a == best else ''} | "
              f"{m['hr@10']:.3f} | {m['hr@100']:.3f} |", flush=True)

    refit = refit_config(config.model_dump(mode="json"), None, "candidate")
    towers, ease, test, l2 = fitted_scores(refit, tables, args.seed, test=True)
    for a in sorted({0.0, best, 1.0}):
        m = evaluate(blend(towers, ease, a), test, ks=[10, 100])
        print(f"| test | {a:g} (EASE L2 {l2:g}) | {m['hr@10']:.3f} | {m['hr@100']:.3f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
