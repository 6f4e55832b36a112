"""The in-batch softmax loss, with and without logQ, equals a hand computation."""
import numpy as np
import tensorflow as tf

from trainer.objectives import InBatchSoftmax

Q = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], np.float32)
C = np.array([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]], np.float32)
P = np.array([0.5, 0.3, 0.2], np.float32)


def hand_loss(temperature, prob=None, ids=None):
    logits = Q @ C.T / temperature
    if prob is not None:
        logits = logits - np.log(prob)[None, :]
    total = 0.0
    for i in range(len(Q)):
        row = logits[i].copy()
        if ids is not None:  # other copies of the positive are not negatives
            row[(ids == ids[i]) & (np.arange(len(ids)) != i)] = -np.inf
        total += -(row[i] - np.log(np.sum(np.exp(row))))
    return total  # TFRS Retrieval sums over the batch


def batch(ids=(0, 1, 2)):
    return {"item_prob": tf.constant(P), "item_row": tf.constant(ids, tf.int64)}


def test_logq_matches_hand_computation_and_changes_loss():
    with_q = InBatchSoftmax(0.2, logq_correction=True, remove_accidental_hits=False)
    without = InBatchSoftmax(0.2, logq_correction=False, remove_accidental_hits=False)
    lq = float(with_q(tf.constant(Q), tf.constant(C), batch()))
    l0 = float(without(tf.constant(Q), tf.constant(C), batch()))
    np.testing.assert_allclose(lq, hand_loss(0.2, P), rtol=1e-5)
    np.testing.assert_allclose(l0, hand_loss(0.2), rtol=1e-5)
    assert abs(lq - l0) > 0.05


def test_logq_penalises_popular_negatives_less():
    # Query 0's negatives are candidates 1 and 2; making candidate 1 very popular
    # lowers its corrected logit, so query 0's loss must go down.
    obj = InBatchSoftmax(1.0, logq_correction=True, remove_accidental_hits=False)
    base = {"item_prob": tf.constant([0.2, 0.2, 0.2]), "item_row": tf.constant([0, 1, 2], tf.int64)}
    pop = {"item_prob": tf.constant([0.2, 0.9, 0.2]), "item_row": tf.constant([0, 1, 2], tf.int64)}
    q0 = tf.constant(Q[:1])
    c = tf.constant(C)
    # single query row against three candidates (extra candidates are negatives)
    assert float(obj(q0, c, pop)) < float(obj(q0, c, base))


def test_accidental_hits_removed():
    ids = np.array([7, 7, 3])
    obj = InBatchSoftmax(0.5, logq_correction=False, remove_accidental_hits=True)
    got = float(obj(tf.constant(Q), tf.constant(C), batch(ids)))
    np.testing.assert_allclose(got, hand_loss(0.5, ids=ids), rtol=1e-5)
