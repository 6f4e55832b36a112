"""Each objective's loss equals a hand computation on a tiny batch."""
import numpy as np
import pytest
import tensorflow as tf

from trainer.config import NegativeSampling, ObjectiveConfig
from trainer.objective_registry import OBJECTIVES, NegativesPlan, plan_negatives
from trainer.objectives import (InBatchSoftmax, Listwise, MatrixFactorization,
                                PairwiseHinge, PairwiseLogistic, Pointwise, make_objective)
from trainer.sampling import mixed_candidate_probability

# Two queries, their positives, and two negatives each (unit vectors).
Q = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)
POS = np.array([[0.8, 0.6], [0.0, 1.0]], np.float32)
NEG = np.array([[[0.0, 1.0], [1.0, 0.0]],
                [[1.0, 0.0], [-0.6, 0.8]]], np.float32)
VALID = np.array([[1.0, 1.0], [1.0, 0.0]], np.float32)  # query 1's second negative unusable
pos_cos = (Q * POS).sum(1)          # [0.8, 0.8]
neg_cos = np.einsum("bd,bnd->bn", Q, NEG)  # [[0, 1], [0.6, 0.28]]


def softplus(x):
    return np.log1p(np.exp(x))


def run(obj, batch=None):
    batch = {"neg_valid": tf.constant(VALID)} if batch is None else batch
    return float(obj(tf.constant(Q), tf.constant(POS), tf.constant(NEG), batch))


def test_pointwise_is_binary_cross_entropy_on_cos_over_t():
    t = 0.5
    want = softplus(-pos_cos / t).sum() + (VALID * softplus(neg_cos / t)).sum()
    np.testing.assert_allclose(run(Pointwise(t)), want, rtol=1e-5)
    # the positive's term shrinks as cos -> +1, a negative's as cos -> -1
    assert softplus(-1 / t) < softplus(-0.8 / t) and softplus(-1 / t) < softplus(0 / t)


def test_pairwise_hinge_hand_computed():
    m = 0.3
    # q0: max(0, 0 + .3 - .8) = 0, max(0, 1 + .3 - .8) = .5; q1: max(0, .6 + .3 - .8) = .1
    np.testing.assert_allclose(run(PairwiseHinge(m)), 0.5 + 0.1, rtol=1e-5)


def test_pairwise_logistic_hand_computed():
    s = 4.0
    want = (VALID * softplus(s * (neg_cos - pos_cos[:, None]))).sum()
    np.testing.assert_allclose(run(PairwiseLogistic(s)), want, rtol=1e-5)


def test_listwise_softmax_cross_entropy_with_logq():
    t, logq = 0.5, np.array([[-1.0, 0.0], [0.5, 2.0]], np.float32)
    batch = {"neg_valid": tf.constant(VALID), "neg_logq": tf.constant(logq)}
    want_plain, want_q = 0.0, 0.0
    for b in range(2):
        for corr, acc in ((0.0, "plain"), (1.0, "q")):
            logits = [pos_cos[b] / t] + [neg_cos[b, n] / t - corr * logq[b, n]
                                         for n in range(2) if VALID[b, n]]
            loss = -(logits[0] - np.log(np.exp(logits).sum()))
            if acc == "plain":
                want_plain += loss
            else:
                want_q += loss
    np.testing.assert_allclose(run(Listwise(t, logq_correction=False), batch), want_plain,
                               rtol=1e-5)
    np.testing.assert_allclose(run(Listwise(t, logq_correction=True), batch), want_q, rtol=1e-5)


def test_matrix_factorization_squared_error():
    u = np.array([[1.0, 2.0], [0.5, -1.0], [0.0, 1.0]], np.float32)
    v = np.array([[0.5, 0.0], [1.0, 1.0], [2.0, 0.5]], np.float32)
    y = np.array([1.0, 0.0, 0.0], np.float32)
    w = np.array([1.0, 1.0, 0.1], np.float32)
    l2 = 0.01
    pred = (u * v).sum(1)  # [.5, -.5, .5]
    want = (w * (pred - y) ** 2).sum() + l2 * ((u ** 2).sum() + (v ** 2).sum())
    got = MatrixFactorization(l2)(tf.constant(u), tf.constant(v),
                                  {"label": tf.constant(y), "weight": tf.constant(w)})
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def _softmax_loss(logits, mask=None):
    total = 0.0
    for b in range(logits.shape[0]):
        row = logits[b].copy()
        if mask is not None:
            row = row[mask[b]]
            pos = int(mask[b, :b].sum())
        else:
            pos = b
        total += -(row[pos] - np.log(np.exp(row).sum()))
    return total


def test_in_batch_with_extra_candidates_score_mask_and_mixed_logq():
    # 2 queries, 2 in-batch candidates + 2 extra catalog draws.
    cands = np.array([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]], np.float32)
    rows = np.array([0, 1, 2, 3])
    p = np.array([0.5, 0.2, 0.1, 0.3], np.float32)   # in-batch (click) distribution
    q = np.array([0.3, 0.3, 0.2, 0.2], np.float32)   # catalog sampler
    prob = mixed_candidate_probability(tf.constant(p[:2]), tf.constant(q[:2]),
                                       tf.constant(p[2:]), tf.constant(q[2:]), "mixture")
    np.testing.assert_allclose(prob.numpy(), (2 * p + 2 * q) / 4, rtol=1e-6)
    mask = np.array([[True, True, True, True], [True, True, False, True]])  # extra 2 is q1's item
    obj = InBatchSoftmax(0.5, logq_correction=True, remove_accidental_hits=True)
    batch = {"candidate_prob": prob, "candidate_row": tf.constant(rows, tf.int64),
             "score_mask": tf.constant(mask)}
    got = float(obj(tf.constant(Q), tf.constant(cands), batch))
    logits = Q @ cands.T / 0.5 - np.log((2 * p + 2 * q) / 4)[None, :]
    np.testing.assert_allclose(got, _softmax_loss(logits, mask), rtol=1e-5)


def test_per_source_logq_terms():
    p, q = np.array([0.5, 0.2]), np.array([0.1, 0.4])
    got = mixed_candidate_probability(tf.constant(p[:1], tf.float32), tf.constant(q[:1], tf.float32),
                                      tf.constant(p[1:], tf.float32), tf.constant(q[1:], tf.float32),
                                      "per_source").numpy()
    np.testing.assert_allclose(got, [1 * 0.5 / 2, 1 * 0.4 / 2], rtol=1e-6)


def test_num_hard_negatives_keeps_the_hardest():
    cands = np.array([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]], np.float32)
    q3 = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], np.float32)
    obj = InBatchSoftmax(1.0, logq_correction=False, remove_accidental_hits=False,
                         num_hard_negatives=1)
    got = float(obj(tf.constant(q3), tf.constant(cands), {}))
    logits = q3 @ cands.T
    want = 0.0
    for b in range(3):
        negs = np.delete(logits[b], b)
        row = np.array([logits[b, b], negs.max()])
        want += -(row[0] - np.log(np.exp(row).sum()))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_logq_correction_is_exact_for_tiny_probabilities():
    """Probabilities far below TFRS's 1e-6 clip (a big catalog's tail) are still
    corrected by their own -log q."""
    cands = np.array([[0.8, 0.6], [0.0, 1.0]], np.float32)
    prob = np.array([2e-9, 5e-8], np.float32)
    obj = InBatchSoftmax(0.5, logq_correction=True, remove_accidental_hits=False)
    got = float(obj(tf.constant(Q), tf.constant(cands), {"item_prob": tf.constant(prob)}))
    logits = Q @ cands.T / 0.5 - np.log(prob.astype(np.float64))[None, :]
    np.testing.assert_allclose(got, _softmax_loss(logits, np.ones_like(logits, bool)),
                               rtol=1e-5)


def test_partial_logq_weight_halves_the_correction():
    """logq_weight w = 0.5: logits cos/T - 0.5 log q, hand-computed; w = 0 is no
    correction at all (the softmax ignores the constant log max q shift)."""
    cands = np.array([[0.8, 0.6], [0.0, 1.0]], np.float32)
    prob = np.array([0.5, 0.125], np.float32)
    # cos = [[0.8, 0], [0.96, 0.8]], / T=0.5; -0.5 log q = [0.34657, 1.03972]
    logits = np.array([[1.6 + 0.34657, 0.0 + 1.03972],
                       [1.92 + 0.34657, 1.6 + 1.03972]])
    want = -(logits[0, 0] - np.log(np.exp(logits[0]).sum())) \
        - (logits[1, 1] - np.log(np.exp(logits[1]).sum()))
    batch = {"item_prob": tf.constant(prob)}
    half = InBatchSoftmax(0.5, logq_correction=True, logq_weight=0.5,
                          remove_accidental_hits=False)
    np.testing.assert_allclose(float(half(tf.constant(Q), tf.constant(cands), batch)), want,
                               rtol=1e-5)
    none = InBatchSoftmax(0.5, logq_correction=True, logq_weight=0.0,
                          remove_accidental_hits=False)
    off = InBatchSoftmax(0.5, logq_correction=False, remove_accidental_hits=False)
    np.testing.assert_allclose(float(none(tf.constant(Q), tf.constant(cands), batch)),
                               float(off(tf.constant(Q), tf.constant(cands), batch)), rtol=1e-6)
    # listwise: negatives' logits cos/T - 0.5 neg_logq
    logq = np.array([[-1.0, 0.0], [0.5, 2.0]], np.float32)
    lw = {"neg_valid": tf.constant(VALID), "neg_logq": tf.constant(logq)}
    # q0: [0.8, 0, 1] / 0.5 -> [1.6, 0 + 0.5, 2 - 0]; q1: [1.6, 1.2 - 0.25] (its 2nd invalid)
    rows = [np.array([1.6, 0.5, 2.0]), np.array([1.6, 0.95])]
    want = sum(-(r[0] - np.log(np.exp(r).sum())) for r in rows)
    np.testing.assert_allclose(run(Listwise(0.5, logq_correction=True, logq_weight=0.5), lw),
                               want, rtol=1e-5)


def test_hard_negatives_are_chosen_on_raw_scores_before_logq():
    """A popular negative the model scores high (cos 0.9, p 0.5) is harder than a
    rare one it scores low (cos 0.5, p 0.001): mining keeps the popular one even
    though -log p lifts the rare one's corrected logit above it."""
    q = np.array([[1.0, 0.0]], np.float32)
    cands = np.array([[1.0, 0.0], [0.9, np.sqrt(1 - 0.81)], [0.5, np.sqrt(0.75)]],
                     np.float32)
    prob = np.array([0.3, 0.5, 0.001], np.float32)
    obj = InBatchSoftmax(1.0, logq_correction=True, remove_accidental_hits=False,
                         num_hard_negatives=1)
    got = float(obj(tf.constant(q), tf.constant(cands),
                    {"candidate_prob": tf.constant(prob)}))
    logits = (q @ cands.T)[0] - np.log(prob)
    kept = logits[[0, 1]]                      # the positive and the cos-0.9 negative
    np.testing.assert_allclose(got, -(kept[0] - np.log(np.exp(kept).sum())), rtol=1e-5)


@pytest.mark.parametrize("kind,cls", [
    ("in_batch_softmax", InBatchSoftmax), ("matrix_factorization", MatrixFactorization),
    ("pointwise", Pointwise), ("pairwise_hinge", PairwiseHinge),
    ("pairwise_logistic", PairwiseLogistic), ("listwise", Listwise)])
def test_every_kind_is_reachable_from_the_config(kind, cls):
    assert isinstance(make_objective(ObjectiveConfig(kind=kind)), cls)


@pytest.mark.parametrize("kind", sorted(OBJECTIVES))
def test_every_loss_has_an_honest_config(kind):
    """The options the registry passes are the config, and from_config rebuilds them."""
    config = ObjectiveConfig(kind=kind, temperature=0.3, margin=0.4, sigma=5.0,
                             l2_regularization=0.01, logq_correction=True, logq_weight=0.25)
    loss = make_objective(config)
    options = {name: loss.get_config()[name] for name in OBJECTIVES[kind].loss_options}
    assert options == {name: getattr(config, name) for name in OBJECTIVES[kind].loss_options}
    clone = tf.keras.layers.deserialize(tf.keras.layers.serialize(loss))
    assert type(clone) is type(loss) and clone.get_config() == loss.get_config()


def test_hard_source_auto_means_one_thing_for_batches_and_model():
    neg = NegativeSampling(num_negatives=4, hard_fraction=0.5, hard_source="auto")
    assert plan_negatives("listwise", neg, has_ranking_log=True) == \
        NegativesPlan(num_easy=2, num_hard=2, hard_source="ranking_log")
    mined = plan_negatives("listwise", neg, has_ranking_log=False)
    assert mined == NegativesPlan(2, 2, "mined") and mined.num_mined == 2
    assert plan_negatives("listwise", neg, True).num_mined == 0   # the log, not mining
    assert plan_negatives("in_batch_softmax", NegativeSampling(), True) == NegativesPlan()
    with pytest.raises(ValueError, match="hard_source=ranking_log but the data has no"):
        plan_negatives("pointwise", neg.model_copy(update={"hard_source": "ranking_log"}),
                       has_ranking_log=False)
