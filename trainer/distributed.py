"""Training on a tf.distribute cluster described by ``TF_CONFIG``.

``python -m trainer ... --strategy S`` (docs/DISTRIBUTED.md):

- ``default``: one process, no strategy (what every run did before);
- ``multi_worker``: ``MultiWorkerMirroredStrategy``, synchronous data
  parallelism. Every worker runs the same command with its own ``TF_CONFIG``;
  each streams its shard of the training rows (``batch_size`` is the GLOBAL
  batch, split evenly over the replicas) and the in-batch softmax runs over
  the global batch (trainer.global_batch);
- ``parameter_server``: ``ParameterServerStrategy``: the ``chief`` task is
  the coordinator that runs the command, ``worker`` and ``ps`` tasks only
  serve (``serve_forever``); variables of at least
  ``min_shard_bytes`` (the id embedding tables) are partitioned over the
  parameter servers (``MinSizePartitioner``), and workers train
  asynchronously, each in-batch softmax over its own batch;
- ``auto`` (the flag's default): ``default`` without ``TF_CONFIG``, else
  ``parameter_server`` if its cluster has ``ps`` tasks, else ``multi_worker``.

Only the chief writes the run directory, report and towers. The other
workers take part in every collective step (saving included) but write into
a temporary directory that is deleted at the end (the TF multi-worker
guide's pattern); they read and write the chief's ``BackupAndRestore``
backup (``<output>.staging/backup``, on a file system all workers share), so
a cluster restarted after a worker died resumes from the last epoch.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import tensorflow as tf

from trainer import run_dir

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "default", "multi_worker", "parameter_server")
# ParameterServerStrategy: variables from this size up are split over the ps tasks.
MIN_SHARD_BYTES = 256 << 10


@dataclass(frozen=True)
class FitInput:
    """What ``fit`` trains on under a strategy: a (distributed) dataset or a
    ``DatasetCreator``, a local batch that builds the variables, and the
    steps of an epoch (workers must agree on it; the input repeats)."""

    dataset: Any
    sample: dict
    steps_per_epoch: int


def cluster_spec() -> dict:
    """``TF_CONFIG`` parsed: {"cluster": {...}, "task": {"type", "index"}} ({} if unset)."""
    raw = os.environ.get("TF_CONFIG", "")
    if not raw.strip():
        return {}
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"TF_CONFIG: not JSON ({err})") from None
    if not isinstance(spec, dict) or "cluster" not in spec or "task" not in spec:
        raise ValueError("TF_CONFIG: needs 'cluster' (task type -> addresses) and 'task' "
                         "({'type': ..., 'index': ...})")
    return spec


def resolve_kind(requested: str, spec: dict) -> str:
    """The strategy a run uses: ``requested`` unless ``auto`` (see the module doc)."""
    if requested not in STRATEGIES:
        raise ValueError(f"--strategy {requested!r}: choose one of {', '.join(STRATEGIES)}")
    if requested != "auto":
        if requested != "default" and not spec:
            raise ValueError(f"--strategy {requested} needs TF_CONFIG (the cluster and this "
                             "task), see docs/DISTRIBUTED.md")
        return requested
    if not spec:
        return "default"
    return "parameter_server" if spec["cluster"].get("ps") else "multi_worker"


class Distribution:
    """How one process takes part in a run: its strategy and its role.

    ``Distribution()`` is the plain single-process run (no strategy)."""

    def __init__(self, kind: str = "default", strategy: Optional[tf.distribute.Strategy] = None,
                 task_type: Optional[str] = None, task_id: int = 0):
        self.kind, self.strategy = kind, strategy
        self.task_type, self.task_id = task_type, task_id

    @classmethod
    def from_flag(cls, requested: str = "auto",
                  min_shard_bytes: int = MIN_SHARD_BYTES) -> "Distribution":
        spec = cluster_spec()
        kind = resolve_kind(requested, spec)
        if kind == "default":
            return cls()
        task = spec["task"]
        task_type, task_id = task.get("type"), int(task.get("index", 0))
        if kind == "multi_worker":
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
        else:
            resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
            if task_type in ("worker", "ps"):
                serve_forever(resolver)
            num_ps = len(spec["cluster"].get("ps", ()))
            if not num_ps:
                raise ValueError("--strategy parameter_server: TF_CONFIG has no 'ps' tasks")
            partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
                min_shard_bytes=min_shard_bytes, max_shards=num_ps)
            strategy = tf.distribute.experimental.ParameterServerStrategy(
                resolver, variable_partitioner=partitioner)
        return cls(kind, strategy, task_type, task_id)

    @property
    def is_chief(self) -> bool:
        """The task that writes the run: ``chief``, else worker 0 (or no cluster)."""
        if self.strategy is None or self.task_type == "chief":
            return True
        has_chief = bool(self.strategy.cluster_resolver.cluster_spec().as_dict().get("chief"))
        return self.task_type == "worker" and self.task_id == 0 and not has_chief

    def scope(self):
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def staging(self, out: Path, resumable) -> Path:
        """Where this task writes: the chief the run's staging directory, the
        others a temporary directory (deleted by ``finish``). Every task's
        backup is the chief's (``backup_dir``)."""
        self._backup = run_dir.staging_dir(out) / "backup"
        if self.is_chief:
            return run_dir.open_staging(out, resumable=resumable)
        return Path(tempfile.mkdtemp(prefix=f"{self.task_type}-{self.task_id}-"))

    def backup_dir(self, fit_dir: Path) -> Path:
        """BackupAndRestore's directory: the chief's staging backup for every task
        of a run started by ``staging``, else ``fit_dir/backup``."""
        return getattr(self, "_backup", None) or fit_dir / "backup"

    def finish(self, out: Path, staging: Path) -> None:
        if self.is_chief:
            run_dir.commit(out)
        else:
            shutil.rmtree(staging, ignore_errors=True)

    def fit_input(self, batches, batch_size: int, seed: int) -> Optional[FitInput]:
        """The input of ``fit`` for this strategy (None: the plain dataset).

        ``batches``: a ``TrainingBatches``. multi_worker: each input pipeline
        takes its shard of the rows, ``batch_size`` / replicas per replica,
        remainder dropped (replicas gather equal blocks); parameter_server:
        each worker a whole ``batch_size`` batch per step.
        """
        if self.strategy is None:
            return None
        steps = max(1, batches.num_rows // batch_size)
        if self.kind == "multi_worker":
            replicas = self.strategy.num_replicas_in_sync
            if batch_size % replicas:
                raise ValueError(f"training.batch_size={batch_size} must be a multiple of "
                                 f"the {replicas} replicas (it is the global batch)")

            def per_pipeline(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
                return batches.dataset(ctx.get_per_replica_batch_size(batch_size), seed,
                                       shard=(ctx.num_input_pipelines, ctx.input_pipeline_id),
                                       drop_remainder=True).repeat()

            dataset = self.strategy.distribute_datasets_from_function(per_pipeline)
            sample = next(iter(batches.dataset(batch_size // replicas, seed)))
        else:
            dataset = tf.keras.utils.experimental.DatasetCreator(
                lambda ctx: batches.dataset(batch_size, seed, drop_remainder=True).repeat())
            sample = next(iter(batches.dataset(batch_size, seed)))
        return FitInput(dataset, sample, steps)

    def prepare_model(self, model, batches) -> None:
        """Under multi_worker: the model's in-batch softmax over the global batch.
        Under parameter_server: logs the partitioned variables."""
        if self.kind == "parameter_server":
            for name, shards in sharded_variables(model):
                log.info("variable %s partitioned over the ps tasks: %s", name,
                         " + ".join(str(list(s)) for s in shards))
        if self.kind == "multi_worker":
            from trainer.global_batch import GlobalCandidates

            model.global_candidates = GlobalCandidates(batches.score_mask)


def sharded_variables(model) -> list[tuple[str, list[tuple]]]:
    """(variable path, shard shapes) of the model's ``ShardedVariable``s
    (ParameterServerStrategy), e.g. ("query_tower/embeddings", [(201, 16), (200, 16)])."""
    from tensorflow.python.distribute.sharded_variable import ShardedVariable

    found = []
    for tower in (model.query_tower, model.candidate_tower):
        for layer in (tower, *tower.submodules):   # Keras tracks the shards, layers the whole
            for attr, value in vars(layer).items():
                if isinstance(value, ShardedVariable):
                    found.append((f"{tower.name}/{attr}",
                                  [tuple(v.shape) for v in value.variables]))
    return found


def serve_forever(resolver) -> None:
    """A ``worker`` or ``ps`` task of ParameterServerStrategy: serve until killed."""
    log.info("serving as %s %d of a parameter-server cluster", resolver.task_type,
             resolver.task_id)
    server = tf.distribute.Server(resolver.cluster_spec(), job_name=resolver.task_type,
                                  task_index=resolver.task_id, protocol="grpc", start=True)
    server.join()
