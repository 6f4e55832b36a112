"""Benchmark: incremental vs full export of the four served models (issue 14).

One run, one machine, side by side:

1. A catalog of SIZE items (the run's items plus synthetic items from the same
   world, d = 64, as in benchmarks/export_index.py); the parent run is exported
   in full: version 1, the base.
2. An update: a descendant run (tests/descendant_run.py - the item id embedding
   rows of the trained items moved through the tower's real weights, standing in
   for issue 13's incremental training) and a new catalog in which the features
   of other items changed, so that 1 % of the vectors change, and 1 % new items.
3. That update exported both ways: in full into a fresh model base, and
   incrementally from version 1. Wall time split into embed / index (tune +
   build, or detect + refresh) / save / verify; recall@100 against exact on the
   same held-out users; search p50 of both retrieval models, interleaved query by
   query and run as the project's server runs them.
4. A chain of CHAIN further updates, each exported incrementally from the last
   (retrieval only): recall@100 after each beside a fresh ScaNN build with the
   same settings over the same vectors, and where the fallback triggered; PNG.

    python benchmarks/incremental_export.py [--run RUN_DIR] [--size 1000000] [--chain 10]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scann  # noqa: E402,F401
from scann.scann_ops.py import scann_ops  # noqa: E402

from descendant_run import descend  # noqa: E402
from export.exporter import ExportOptions, export_run  # noqa: E402
from export.incremental import IncrementalOptions, export_incremental  # noqa: E402
from export.index_refresh import read_index_state, searcher_from_tensors  # noqa: E402
from export.run_artifacts import feature_columns, load_run  # noqa: E402
from export.scann_tuning import exact_top_k, recall_at_k  # noqa: E402
from export.verify import recall  # noqa: E402
from export_index import Served, latency, rows, train_default_run  # noqa: E402
from serving.servable import session_config  # noqa: E402
from trainer.data.synthetic import generate_catalog  # noqa: E402

K = 100


def make_update(parent: Path, child: Path, catalog: pd.DataFrame, changed: int, new: int,
                seed: int) -> pd.DataFrame:
    """Descendant run + its catalog: every trained item's id row moved (at most
    ``changed``), the price of other items changed up to ``changed`` in all,
    ``new`` new items. Returns the new catalog."""
    rng = np.random.default_rng(seed)
    trained = pd.read_parquet(parent / "items.parquet")["item_id"].astype(str).to_numpy()
    moved = descend(parent, child, rng.choice(trained, min(changed, len(trained)),
                                              replace=False), seed=seed)
    others = np.setdiff1d(catalog["item_id"].to_numpy(dtype=str), moved)
    repriced = rng.choice(others, max(0, changed - len(moved)), replace=False)
    catalog = catalog.copy()
    hit = pd.Index(repriced).get_indexer(catalog["item_id"]) >= 0
    catalog.loc[hit, "price"] = catalog.loc[hit, "price"] * 1.7 + 3.0
    fresh = generate_catalog(new, seed=1000 + seed, id_prefix=f"u{seed}-")
    return pd.concat([catalog, fresh[catalog.columns]], ignore_index=True)


def phases(meta_by_model: dict, wall: float) -> dict:
    """embed / index / models (save + verify, wall) seconds of one export, from its
    metadata; save and verify are the per-model sums (the models are built two
    at a time, so they overlap in the models' wall time)."""
    any_meta = next(iter(meta_by_model.values()))
    steps, update = any_meta.get("export_steps_seconds", {}), any_meta.get("update", {})
    inc = update.get("kind") == "incremental"
    # (a full export builds its ScaNN index in the retrieval model's thread: in "models")
    out = {"embed": update["seconds"]["embed"] if inc else steps.get("embed_catalog", 0.0),
           "index": (update["seconds"]["detect"] + update["seconds"]["index"]) if inc
           else steps.get("tune", 0.0),
           "models": steps["build_and_check"] + steps["latency_probes"]}
    out["other"] = wall - sum(out.values())
    out["save"] = sum(m["seconds"]["save"] for m in meta_by_model.values())
    out["verify"] = sum(m["seconds"]["verify"] for m in meta_by_model.values())
    out["wall"] = wall
    return out


def served_recall(path: Path, queries: dict, truth_ids: np.ndarray) -> float:
    model = Served(path, session_config())
    try:
        got = np.concatenate([model.run(rows(queries, s, s + 64))["item_ids"]
                              for s in range(0, len(truth_ids), 64)])
    finally:
        model.close()
    return recall(got, truth_ids)


def exact_ids(version_dir: Path, query_emb: np.ndarray) -> np.ndarray:
    state = read_index_state(version_dir)
    return state.item_ids[exact_top_k(query_emb, state.vectors, K)].astype(str)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default=None,
                   help="trained run directory (default: train configs/synthetic.yaml first)")
    p.add_argument("--size", type=int, default=1_000_000, help="catalog size")
    p.add_argument("--changed", type=float, default=0.01, help="fraction of vectors changed")
    p.add_argument("--new", type=float, default=0.01, help="fraction of new items")
    p.add_argument("--chain", type=int, default=10, help="successive incremental refreshes")
    p.add_argument("--fresh-every", type=int, default=1,
                   help="build the fresh comparison index at chain steps 1, 1 + N, ... and "
                        "the last (default 1: every step; each is a full ScaNN build)")
    p.add_argument("--queries", type=int, default=1000, help="held-out users for recall")
    p.add_argument("--single", type=int, default=300, help="single queries timed per model")
    p.add_argument("--output", default=None, help="work directory (models, results)")
    p.add_argument("--keep-models", action="store_true", help="keep the exported models")
    args = p.parse_args(argv)
    work = Path(args.output or tempfile.mkdtemp(prefix="bench-incremental-"))
    work.mkdir(parents=True, exist_ok=True)
    parent = Path(args.run) if args.run else train_default_run(work / "run")
    changed, new = int(args.size * args.changed), int(args.size * args.new)
    started = time.perf_counter()
    log = []

    def say(line: str) -> None:
        print(line, flush=True)
        log.append(line)

    base_run = load_run(parent)
    extra = generate_catalog(max(0, args.size - len(base_run.items)), seed=0)
    catalog = pd.concat([base_run.items, extra[base_run.items.columns]], ignore_index=True)
    catalog["item_id"] = catalog["item_id"].astype(str)
    path0 = work / "items-0.parquet"
    catalog.to_parquet(path0, index=False)
    inc_base, full_base = work / "models-incremental", work / "models-full"
    t = time.perf_counter()
    export_run(parent, inc_base, ExportOptions(k=K, items_path=str(path0)))
    say(f"base: full export of {len(catalog):,} items, version 1, "
        f"{time.perf_counter() - t:.0f} s")

    # -- one update, both ways ------------------------------------------------------
    child = work / "run-1"
    catalog = make_update(parent, child, catalog, changed, new, seed=1)
    path1 = work / "items-1.parquet"
    catalog.to_parquet(path1, index=False)
    t = time.perf_counter()
    full = export_run(child, full_base, ExportOptions(k=K, items_path=str(path1)))
    full_wall = time.perf_counter() - t
    t = time.perf_counter()
    inc = export_incremental(child, inc_base, ExportOptions(k=K, items_path=str(path1)))
    inc_wall = time.perf_counter() - t
    update = inc.metadata["retrieval"]["update"]
    say(f"update: {json.dumps({k: update.get(k) for k in ('kind', 'fallback_reason', 're_embedded', 'inserted', 'updated', 'deleted', 'changed_fraction', 'reasons', 'ground_truth')})}")
    say(f"incremental steps (s): {json.dumps(update.get('seconds'))}")
    say("per model (s): " + json.dumps({n: {**m["seconds"], "total": m["export_seconds"]}
                                        for n, m in inc.metadata.items()}))
    say("export steps (s): " + json.dumps(inc.metadata["retrieval"]["export_steps_seconds"]))

    run = load_run(child)
    users = pd.read_parquet(child / "users.parquet").sample(args.queries, replace=True,
                                                           random_state=1)
    queries = feature_columns(users, run.spec["query"], "users")
    query_emb = run.embed("query", queries)
    results = {}
    for name, res, wall in (("full", full, full_wall), ("incremental", inc, inc_wall)):
        results[name] = {**phases(res.metadata, wall), "recall@100": served_recall(
            res.paths["retrieval"], queries, exact_ids(res.paths["retrieval"], query_emb))}
    models = {n: Served(r.paths["retrieval"], session_config())
              for n, r in (("full", full), ("incremental", inc))}
    lat = latency(models, queries, args.single)
    for n, m in models.items():
        results[n]["p50_ms"] = lat[n]["p50_ms"]
        results[n]["p99_ms"] = lat[n]["p99_ms"]
        m.close()

    lines = ["| export | wall s | embed s | index s (tune / detect + refresh) | "
             "models s (full: ScaNN build; save + verify, 2 at a time; latency probes) | "
             "save / verify s (per-model sums) | other s | recall@100 vs exact | p50 ms | "
             "p99 ms |",
             "|---" * 10 + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['wall']:.1f} | {r['embed']:.1f} | {r['index']:.1f} | "
                     f"{r['models']:.1f} | {r['save']:.1f} / {r['verify']:.1f} | "
                     f"{r['other']:.1f} | {r['recall@100']:.4f} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} |")
    f, i = results["full"], results["incremental"]
    verdict = [
        f"incremental export of the four models <= 30 s: {i['wall']:.1f} s "
        f"({'met' if i['wall'] <= 30 else 'MISSED'}); full {f['wall']:.0f} s, "
        f"{f['wall'] / i['wall']:.1f}x",
        f"recall@100 within 0.01 of the full rebuild's: {i['recall@100']:.4f} vs "
        f"{f['recall@100']:.4f} ({'met' if i['recall@100'] >= f['recall@100'] - 0.01 else 'MISSED'})",
        f"p50 within 10 %: {i['p50_ms']:.2f} vs {f['p50_ms']:.2f} ms "
        f"({i['p50_ms'] / f['p50_ms'] - 1:+.1%}, "
        f"{'met' if i['p50_ms'] <= 1.1 * f['p50_ms'] else 'MISSED'})"]
    for line in lines + verdict:
        say(line)
    if not args.keep_models:
        shutil.rmtree(full_base, ignore_errors=True)

    # -- a chain of refreshes ---------------------------------------------------------
    chain = [{"step": 0, "kind": "full", "refreshed": None, "fresh": None}]
    chain_lines = ["| step | export | wall s | changed since last full build | recall@100 "
                   "refreshed | recall@100 fresh build | difference | export's own recall "
                   "(held-out users) | ScaNN weighted imbalance | fallback |", "|---" * 10 + "|"]
    prev, cumulative = child, update.get("changed_fraction", 0.0)
    for step in range(1, args.chain + 1):
        nxt = work / f"run-{step + 1}"
        catalog = make_update(prev, nxt, catalog, changed, new, seed=step + 1)
        path = work / f"items-{step + 1}.parquet"
        catalog.to_parquet(path, index=False)
        t = time.perf_counter()
        res = export_incremental(nxt, inc_base, ExportOptions(
            k=K, models=["retrieval"], items_path=str(path)), IncrementalOptions())
        wall = time.perf_counter() - t
        meta = res.metadata["retrieval"]
        u = meta["update"]
        cumulative = cumulative + u.get("changed_fraction", 0.0) if u["kind"] == "incremental" \
            else 0.0
        state = read_index_state(res.paths["retrieval"])
        params = meta["index"]["params"]
        truth = exact_top_k(query_emb, state.vectors, K)
        refreshed = searcher_from_tensors(state.tensors).search_batched(query_emb, K)[0]
        r_ref, r_fresh = recall_at_k(refreshed.numpy(), truth), None
        if (step - 1) % args.fresh_every == 0 or step == args.chain:
            fresh = (scann_ops.builder(state.vectors, K, "dot_product")
                     .tree(num_leaves=params["num_leaves"],
                           num_leaves_to_search=params["num_leaves_to_search"],
                           training_iterations=params["training_iterations"])
                     .score_ah(params["dimensions_per_block"])
                     .reorder(params["num_reordering_candidates"]).build()
                     .search_batched(query_emb, K)[0])
            r_fresh = recall_at_k(fresh.numpy(), truth)
        imbalance = u.get("scann_health", {}).get("after", {}).get(
            "partition_weighted_avg_relative_imbalance")
        chain.append({"step": step, "kind": u["kind"], "refreshed": r_ref, "fresh": r_fresh,
                      "wall": wall, "cumulative_changed": cumulative,
                      "export_recall": meta[f"recall@{K}_vs_exact"], "imbalance": imbalance,
                      "fallback": u.get("fallback_reason")})
        chain_lines.append(
            f"| {step} | {u['kind']} | {wall:.1f} | {cumulative:.1%} | {r_ref:.4f} | "
            f"{'-' if r_fresh is None else f'{r_fresh:.4f}'} | "
            f"{'-' if r_fresh is None else f'{r_ref - r_fresh:+.4f}'} | "
            f"{meta[f'recall@{K}_vs_exact']:.4f} | "
            f"{imbalance if imbalance is None else round(imbalance, 4)} | "
            f"{u.get('fallback_reason') or '-'} |")
        print(chain_lines[-1], flush=True)
        if prev != child:
            shutil.rmtree(prev, ignore_errors=True)
        prev = nxt
    steps = chain[1:]
    worst = min((c["refreshed"] - c["fresh"] for c in steps if c["fresh"] is not None),
                default=0.0)
    chain_verdict = (f"chain of {len(steps)} refreshes within 0.02 of a fresh build: worst "
                     f"{worst:+.4f} ({'met' if worst >= -0.02 else 'MISSED'}); fallbacks at "
                     f"steps {[c['step'] for c in steps if c['kind'] == 'full'] or 'none'}")
    for line in chain_lines + [chain_verdict]:
        say(line)
    _plot(steps, work / "incremental_chain.png")
    say(f"total benchmark time {time.perf_counter() - started:.0f} s")
    (work / "results.md").write_text("\n".join(log) + "\n")
    (work / "results.json").write_text(json.dumps({"single_update": results, "chain": chain},
                                                  indent=2, default=str))
    if not args.keep_models:
        shutil.rmtree(inc_base, ignore_errors=True)
    print(f"written to {work}")
    return 0


def _plot(steps: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    x = [c["step"] for c in steps]
    ax.plot(x, [c["refreshed"] for c in steps], "o-", label="refreshed index (incremental)")
    fresh = [c for c in steps if c["fresh"] is not None]
    ax.plot([c["step"] for c in fresh], [c["fresh"] for c in fresh], "s--",
            label="fresh ScaNN build, same settings")
    for c in steps:
        if c["kind"] == "full":
            ax.axvline(c["step"], color="grey", linestyle=":")
    ax.set_xlabel("successive incremental refresh")
    ax.set_ylabel("recall@100 vs exact")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
