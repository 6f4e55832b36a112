"""1 worker vs 2 workers (MultiWorkerMirroredStrategy) on loopback, same global steps.

    python benchmarks/distributed_training.py [--config configs/synthetic.yaml] [--epochs 2]

Runs, each a cluster of subprocesses with TF_CONFIG on 127.0.0.1:

1. 2 workers, global batch B (B/2 per replica): ``python -m trainer.equivalence``
   (the fixed-global-batch loss/gradient check of tests/test_distributed.py),
   then the training;
2. 1 worker, global batch B: the same global steps on one replica;
3. 1 worker, batch B/2 (twice the steps): a step with the per-replica work of
   run 1 and no cross-worker traffic.

ms/step is Keras' figure for the last epoch (the first one includes tracing).

Prints one table (examples/s, last-epoch ms/step, loss and HR@K after the
same global steps) and the all-reduce + all-gather cost per step estimated
as step(run 1) - step(run 3). On one machine the two workers share its cores,
so no speed-up is expected; the difference is what the collectives cost.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from local_cluster import cluster, run_cluster  # noqa: E402


def _ms_per_step(log: str) -> float:
    """Keras' last 'N/N - ... - 86ms/step' (or '1s/step') line."""
    found = re.findall(r"- (\d+(?:\.\d+)?)(ms|s|us)/step", log)
    value, unit = found[-1]
    return float(value) * {"ms": 1.0, "s": 1000.0, "us": 0.001}[unit]


def _run(name, work: Path, config: Path, workers: int, batch: int, epochs: int,
         equivalence: bool) -> dict:
    d = work / name
    d.mkdir()
    override = d / "batch.yaml"
    override.write_text(yaml.safe_dump({"training": {"batch_size": batch}}))
    merged = d / "config.yaml"
    from trainer.config import dump_config, load_config

    merged.write_text(dump_config(load_config(config, [override])))
    if equivalence:
        args = ["-m", "trainer.equivalence", "--config", str(merged), "--output",
                str(d / "run"), "--json", str(d / "check.json"), "--epochs", str(epochs)]
    else:
        args = ["-m", "trainer", "--config", str(merged), "--output", str(d / "run"),
                "--quiet", "--strategy", "multi_worker", "--epochs", str(epochs)]
    run_cluster(cluster(worker=workers), lambda kind, index: args,
                [("worker", i) for i in range(workers)], d, timeout=1800)
    metrics = json.loads((d / "run" / "metrics.json").read_text())
    history = json.loads((d / "run" / "history.json").read_text())
    steps = int(re.findall(r"(\d+)/\1 - ", (d / "worker0.log").read_text())[-1])
    out = {"name": name, "workers": workers, "batch": batch, "steps_per_epoch": steps,
           "epochs": len(history["loss"]),
           "examples_per_s": steps * batch * len(history["loss"]) / metrics["train_seconds"],
           "ms_per_step": _ms_per_step((d / "worker0.log").read_text()),
           "loss": history["loss"][-1], "model": metrics["model"]}
    if equivalence:
        out["check"] = json.loads((d / "check.json").read_text())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "synthetic.yaml")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    from trainer.config import load_config

    batch = load_config(args.config, []).training.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runs = [_run("2 workers", work, args.config, 2, batch, args.epochs, True),
                _run("1 worker", work, args.config, 1, batch, args.epochs, False),
                _run("1 worker, half batch", work, args.config, 1, batch // 2, args.epochs,
                     False)]
    hr = sorted((k for k in runs[0]["model"] if k.startswith("hr@")),
                key=lambda k: int(k[3:]))
    print(f"| run | global batch | steps/epoch | epochs | examples/s | ms/step (last epoch) "
          f"| loss (last epoch) | {' | '.join(hr)} |")
    print("|" + " --- |" * (7 + len(hr)))
    for r in runs:
        print(f"| {r['name']} | {r['batch']} | {r['steps_per_epoch']} | {r['epochs']} | "
              f"{r['examples_per_s']:,.0f} | {r['ms_per_step']:.0f} | {r['loss']:.2f} | "
              + " | ".join(f"{r['model'][k]:.4f}" for k in hr) + " |")
    two, half = runs[0], runs[2]
    print(f"\nall-reduce + all-gather per step ~ {two['ms_per_step'] - half['ms_per_step']:.0f} ms "
          f"(2 workers at B/2 each: {two['ms_per_step']:.0f} ms/step; 1 worker at B/2: "
          f"{half['ms_per_step']:.0f} ms/step)")
    c = two["check"]
    print(f"equivalence on a fixed global batch of {c['global_batch']}: 2-worker loss "
          f"{c['distributed_loss']:.6f} vs 1 worker {c['single_loss']:.6f} (|diff| "
          f"{c['loss_diff']:.2e}, per query {c['per_query_diff']:.2e}); gradients: max |diff| "
          f"{c['max_grad_diff']:.2e} = {c['grad_rel_diff']:.2e} of the largest entry")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
