"""Benchmark: the project's ML-100K config vs popularity, EASE and the TFRS tutorial.

All four are evaluated in one run under protocol ml100k-random (exact
full-catalog top-K, train items excluded). Targets (issue 2): HR@100 >= 0.62
and HR@10 >= 0.16 with training under 2 minutes on 2 cores.

    python benchmarks/ml100k_retrieval.py [--data ../shared/data/ml-100k] [--output DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_recommenders as tfrs  # noqa: E402

from trainer import ease  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.ease import click_matrix, ease_weights, gram  # noqa: E402
from trainer.data.movielens import load_ml100k  # noqa: E402
from trainer.prepare import EncodedTables  # noqa: E402
from trainer.evaluation import EvalSet, evaluate, popularity_scores, split_interactions  # noqa: E402
from trainer.report import metrics_table  # noqa: E402
from trainer.train import train  # noqa: E402

KS = [10, 50, 100]


def eval_set(tables, train_pos, test_pos) -> tuple[EncodedTables, EvalSet]:
    enc = EncodedTables.build(tables.users, tables.items, [], [])
    su, si = enc.rows(train_pos)
    tu, ti = enc.rows(test_pos)
    pop = np.bincount(si, minlength=len(enc.item_index)).astype(np.float64)
    return enc, EvalSet(tu, ti, su, si, len(enc.item_index), pop)


def ease_scores(data: EvalSet, num_users: int, l2: float = 500.0):
    """EASE (Steck 2019) at a fixed L2, fitted on the train clicks (trainer.ease)."""
    x = click_matrix(data.seen_users, data.seen_items, num_users, data.num_items)
    return ease.ease_scores(x, ease_weights(gram(x), l2))


def tutorial_scores(enc: EncodedTables, data: EvalSet, seed: int = 42):
    """The TFRS basic-retrieval tutorial: id embeddings (dim 32), no normalisation,
    Retrieval task without temperature or logQ, Adagrad 0.1, batch 8192, 3 epochs."""
    tf.keras.utils.set_random_seed(seed)
    users = np.asarray(enc.user_index, dtype=str)
    items = np.asarray(enc.item_index, dtype=str)

    def tower(vocab):
        return tf.keras.Sequential([tf.keras.layers.StringLookup(vocabulary=vocab, mask_token=None),
                                    tf.keras.layers.Embedding(len(vocab) + 1, 32)])

    class Tutorial(tfrs.Model):
        def __init__(self):
            super().__init__()
            self.user_model, self.movie_model = tower(users), tower(items)
            self.task = tfrs.tasks.Retrieval()

        def compute_loss(self, f, training=False):
            return self.task(self.user_model(f["u"]), self.movie_model(f["i"]),
                             compute_metrics=False)

    model = Tutorial()
    model.compile(optimizer=tf.keras.optimizers.Adagrad(0.1))
    ds = tf.data.Dataset.from_tensor_slices(
        {"u": users[data.seen_users], "i": items[data.seen_items]})
    ds = ds.shuffle(100_000, seed=seed, reshuffle_each_iteration=False).batch(8192).cache()
    start = time.perf_counter()
    model.fit(ds, epochs=3, verbose=0)
    seconds = time.perf_counter() - start
    u = model.user_model(tf.constant(users)).numpy()
    i = model.movie_model(tf.constant(items)).numpy()
    return (lambda rows: u[rows] @ i.T), seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ml-100k"),
                   help="MovieLens 100K directory (default: ../shared/data/ml-100k)")
    p.add_argument("--config", default=str(ROOT / "configs" / "ml100k.yaml"))
    p.add_argument("--output", default=None, help="directory for the run and results.md")
    args = p.parse_args(argv)
    if not Path(args.data).is_dir():
        print(f"MovieLens 100K not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    out = Path(args.output or tempfile.mkdtemp(prefix="bench-ml100k-"))
    tables = load_ml100k(args.data)
    train_rows, test_rows = split_interactions(tables.interactions, "ml100k-random")
    enc, data = eval_set(tables, train_rows, test_rows)

    rows, seconds = {}, {}
    rows["most popular"] = evaluate(popularity_scores(data), data, KS)
    start = time.perf_counter()
    rows["EASE (L2=500)"] = evaluate(ease_scores(data, len(enc.user_index)), data, KS)
    seconds["EASE (L2=500)"] = time.perf_counter() - start
    scores, seconds["TFRS tutorial"] = tutorial_scores(enc, data)
    rows["TFRS tutorial"] = evaluate(scores, data, KS)

    config = load_config(args.config)
    config.data.path = str(Path(args.data).resolve())
    run = train(config, out / "run", tables=tables, verbose=0)
    name = f"project ({Path(args.config).name})"
    rows[name] = run.metrics["model"]
    seconds[name] = run.metrics["train_seconds"]

    table = metrics_table(rows, KS)
    lines = ["# ML-100K, protocol ml100k-random", "", table, "",
             "| model | training seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in seconds.items()]
    m = rows[name]
    verdict = (f"\nTargets: HR@100 >= 0.62 -> {m['hr@100']:.3f} "
               f"({'met' if m['hr@100'] >= 0.62 else 'MISSED'}); HR@10 >= 0.16 -> "
               f"{m['hr@10']:.3f} ({'met' if m['hr@10'] >= 0.16 else 'MISSED'}); training "
               f"< 120 s -> {seconds[name]:.1f} s "
               f"({'met' if seconds[name] < 120 else 'MISSED'})")
    text = "\n".join(lines) + "\n" + verdict + "\n"
    print(text)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"metrics": rows, "seconds": seconds}, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
