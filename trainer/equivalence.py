"""``python -m trainer.equivalence``: one worker of a multi-worker check that the
global-batch loss and gradient are those of a single worker, then a training.

Every worker of the cluster (``TF_CONFIG``) runs the same command. On a fixed
global batch (the first batch of the run's pipeline, the same on every
worker) each replica takes its rows ``[r B/R, (r+1) B/R)`` and computes its
loss and gradient under ``MultiWorkerMirroredStrategy`` (candidates gathered
across replicas, trainer.global_batch); their sums are compared with the
loss and gradient of the whole batch computed in one piece (no replica
context: the single-worker code path) on the same weights. The result is
written as JSON (``--json``), then the config trains with the strategy and
the chief commits ``--output`` (tests/test_distributed.py,
benchmarks/distributed_training.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf


def _rows(batch: dict, start, size) -> dict:
    """Rows [start, start + size) of every per-query tensor of an in-batch batch
    (the score mask is recomputed for the gathered candidates, so dropped)."""
    out = {}
    for key, value in batch.items():
        if key == "score_mask":
            continue
        out[key] = tf.nest.map_structure(lambda t: t[start:start + size], value)
    return out


def global_batch_equivalence(model, batch: dict, strategy: tf.distribute.Strategy) -> dict:
    """{"distributed_loss", "single_loss", "loss_diff", "per_query_diff",
    "max_grad_diff", "grad_rel_diff", "replicas", "global_batch"} for one fixed
    in-batch batch (grad_rel_diff: the largest difference over the largest
    gradient entry; gradients of a sum over B queries grow with B)."""
    variables = model.trainable_variables
    global_b = int(batch["item_row"].shape[0])

    @tf.function
    def replica_step(full):
        ctx = tf.distribute.get_replica_context()
        size = global_b // ctx.num_replicas_in_sync
        local = _rows(full, ctx.replica_id_in_sync_group * size, size)
        with tf.GradientTape() as tape:
            loss = model.compute_loss(local, training=False)
        grads = tape.gradient(loss, variables)
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, (loss, grads))

    dist_loss, dist_grads = strategy.run(replica_step, args=(batch,))
    dist_loss = float(strategy.experimental_local_results(dist_loss)[0])
    dist_grads = [tf.convert_to_tensor(strategy.experimental_local_results(g)[0])
                  for g in dist_grads]
    with tf.GradientTape() as tape:   # cross-replica context: one worker, whole batch
        single = model.compute_loss(batch, training=False)
    single_grads = tape.gradient(single, variables)
    pairs = [(tf.convert_to_tensor(a).numpy(), b.numpy())
             for a, b in zip(single_grads, dist_grads) if a is not None]
    diff = max(float(np.max(np.abs(a - b))) for a, b in pairs)
    scale = max(float(np.max(np.abs(a))) for a, _ in pairs)
    single = float(single)
    return {"distributed_loss": dist_loss, "single_loss": single,
            "loss_diff": abs(dist_loss - single),
            "per_query_diff": abs(dist_loss - single) / global_b,
            "max_grad_diff": diff, "grad_rel_diff": diff / scale,
            "replicas": strategy.num_replicas_in_sync,
            "global_batch": global_b}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.equivalence", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="YAML run config")
    p.add_argument("--output", type=Path, required=True, help="run directory (chief)")
    p.add_argument("--json", type=Path, required=True, help="where to write the check")
    p.add_argument("--epochs", type=int, default=None, help="override training.epochs")
    args = p.parse_args(argv)

    from trainer.batches import TrainingBatches
    from trainer.config import load_config
    from trainer.data import load_tables
    from trainer.distributed import Distribution
    from trainer.objective_registry import OBJECTIVES
    from trainer.prepare import prepare_data
    from trainer.train import build_model, train

    dist = Distribution.from_flag("multi_worker")
    config = load_config(args.config, [])
    if args.epochs:
        config.training.epochs = args.epochs
    if OBJECTIVES[config.objective.kind].batch != "in_batch":
        raise SystemExit("the check compares in-batch softmax objectives")
    tf.keras.utils.set_random_seed(config.training.seed)
    prepared = prepare_data(config, load_tables(config.data))
    batches = TrainingBatches(prepared, config)
    batch = next(iter(batches.dataset(config.training.batch_size, config.training.seed)))
    with dist.scope():
        model = build_model(config, prepared)
        model(batch)
    dist.prepare_model(model, batches)
    result = global_batch_equivalence(model, batch, dist.strategy)
    if dist.is_chief:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    run = train(config, args.output, verbose=2, distribution=dist)
    if not dist.is_chief:
        print(f"{dist.task_type} {dist.task_id}: done (the chief writes {run.output_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
