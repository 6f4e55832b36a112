"""Samplers: frequencies ∝ clicks^alpha, exclusions, ranking log, mining, re-balancing."""
import numpy as np
import tensorflow as tf

from trainer.sampling import (CatalogSampler, ExclusionSet, RankingLogSampler,
                              effective_item_probability, mine_hard_negatives,
                              sample_excluding, subsample_keep_probability, upsample_cold)

SEED = tf.constant([3, 4], tf.int64)


def test_catalog_frequencies_follow_clicks_to_the_alpha():
    counts = np.array([1000, 300, 100, 30, 10, 3, 1, 0], np.float64)
    sampler = CatalogSampler(counts, alpha=0.75)
    want = np.where(counts > 0, counts ** 0.75, 0)
    want /= want.sum()
    np.testing.assert_allclose(sampler.prob, want, rtol=1e-12)
    draws = sampler.sample([200_000], SEED).numpy()
    freq = np.bincount(draws, minlength=len(counts)) / len(draws)
    # binomial standard error at n = 200k is < 0.0012; allow 4 sigma
    np.testing.assert_allclose(freq, want, atol=0.005)
    assert freq[-1] == 0.0  # never-clicked items are never drawn
    # alpha = 0 is uniform over clicked items, alpha = 1 the click distribution
    np.testing.assert_allclose(CatalogSampler(counts, 0.0).prob[:-1], 1 / 7)
    np.testing.assert_allclose(CatalogSampler(counts, 1.0).prob, counts / counts.sum())


def test_exclusion_set_membership():
    ex = ExclusionSet(np.array([0, 0, 2]), np.array([1, 3, 0]), num_items=5)
    users = tf.constant([[0], [1], [2]], tf.int64)
    items = tf.constant([[0, 1, 3]], tf.int64)
    got = ex.contains(users, items).numpy()
    np.testing.assert_array_equal(got, [[False, True, True], [False, False, False],
                                        [True, False, False]])


def test_sampled_negatives_never_hit_the_users_own_items():
    num_items = 20
    rng = np.random.default_rng(0)
    users, items = [], []
    for u in range(50):
        own = rng.choice(num_items, size=rng.integers(1, 15), replace=False)
        users += [u] * len(own)
        items += list(own)
    users += [50] * 19           # user 50 has every item but item 7
    items += [i for i in range(num_items) if i != 7]
    users, items = np.array(users), np.array(items)
    ex = ExclusionSet(users, items, num_items)
    sampler = CatalogSampler(np.bincount(items, minlength=num_items) + 1.0, 0.75)
    batch = tf.constant(np.arange(51), tf.int64)
    rows, valid = sample_excluding(sampler, ex, batch, 8, SEED)
    rows, valid = rows.numpy(), valid.numpy()
    assert rows.shape == (51, 8)
    own = set(zip(users.tolist(), items.tolist()))
    for u in range(51):
        for r, ok in zip(rows[u], valid[u]):
            if ok:
                assert (u, int(r)) not in own
    assert valid[:50].all()
    assert set(rows[50][valid[50]].tolist()) <= {7}


def test_ranking_log_sampler_draws_only_the_users_logged_items():
    rl = RankingLogSampler(np.array([0, 0, 2, 2, 2]), np.array([5, 6, 1, 2, 3]), num_users=3)
    rows, has = rl.sample(tf.constant([0, 1, 2, 0], tf.int64), 50, SEED)
    rows, has = rows.numpy(), has.numpy()
    assert set(rows[0]) == {5, 6} and set(rows[3]) == {5, 6}
    assert set(rows[2]) == {1, 2, 3}
    assert has[[0, 2, 3]].all() and not has[1].any()


def test_mined_hard_negatives_are_top_scoring_non_positives():
    query = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    pool = tf.constant([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9], [-1.0, 0.0]])
    excluded = tf.constant([[True, False, False, False], [False, False, False, False]])
    neg, ok = mine_hard_negatives(query, pool, excluded, 2)
    # user 0: pool 0 is its own item, so 1 (0.5) and 2 (0.1); user 1: 2 (0.9), 1 (0.5)
    np.testing.assert_allclose(neg.numpy()[0], pool.numpy()[[1, 2]])
    np.testing.assert_allclose(neg.numpy()[1], pool.numpy()[[2, 1]])
    assert ok.numpy().all()


def test_positive_rebalancing():
    counts = np.array([600.0, 300.0, 90.0, 10.0])
    keep = subsample_keep_probability(counts, threshold=0.15)
    np.testing.assert_allclose(keep, [np.sqrt(0.15 / 0.6), np.sqrt(0.15 / 0.3), 1.0, 1.0],
                               rtol=1e-6)
    assert (subsample_keep_probability(counts, 0.0) == 1).all()
    u, i = upsample_cold(np.array([0, 1, 2]), np.array([0, 3, 2]), counts, below=50, factor=3)
    assert i.tolist() == [0, 3, 3, 3, 2] and u.tolist() == [0, 1, 1, 1, 2]
    p = effective_item_probability(counts, keep)
    np.testing.assert_allclose(p, counts * keep / (counts * keep).sum(), rtol=1e-6)


def test_exclusion_set_sparse_path_agrees_with_dense():
    rng = np.random.default_rng(1)
    u, i = rng.integers(0, 30, 200), rng.integers(0, 40, 200)
    dense, sparse = ExclusionSet(u, i, 40), ExclusionSet(u, i, 40, dense_limit=0)
    qu = tf.constant(rng.integers(0, 35, (50, 1)), tf.int64)
    qi = tf.constant(rng.integers(0, 40, (1, 60)), tf.int64)
    np.testing.assert_array_equal(dense.contains(qu, qi).numpy(),
                                  sparse.contains(qu, qi).numpy())
    assert dense.contains(qu, qi).numpy().sum() > 0
