"""Replay a timeline under update schedules; score each served model on the
window that follows it (issue 13 item 8). Not a test.

    python benchmarks/update_timeline.py [--days 14] [--per-day 4] [--ml100k DIR]
        [--worlds drifting,ml100k] [--ml100k-weeks N] [--ml100k-per-week N] [--workers 3]

World: configs/drifting.yaml (periods = days) and, with --ml100k, MovieLens
100K by weeks (periods = weeks). The initial model trains on the first
period (ML-100K: the first third of the weeks); then, per period, the schedules:

- stale: never updated;
- full: one full update at each period start (trained on the last period);
- full+inc: the full update plus ``--per-day`` incremental ones spread over the period;
- inc-only: incremental updates only, at the same times and at the period start;
- full+inc streaming: full+inc with objective.logq: streaming (the others: static counts).

Each served model is scored on the clicks between its publication and the
next one (temporal: each user's earlier clicks excluded, catalog = items
alive in that span): HR@10 / HR@100 per period. Updates go through
updates.update.train_candidate (restore, grow, train, gate); the first
``--exported-updates`` of full+inc from its first full update on also export
and publish for real (while the other schedules train, not alone at the end),
which gives the wall times per update kind split into prepare / train /
gate / save / export / publish. The other updates are committed without an
export (marked ``"exported": false`` in published.json, and without tower
SavedModels: ``UpdateOptions.servable``); the scores use the same in-memory
towers that export would embed. Schedules run side by side in ``--workers``
processes (the three long ones at once by default), each replaying its
updates in time order; measured figures are in docs/UPDATES.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from trainer.config import dump_config, load_config  # noqa: E402
from trainer.data import load_tables  # noqa: E402
from trainer.data.windows import cut_window  # noqa: E402
from trainer.evaluation import embedding_scores, evaluate  # noqa: E402
from trainer.prepare import EncodedTables  # noqa: E402
from trainer.towers import TowerEmbedder  # noqa: E402
from trainer.train import train  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def score_span(model, tables, specs, a, b):
    """(hits@10, hits@100, pairs) of ``model`` on the clicks in [a, b)."""
    clicks = tables.interactions[tables.interactions["clicked"] == 1]
    test = clicks[(clicks["timestamp"] >= a) & (clicks["timestamp"] < b)]
    if test.empty:
        return 0, 0, 0
    items = cut_window(tables, a, b).items
    users = tables.users[tables.users["user_id"].isin(test["user_id"])]
    enc = EncodedTables.build(users.reset_index(drop=True), items.reset_index(drop=True),
                              specs[0], specs[1])
    test = test[test["item_id"].astype(str).isin(enc.item_index)]
    known = clicks[(clicks["timestamp"] < a) & clicks["user_id"].isin(users["user_id"])
                   & clicks["item_id"].astype(str).isin(enc.item_index)]
    scores = embedding_scores(TowerEmbedder(model.query_tower)(enc.user_features),
                              TowerEmbedder(model.candidate_tower)(enc.item_features))
    result = evaluate(scores, enc.eval_set(known, test), ks=(10, 100))
    n = len(test)
    return result["hr@10"] * n, result["hr@100"] * n, n


def update_times(schedule, start, period, periods, warmup, per_day):
    """[(time, kind)] of a schedule."""
    out = []
    for p in range(warmup, periods):
        t0 = start + p * period
        if schedule in ("full", "full+inc", "full+inc streaming") and p > warmup:
            out.append((t0, "full"))
        if schedule == "inc-only" and p > warmup:
            out.append((t0, "incremental"))
        if schedule.startswith("full+inc") or schedule == "inc-only":
            out += [(t0 + j * period // (per_day + 1), "incremental")
                    for j in range(1, per_day + 1)]
    return out


def _log(t0: float, msg: str) -> None:
    print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True)


def _worker_threads(threads: int) -> None:
    """Each worker's TF thread pools: the cores split between the workers, so
    that side-by-side schedules do not oversubscribe them."""
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def _logq(schedule: str) -> str:
    return "streaming" if schedule.endswith("streaming") else "static"


def train_initial(config_path, world, key, until, period, path: Path, t0):
    """The model every schedule of one logQ kind starts from: trained on [.., until)."""
    c = load_config(config_path)
    if key == "streaming":
        c.objective.logq = "streaming"
    c.data.since, c.data.until = None, until
    c.evaluation.protocol, c.evaluation.test_days = "temporal", period / 86400 * 0.1
    t = time.perf_counter()
    train(c, path, tables=cut_window(world, None, until), verbose=0)
    _log(t0, f"initial ({key} logQ) trained in {time.perf_counter() - t:.0f} s")
    return path.parent


def replay(name, config_path, world, start, period, periods, warmup, per_day,
           exported_updates, schedules, work: Path, t0, workers: int):
    """(rows, walls) of every schedule; schedules run side by side in
    ``workers`` processes (each replays one schedule at a time, in order)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    keys = sorted({_logq(s) for s in schedules})
    until = start + warmup * period
    # the longest schedules first, so that the short ones fill the gaps
    order = sorted(schedules, key=lambda s: -len(update_times(s, start, period, periods,
                                                              warmup, per_day)))
    threads = max(1, (os.cpu_count() or 2) // workers)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_threads, initargs=(threads,)) as pool:
        initial = dict(zip(keys, pool.map(
            train_initial, [config_path] * len(keys), [world] * len(keys), keys,
            [until] * len(keys), [period] * len(keys),
            [work / f"initial-{k}" / "runs" / "initial" for k in keys], [t0] * len(keys))))
        futures = {s: pool.submit(replay_schedule, name, s, config_path, world, start, period,
                                  periods, warmup, per_day, exported_updates,
                                  initial[_logq(s)], work, t0) for s in order}
        results = {s: f.result() for s, f in futures.items()}
    rows, walls = [], defaultdict(list)
    for s in schedules:
        row, w = results[s]
        rows.append(row)
        for kind, values in w.items():
            walls[kind] += values
    return rows, walls


def _restored(run: Path, world):
    """``run``'s model as saved, its variables made on a batch of its own window."""
    from trainer.batches import TrainingBatches
    from trainer.prepare import prepare_data
    from updates.model_state import restore_model

    c = load_config(run / "config.yaml")
    prepared = prepare_data(c, cut_window(world, c.data.since, c.data.until))
    return restore_model(run, next(iter(
        TrainingBatches(prepared, c).dataset(c.training.batch_size, 0))))


def replay_schedule(name, schedule, config_path, world, start, period, periods, warmup,
                    per_day, exported_updates, initial: Path, work: Path, t0):
    """One schedule's (row, walls): its updates in time order, each served model
    scored on the clicks until the next one is published."""
    from trainer import run_dir as run_dirs
    from updates.lineage import PUBLISHED_FILE, latest_run, write_json_atomic
    from updates.publish import PublishOptions
    from updates.update import GateRefused, UpdateOptions, run_update, train_candidate

    config = load_config(config_path)
    specs = (config.features.user, config.features.item)
    end = start + periods * period
    walls = defaultdict(list)
    runs = work / schedule.replace(" ", "_") / "runs"
    shutil.copytree(initial, runs)
    models = work / schedule.replace(" ", "_") / "models"
    # the updates that are not exported gate against no served version, as
    # they would with nothing published (not against the exported period's)
    unpublished = work / schedule.replace(" ", "_") / "unpublished"
    model = _restored(runs / "initial", world)
    events = update_times(schedule, start, period, periods, warmup, per_day)
    exported_left = exported_updates
    served_from = start + warmup * period
    per_period = defaultdict(lambda: np.zeros(3))
    for (t, kind) in events + [(end, None)]:
        # score the model served over [served_from, t), split by period
        a = served_from
        while a < t:
            p = (a - start) // period
            b = min(t, start + (p + 1) * period)
            per_period[p] += score_span(model, world, specs, a, b)
            a = b
        if kind is None:
            break
        # the first updates from the first full one on, so that their exports
        # run while the other schedules train instead of alone at the end
        exported = (schedule == "full+inc" and t >= start + (warmup + 1) * period
                    and exported_left > 0)
        exported_left -= exported
        # a full update trains on the last period (a week for ML-100K, not the
        # CLI's default day); an incremental one on everything since its parent.
        # Runs that are never exported skip their tower SavedModels.
        options = UpdateOptions(until=t, window_seconds=period if kind == "full" else None,
                                tables=world, verbose=0, servable=exported,
                                publish=PublishOptions(k=100, progress=False))
        started = time.perf_counter()
        try:
            if exported:
                result = run_update(kind, runs, models, options)
                seconds = dict(result.seconds, index=result.index)
                model = None
            else:
                cand = train_candidate(kind, runs, unpublished, options)
                run_dirs.commit(cand.out)
                write_json_atomic(cand.out / PUBLISHED_FILE, {"exported": False})
                seconds, model = cand.seconds, cand.model
            if schedule == "full+inc":
                walls[kind].append(seconds)
        except GateRefused as err:
            _log(t0, f"{name} {schedule} {kind} at {t}: {err}")
            continue
        if model is None:   # exported: score the model it trained (same weights)
            model = _restored(latest_run(runs), world)
        served_from = t
        _log(t0, f"{name} {schedule}: {kind} update until {t} in "
             f"{time.perf_counter() - started:.1f} s"
             + (f" ({seconds['index']})" if "index" in seconds else ""))
    hr = {p: (v[0] / v[2], v[1] / v[2]) for p, v in sorted(per_period.items()) if v[2]}
    row = {"world": name, "schedule": schedule, "per_period": hr,
           "hr10": float(np.mean([h[0] for h in hr.values()])),
           "hr100": float(np.mean([h[1] for h in hr.values()])),
           "last10": hr[max(hr)][0], "last100": hr[max(hr)][1], "updates": len(events)}
    _log(t0, f"{name} {schedule}: " + json.dumps(row, default=str))
    return row, dict(walls)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--days", type=int, default=14, help="days of the drifting world")
    p.add_argument("--per-day", type=int, default=4, help="incremental updates per period")
    p.add_argument("--scale", type=float, default=1.0,
                   help="users/items of the drifting world x this (reduced runs)")
    p.add_argument("--ml100k", default=None, help="MovieLens 100K directory (weekly replay)")
    p.add_argument("--ml100k-weeks", type=int, default=0,
                   help="weeks of ML-100K to replay (default: all)")
    p.add_argument("--worlds", default="drifting,ml100k",
                   help="comma-separated worlds to replay (ml100k needs --ml100k)")
    p.add_argument("--ml100k-per-week", type=int, default=None,
                   help="incremental updates per ML-100K week (default: --per-day)")
    p.add_argument("--exported-updates", type=int, default=3,
                   help="updates of full+inc that also export and publish, from the first "
                        "full one on (default 3: a full and two incremental ones)")
    p.add_argument("--workers", type=int, default=3,
                   help="processes replaying schedules side by side (default 3: the three "
                        "long schedules at once), the cores split between their TF thread "
                        "pools")
    p.add_argument("--output", type=Path, default=REPO / "docs" / "update_timeline")
    args = p.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    schedules = ["stale", "full", "full+inc", "inc-only", "full+inc streaming"]
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="timeline-"))
    rows, walls = [], defaultdict(list)
    worlds = {w.strip() for w in args.worlds.split(",") if w.strip()}
    try:
        if "drifting" in worlds:
            r, w = replay_drifting(args, schedules, work, t0)
            rows += r
            for k, v in w.items():
                walls[k] += v
        if "ml100k" in worlds and args.ml100k and Path(args.ml100k).is_dir():
            rows += replay_ml100k(args, schedules, work, t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows, walls, args, time.time() - t0)


def replay_drifting(args, schedules, work, t0):
    """configs/drifting.yaml over ``--days`` (x ``--scale``), periods = days."""
    from trainer.data.drifting import START

    cfg_path = work / "drifting.yaml"
    config = load_config(REPO / "configs" / "drifting.yaml")
    config.data.days = args.days
    config.data.num_users = int(config.data.num_users * args.scale)
    config.data.num_items = int(config.data.num_items * args.scale)
    drift = config.data.drift
    drift.new_users_per_day = int(drift.new_users_per_day * args.scale)
    drift.new_items_per_day = int(drift.new_items_per_day * args.scale)
    config.data.since = config.data.until = None
    cfg_path.write_text(dump_config(config))
    return replay("drifting", cfg_path, load_tables(config.data), START, 86400, args.days, 1,
                  args.per_day, args.exported_updates, schedules, work / "drifting", t0,
                  args.workers)


def replay_ml100k(args, schedules, work, t0):
    """MovieLens 100K by weeks; the first third of the weeks (at least 2) train
    the initial model. Nothing exported (the wall times are the drifting world's)."""
    cfg = load_config(REPO / "configs" / "ml100k.yaml")
    cfg.data.path = str(Path(args.ml100k).resolve())
    ml = load_tables(cfg.data)
    week = 7 * 86400
    ts = ml.interactions["timestamp"]
    start = int(ts.min()) // 86400 * 86400
    weeks = int((ts.max() - start) // week) + 1
    weeks = min(weeks, args.ml100k_weeks or weeks)
    ml_path = work / "ml100k.yaml"
    ml_path.write_text(dump_config(cfg))
    per_week = args.per_day if args.ml100k_per_week is None else args.ml100k_per_week
    rows, _ = replay("ml100k", ml_path, ml, start, week, weeks, max(2, weeks // 3), per_week,
                     0, schedules, work / "ml100k", t0, args.workers)
    return rows


def report(rows, walls, args, seconds):
    lines = ["| world | schedule | updates | mean HR@10 | mean HR@100 | last HR@10 | "
             "last HR@100 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['world']} | {r['schedule']} | {r['updates']} | {r['hr10']:.4f} | "
                     f"{r['hr100']:.4f} | {r['last10']:.4f} | {r['last100']:.4f} |")
    steps = ("prepare", "train", "gate", "save", "export", "publish")
    lines += ["", "| update kind (full+inc) | n (exported) | " + " | ".join(
        f"{k} s" for k in steps) + " |", "| --- " * (len(steps) + 2) + "|"]
    for kind, values in walls.items():
        mean = {k: np.mean([v[k] for v in values if k in v]) if any(k in v for v in values)
                else float("nan") for k in steps}
        exported = sum("export" in v for v in values)
        lines.append(f"| {kind} | {len(values)} ({exported}) | "
                     + " | ".join(f"{mean[k]:.2f}" for k in steps) + " |")
    ran = []
    if "drifting" in args.worlds:
        ran.append(f"drifting: {args.days} days, {args.per_day} incremental updates a day, "
                   f"scale {args.scale}")
    if "ml100k" in args.worlds and args.ml100k:
        per_week = args.per_day if args.ml100k_per_week is None else args.ml100k_per_week
        weeks = f"the first {args.ml100k_weeks}" if args.ml100k_weeks else "all"
        ran.append(f"ml100k: {weeks} weeks, {per_week} incremental updates a week")
    lines.append(f"\n{'; '.join(ran)}; whole benchmark {seconds:.0f} s "
                 "(export / publish: the exported updates only)")
    text = "\n".join(lines)
    print(text)
    (args.output / "table.md").write_text(text + "\n")
    (args.output / "results.json").write_text(json.dumps(rows, indent=2, default=str))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    worlds = sorted({r["world"] for r in rows})
    fig, axes = plt.subplots(1, len(worlds), figsize=(6 * len(worlds), 4), squeeze=False)
    for ax, world in zip(axes[0], worlds):
        for r in (r for r in rows if r["world"] == world):
            periods = sorted(r["per_period"])
            ax.plot(periods, [r["per_period"][p][0] for p in periods], marker="o",
                    label=r["schedule"])
        ax.set_title(f"{world}: next-window HR@10")
        ax.set_xlabel("day" if world == "drifting" else "week")
        ax.set_ylabel("HR@10")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.output / "hr10_per_period.png", dpi=100)


if __name__ == "__main__":
    main()
