"""Metrics and splits against hand-computed examples."""
import numpy as np
import pandas as pd
import pytest

from trainer.evaluation import EvalSet, evaluate, popularity_scores, split_interactions


def test_metrics_hand_computed():
    # 2 users, 5 items. Scores rank items 0 > 1 > 2 > 3 > 4 for user 0 and
    # 4 > 3 > 2 > 1 > 0 for user 1. User 0 has seen item 0 (excluded).
    scores = np.array([[5, 4, 3, 2, 1], [1, 2, 3, 4, 5]], np.float32)
    data = EvalSet(test_users=np.array([0, 0, 1]), test_items=np.array([2, 4, 0]),
                   seen_users=np.array([0]), seen_items=np.array([0]), num_items=5,
                   item_popularity=np.array([10, 8, 6, 4, 2], np.float64))
    m = evaluate(lambda u: scores[u], data, ks=[2, 4])
    # user 0 list: 1, 2, 3, 4 -> item 2 at rank 1, item 4 at rank 3
    # user 1 list: 4, 3, 2, 1, 0 -> item 0 at rank 4 (miss at K=2 and 4)
    assert m["hr@2"] == pytest.approx(1 / 3)
    assert m["hr@4"] == pytest.approx(2 / 3)
    assert m["recall@2"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["recall@4"] == pytest.approx((2 / 2 + 0) / 2)
    dcg_u0_k4 = 1 / np.log2(3) + 1 / np.log2(5)
    idcg_u0_k4 = 1 + 1 / np.log2(3)
    assert m["ndcg@4"] == pytest.approx((dcg_u0_k4 / idcg_u0_k4 + 0) / 2)
    assert m["ndcg@2"] == pytest.approx((1 / np.log2(3) / (1 + 1 / np.log2(3))) / 2)
    # top-2 lists: {1, 2} and {4, 3} -> 4 distinct of 5 items
    assert m["coverage@2"] == pytest.approx(4 / 5)
    # popularity percentiles: item 0 -> 1.0, 1 -> .75, 2 -> .5, 3 -> .25, 4 -> 0
    assert m["popularity_bias@2"] == pytest.approx(np.mean([0.75, 0.5, 0.0, 0.25]))


def test_popularity_baseline_excludes_seen():
    data = EvalSet(np.array([0]), np.array([1]), np.array([0]), np.array([0]), 3,
                   np.array([9.0, 5.0, 1.0]))
    m = evaluate(popularity_scores(data), data, ks=[1])
    assert m["hr@1"] == 1.0  # item 0 is excluded, so item 1 is first


def test_ml100k_random_split_is_the_guide_protocol():
    df = pd.DataFrame({"user_id": np.arange(1000).astype(str), "item_id": "x",
                       "timestamp": 0, "clicked": 1})
    train, test = split_interactions(df, "ml100k-random", seed=7, train_fraction=0.5)
    idx = np.random.default_rng(42).permutation(1000)
    assert train.index.tolist() == idx[:800].tolist()
    assert test.index.tolist() == idx[800:].tolist()


def test_temporal_split_tests_on_last_days():
    day = 86400
    df = pd.DataFrame({"user_id": ["a"] * 4, "item_id": list("wxyz"),
                       "timestamp": [0, day, 2 * day + 5, 3 * day], "clicked": 1})
    train, test = split_interactions(df, "temporal", test_days=1.0)
    assert test["item_id"].tolist() == ["y", "z"] or test["item_id"].tolist() == ["z"]
    assert train["timestamp"].max() < test["timestamp"].min()
    with pytest.raises(ValueError, match="empty"):
        split_interactions(df, "temporal", test_days=10)
