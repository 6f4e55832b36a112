"""Streamed sharded input vs the in-memory path: peak RSS and examples/s.

    flock /work/heavy.lock nice -n 10 python benchmarks/streaming_input.py \
        [--users 100000] [--clicks-per-user 200] [--small-users 10000] [--work /tmp/...]
        [--exposures-per-user 0] [--small-only]

1. ``python -m trainer.shards generate``: the large synthetic world
   (``users x clicks_per_user`` clicks, >= 20M by default) as Parquet shards,
   a chunk of users at a time;
2. one epoch of ``python -m trainer`` on it, streamed (``data: {kind:
   shards}``);
3. a small world (``small_users``) that the in-memory path holds: one epoch
   in memory (``stream: false``) and one streamed, side by side
   (``--small-only``: this step alone). ``--exposures-per-user`` adds
   exposed-not-clicked rows, which both paths mask out of the users' own
   in-batch negatives.

Each training is a child process; its peak RSS is the kernel's
``ru_maxrss`` of that child (``os.wait4``), so it covers the whole run:
the counting pass, the fit, the evaluation and the written run directory.
examples/s = training clicks / the fit's seconds (metrics.json). Prints a
Markdown table; the shard data lives under ``--work`` and is deleted at the
end (``--keep`` keeps it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

# Ids plus one categorical / continuous feature per side: the shape of a
# large-catalog model. Batch 1024: on 2 cores a 4096 batch's in-batch softmax
# (16M logits a step) is 4x slower per example.
CONFIG = {
    "features": {
        "user": [{"name": "user_id", "type": "categorical", "embedding_dim": 32},
                 {"name": "country", "type": "categorical", "embedding_dim": 8}],
        "item": [{"name": "item_id", "type": "categorical", "embedding_dim": 32},
                 {"name": "category", "type": "categorical", "embedding_dim": 8},
                 {"name": "price", "type": "continuous", "log1p": True}],
    },
    "model": {"query_tower": {"output_dim": 32}, "candidate_tower": {"output_dim": 32}},
    "training": {"epochs": 1, "batch_size": 1024, "learning_rate": 0.005},
    # the test slice: the last 0.01 days (14 minutes), evaluated in memory
    "evaluation": {"protocol": "temporal", "test_days": 0.01, "ks": [10, 100],
                   "ease": False},
}


def _env() -> dict:
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _child(args: list[str], log: Path) -> tuple[float, int]:
    """Run ``python args``; (wall seconds, peak RSS bytes of that process)."""
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT,
                                env=_env(), cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}), see {log}:\n"
                         + log.read_text()[-3000:])
    return time.perf_counter() - started, usage.ru_maxrss * 1024   # KiB on Linux


def generate(out: Path, users: int, clicks: int, items: int, exposures: int,
             log: Path) -> dict:
    seconds, rss = _child(["-m", "trainer.shards", "generate", "--out", str(out),
                           "--users", str(users), "--items", str(items),
                           "--clicks-per-user", str(clicks),
                           "--exposures-per-user", str(exposures),
                           "--rows-per-shard", "1000000"], log)
    manifest = json.loads((out / "manifest.json").read_text())
    rows = manifest["tables"]["interactions"]["rows"]
    size = sum(s["bytes"] for s in manifest["tables"]["interactions"]["shards"])
    return {"rows": rows, "files": len(manifest["tables"]["interactions"]["shards"]),
            "bytes": size, "seconds": seconds, "rss": rss}


def train(name: str, shards: Path, stream: bool, work: Path) -> dict:
    config = dict(CONFIG, name=name, data={"kind": "shards", "path": str(shards),
                                           "stream": stream})
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = work / f"run-{name}"
    seconds, rss = _child(["-m", "trainer", "--config", str(path), "--output", str(out),
                           "--quiet"], work / f"{name}.log")
    metrics = json.loads((out / "metrics.json").read_text())
    shutil.rmtree(out)
    return {"name": name, "rss": rss, "wall": seconds,
            "clicks": metrics["train_positives"], "fit": metrics["train_seconds"],
            "examples_per_s": metrics["train_positives"] / metrics["train_seconds"],
            "hr@10": metrics["model"]["hr@10"], "hr@100": metrics["model"]["hr@100"],
            "test_pairs": metrics["model"]["test_pairs"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--clicks-per-user", type=int, default=200)
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--small-users", type=int, default=10_000,
                   help="the world both paths train on, side by side")
    p.add_argument("--exposures-per-user", type=int, default=0,
                   help="exposed-not-clicked rows per user (masked in-batch negatives)")
    p.add_argument("--small-only", action="store_true",
                   help="only the small world's two runs (no large world)")
    p.add_argument("--work", type=Path, default=None,
                   help="where the shards go (default: a new folder under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the shards")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    own = args.work is None
    work = Path(tempfile.mkdtemp(prefix="streaming-bench-")) if own else args.work
    work.mkdir(parents=True, exist_ok=True)
    results = {"generated": {}, "runs": []}
    try:
        worlds = (("large", args.users), ("small", args.small_users))
        for label, users in worlds[args.small_only:]:
            gen = generate(work / label, users, args.clicks_per_user, args.items,
                           args.exposures_per_user, work / f"generate-{label}.log")
            results["generated"][label] = gen
            print(f"{label}: {gen['rows']:,} interactions in {gen['files']} files "
                  f"({gen['bytes'] / 2**20:.0f} MiB) generated in {gen['seconds']:.0f} s, "
                  f"peak RSS {gen['rss'] / 2**30:.2f} GiB", flush=True)
        runs = (("streamed-large", "large", True), ("in-memory-small", "small", False),
                ("streamed-small", "small", True))
        for name, label, stream in runs[args.small_only:]:
            run = train(name, work / label, stream, work)
            results["runs"].append(run)
            print(f"{name}: {run['clicks']:,} clicks, peak RSS {run['rss'] / 2**30:.2f} GiB, "
                  f"{run['examples_per_s']:,.0f} examples/s", flush=True)
    finally:
        if not args.keep:   # the shards; a folder made here goes whole (logs too)
            for path in ([work] if own else [work / "large", work / "small"]):
                shutil.rmtree(path, ignore_errors=True)
    print("\n| run | training clicks | peak RSS (GiB) | fit (s) | examples/s | "
          "whole run (s) | HR@10 | HR@100 | test pairs |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results["runs"]:
        print(f"| {r['name']} | {r['clicks']:,} | {r['rss'] / 2**30:.2f} | {r['fit']:.0f} | "
              f"{r['examples_per_s']:,.0f} | {r['wall']:.0f} | {r['hr@10']:.4f} | "
              f"{r['hr@100']:.4f} | {r['test_pairs']:,} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
