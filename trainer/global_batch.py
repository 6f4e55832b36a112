"""The in-batch softmax over the GLOBAL batch under a synchronous strategy.

Under ``MultiWorkerMirroredStrategy`` each replica holds 1/R of the global
batch. Left alone, its softmax would only see its own B/R candidates, so the
negatives (and the logQ terms that correct for them) would change with the
number of workers (tensorflow/recommenders #561, #274, #222; TFRS dropped
its own ``_cross_replica_concat``). ``GlobalCandidates`` all-gathers, per
in-batch step, the candidate embeddings, their item rows (accidental hits)
and their sampling probabilities (logQ) across replicas with
``ReplicaContext.all_gather`` (whose gradient all-reduces back to the
replica that made each embedding), and recomputes the score mask's columns
for the gathered candidates from this replica's user rows. Each replica then
scores its B/R queries against all B candidates (+ R x E extra draws). The
loss stays the project's sum over queries: Keras sums the replicas' losses
and gradients, so the step's loss and gradient are those of one worker on
the whole global batch (tests/test_distributed.py checks both).

Order: the gathered in-batch block is rolled so that this replica's own
candidates come first - query b's positive stays in column b, which is
where TFRS's Retrieval task puts the label. Every replica must hold the same
number of rows (the distributed input drops the remainder batch).
"""
from __future__ import annotations

from typing import Callable, Optional

import tensorflow as tf

# score_mask(user rows [B], in-batch item rows [C], extra item rows [E] or None)
#   -> bool [B, C + E] or None (trainer.batches.TrainingBatches.score_mask)
ScoreMaskFn = Callable[[tf.Tensor, tf.Tensor, Optional[tf.Tensor]], Optional[tf.Tensor]]


class GlobalCandidates:
    """``(batch, in-batch candidates [B, d], extra [E, d] or None) ->
    (candidates [C, d], batch)`` with ``candidate_row`` / ``candidate_prob``
    [C] and ``score_mask`` [B, C] of the global batch (C = R B + R E); with a
    single replica (or outside ``strategy.run``) the replica's own batch."""

    def __init__(self, score_mask: ScoreMaskFn):
        self.score_mask = score_mask

    def __call__(self, batch: dict, candidate: tf.Tensor, extra: Optional[tf.Tensor]):
        ctx = tf.distribute.get_replica_context()
        if ctx is None or ctx.num_replicas_in_sync == 1:
            return _local(batch, candidate, extra)
        b = tf.shape(candidate)[0]
        if extra is None:
            rows, prob = batch["item_row"], batch["item_prob"]
        else:
            rows, prob = batch["candidate_row"], batch["candidate_prob"]
        shift = -tf.cast(ctx.replica_id_in_sync_group, tf.int32) * b
        emb, g_rows, g_prob = (tf.roll(ctx.all_gather(t, axis=0), shift, axis=0)
                               for t in (candidate, rows[:b], prob[:b]))
        extra_rows = None
        if extra is not None:   # every replica's draws, after the in-batch block
            ex_emb, extra_rows, ex_prob = (ctx.all_gather(t, axis=0)
                                           for t in (extra, rows[b:], prob[b:]))
            emb = tf.concat([emb, ex_emb], 0)
            g_prob = tf.concat([g_prob, ex_prob], 0)
        out = dict(batch, candidate_row=(g_rows if extra_rows is None
                                         else tf.concat([g_rows, extra_rows], 0)),
                   candidate_prob=g_prob)
        out.pop("score_mask", None)
        mask = self.score_mask(batch["user_row"], g_rows, extra_rows)
        if mask is not None:
            out["score_mask"] = mask
        return emb, out


def _local(batch, candidate, extra):
    if extra is None:
        return candidate, batch
    return tf.concat([candidate, extra], axis=0), batch
