"""The objectives registry: per objective kind, everything the trainer must know.

One entry per ``objective.kind`` says which loss layer it trains with
(trainer.objectives), which ``ObjectiveConfig`` fields that layer takes, the
batch it needs (trainer.batches builds it, trainer.model consumes it), the
optional switches it uses (every other objective refuses them) and any extra
check of the run config. Config validation (trainer.config), the batch
builder and the model all read it, so adding an objective is one entry here
plus its loss layer. No TensorFlow here: config validation imports it.

Batch kinds:

- ``in_batch``: the batch's positives are each other's negatives, plus
  ``sampling.negatives.extra_candidates`` catalog draws (a score mask keeps
  the user's own items out);
- ``per_query``: ``sampling.negatives.num_negatives`` negatives per positive,
  a ``hard_fraction`` of them hard: from the ranking log, or mined in-graph
  from a pool of catalog draws (``plan_negatives`` decides which);
- ``labelled``: every training row (clicked -> 1, exposed -> 0) plus
  uniformly drawn unobserved items (label 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

BatchKind = Literal["in_batch", "per_query", "labelled"]
# Optional switches that only some objectives use: key -> "is it on in this run config?".
SWITCHES: dict[str, Callable[[object], bool]] = {
    "objective.num_hard_negatives": lambda c: bool(c.objective.num_hard_negatives),
    "objective.unobserved_per_row": lambda c: bool(c.objective.unobserved_per_row),
    "objective.logq=streaming": lambda c: c.objective.logq == "streaming",
    "objective.logq_weight": lambda c: c.objective.logq_weight != 1.0,
    "sampling.negatives.extra_candidates": lambda c: bool(c.sampling.negatives.extra_candidates),
    "sampling.negatives.hard_fraction": lambda c: bool(c.sampling.negatives.hard_fraction),
}


@dataclass(frozen=True)
class ObjectiveEntry:
    loss: str                         # class name in trainer.objectives
    batch: BatchKind
    loss_options: tuple[str, ...]     # ObjectiveConfig fields passed to the loss layer
    switches: frozenset[str] = frozenset()   # keys of SWITCHES this objective uses
    check: Optional[Callable[[object], None]] = None   # check(run_config), raises ValueError


def _plain_id_towers(config) -> None:
    kind = config.objective.kind
    if any(t.l2_normalize for t in (config.model.query_tower, config.model.candidate_tower)):
        raise ValueError(f"objective.kind={kind} scores with the plain inner product: set "
                         "model.query_tower.l2_normalize and "
                         "model.candidate_tower.l2_normalize to false")
    names = ([f.name for f in config.features.user], [f.name for f in config.features.item])
    if names != (["user_id"], ["item_id"]):
        raise ValueError(f"objective.kind={kind} is the id-only baseline: features.user "
                         "must be [user_id] and features.item [item_id]")


def _streaming_logq_fits(config) -> None:
    objective, negatives = config.objective, config.sampling.negatives
    if objective.logq == "streaming" and (negatives.extra_candidates
                                          or not objective.logq_correction):
        raise ValueError("objective.logq=streaming needs objective.logq_correction "
                         "and no sampling.negatives.extra_candidates (their mixture "
                         "probability comes from the static counts)")


def _logq_weight_fits(config) -> None:
    objective = config.objective
    if objective.logq_weight != 1.0 and not objective.logq_correction:
        raise ValueError(f"objective.logq_weight={objective.logq_weight:g} weighs the logQ "
                         "correction, but objective.logq_correction is false: set it to "
                         "true, or drop logq_weight")


def _in_batch_checks(config) -> None:
    _streaming_logq_fits(config)
    _logq_weight_fits(config)


_PER_QUERY = frozenset({"sampling.negatives.hard_fraction"})
OBJECTIVES: dict[str, ObjectiveEntry] = {
    "in_batch_softmax": ObjectiveEntry(
        "InBatchSoftmax", "in_batch",
        ("temperature", "logq_correction", "logq_weight", "remove_accidental_hits",
         "num_hard_negatives"),
        frozenset({"objective.num_hard_negatives", "objective.logq=streaming",
                   "objective.logq_weight", "sampling.negatives.extra_candidates"}),
        check=_in_batch_checks),
    "matrix_factorization": ObjectiveEntry(
        "MatrixFactorization", "labelled", ("l2_regularization",),
        frozenset({"objective.unobserved_per_row"}), check=_plain_id_towers),
    "pointwise": ObjectiveEntry("Pointwise", "per_query", ("temperature",), _PER_QUERY),
    "pairwise_hinge": ObjectiveEntry("PairwiseHinge", "per_query", ("margin",), _PER_QUERY),
    "pairwise_logistic": ObjectiveEntry("PairwiseLogistic", "per_query", ("sigma",),
                                        _PER_QUERY),
    "listwise": ObjectiveEntry("Listwise", "per_query",
                               ("temperature", "logq_correction", "logq_weight"),
                               _PER_QUERY | {"objective.logq_weight"}, check=_logq_weight_fits),
}
OBJECTIVE_KINDS = tuple(OBJECTIVES)


def check_objective(config) -> None:
    """The objective's own check of a RunConfig, then refuse the switches it does
    not use (no option is silently ignored)."""
    kind = config.objective.kind
    entry = OBJECTIVES[kind]
    if entry.check is not None:
        entry.check(config)
    unused = [key for key, used in SWITCHES.items()
              if key not in entry.switches and used(config)]
    if unused:
        raise ValueError(f"{', '.join(unused)}: not used by objective.kind={kind}")


@dataclass(frozen=True)
class NegativesPlan:
    """How many negatives per positive a per-query batch holds, and where the
    hard ones come from (``hard_source``: "ranking_log", "mined" or None)."""

    num_easy: int = 0
    num_hard: int = 0
    hard_source: Optional[str] = None

    @property
    def num_mined(self) -> int:
        """Hard negatives the model mines in-graph from the batch's pool."""
        return self.num_hard if self.hard_source == "mined" else 0


def plan_negatives(objective_kind: str, negatives, has_ranking_log: bool) -> NegativesPlan:
    """The one reading of ``sampling.negatives`` for an objective and a data set.

    ``hard_source: auto`` is the ranking log when the data has one (non-empty),
    else mined; ``ranking_log`` without one is an error.
    """
    if OBJECTIVES[objective_kind].batch != "per_query":
        return NegativesPlan()
    num_hard = int(round(negatives.hard_fraction * negatives.num_negatives))
    source = None
    if num_hard:
        source = negatives.hard_source
        if source == "auto":
            source = "ranking_log" if has_ranking_log else "mined"
        if source == "ranking_log" and not has_ranking_log:
            raise ValueError("sampling.negatives.hard_source=ranking_log but the data "
                             "has no ranking log (use 'mined' or 'auto')")
    return NegativesPlan(negatives.num_negatives - num_hard, num_hard, source)


# Switches a tf.distribute strategy cannot train (key of SWITCHES -> why). Every
# objective kind itself works under both strategies (trainer.distributed):
# in-batch ones over the global batch (trainer.global_batch) with
# multi_worker, over each worker's own batch with parameter_server
# (asynchronous workers share no batch); per-query and labelled ones per row.
DISTRIBUTED_REFUSALS: dict[str, str] = {
    "objective.logq=streaming": (
        "the streaming frequency estimate (trainer/frequency.py) updates its hash "
        "tables in place once per step; under a strategy every replica would update its "
        "own copy with its own slice of the batch. Use objective.logq: static (item "
        "counts of the training data) or train without --strategy"),
}


def check_distributed(config, strategy: str) -> None:
    """Refuse, with the reason, a run config that ``strategy`` cannot train."""
    refused = [f"{key}: not supported with --strategy {strategy}: {why}"
               for key, why in DISTRIBUTED_REFUSALS.items() if SWITCHES[key](config)]
    if refused:
        raise ValueError("; ".join(refused))
