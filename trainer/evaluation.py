"""Splits and exact full-catalog top-K evaluation.

Protocols (GUIDE.md section 4):
- ``ml100k-random``: ``default_rng(42).permutation(n)`` over the interaction
  rows in file order; the first 80 % are train.
- ``random``: the same with the configured seed and train fraction.
- ``temporal``: the last ``test_days`` days (by timestamp) are test.
Only clicked rows count: test pairs are clicked test rows; each user's clicked
train items are excluded from their ranking.

Metrics at each K:
- ``hr@K``: share of test (user, item) pairs whose item is in the user's top K;
- ``recall@K``: per user, |top K ∩ test items| / |test items|, averaged;
- ``ndcg@K``: per user, binary-relevance DCG / ideal DCG, averaged;
- ``coverage@K``: share of the catalog appearing in any user's top K;
- ``popularity_bias@K``: mean popularity percentile (0 = least, 1 = most
  clicked in train) of recommended items.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd

_DAY = 86_400


def split_interactions(interactions: pd.DataFrame, protocol: str, seed: int = 42,
                       train_fraction: float = 0.8,
                       test_days: float = 1.0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (train, test) rows; all rows, clicked or not, keep their side."""
    n = len(interactions)
    if protocol in ("ml100k-random", "random"):
        if protocol == "ml100k-random":
            seed, train_fraction = 42, 0.8
        idx = np.random.default_rng(seed).permutation(n)
        cut = int(round(n * train_fraction))
        return interactions.iloc[idx[:cut]], interactions.iloc[idx[cut:]]
    if protocol == "temporal":
        ts = interactions["timestamp"].to_numpy()
        boundary = ts.max() - test_days * _DAY
        test = ts > boundary
        if test.all() or not test.any():
            raise ValueError(f"temporal split with test_days={test_days} leaves an empty "
                             "train or test set")
        order = np.argsort(ts, kind="stable")
        ordered = interactions.iloc[order]
        return ordered[~test[order]], ordered[test[order]]
    raise ValueError(f"unknown evaluation protocol {protocol!r}")


@dataclass
class EvalSet:
    """Row indices (into the user / item tables) of test pairs and seen pairs."""

    test_users: np.ndarray
    test_items: np.ndarray
    seen_users: np.ndarray
    seen_items: np.ndarray
    num_items: int
    item_popularity: np.ndarray  # train clicks per item, [num_items]


def top_k_excluding(scores: np.ndarray, exclude_rows: np.ndarray, exclude_cols: np.ndarray,
                    k: int) -> np.ndarray:
    """Indices of the k best columns per row, best first, excluded cells removed.

    scores [n, m] (modified in place); exclude_* index cells to drop.
    """
    scores[exclude_rows, exclude_cols] = -np.inf
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def evaluate(score_fn: Callable[[np.ndarray], np.ndarray], data: EvalSet,
             ks: Sequence[int] = (10, 50, 100), chunk: int = 1024) -> dict:
    """Rank the whole catalog for every test user and compute the metrics.

    ``score_fn(user_rows [n]) -> scores [n, num_items]`` (higher is better).
    """
    ks = sorted(ks)
    kmax = ks[-1]
    users = np.unique(data.test_users)
    seen = pd.DataFrame({"u": data.seen_users, "i": data.seen_items})
    seen = seen[seen["u"].isin(users)]
    top = np.empty((len(users), min(kmax, data.num_items)), dtype=np.int64)
    for start in range(0, len(users), chunk):
        block = users[start:start + chunk]
        scores = np.asarray(score_fn(block), dtype=np.float32).copy()
        if scores.shape != (len(block), data.num_items):
            raise ValueError(f"score_fn returned shape {scores.shape}, expected "
                             f"{(len(block), data.num_items)}")
        s = seen[(seen["u"] >= block[0]) & (seen["u"] <= block[-1])]
        local = np.searchsorted(block, s["u"].to_numpy())
        keep = block[np.minimum(local, len(block) - 1)] == s["u"].to_numpy()
        top[start:start + len(block)] = top_k_excluding(
            scores, local[keep], s["i"].to_numpy()[keep], kmax)
    return metrics_from_top(top, users, data, ks)


def metrics_from_top(top: np.ndarray, users: np.ndarray, data: EvalSet,
                     ks: Sequence[int]) -> dict:
    """Metrics from each test user's ranked list ``top`` [len(users), kmax]."""
    row_of = np.searchsorted(users, data.test_users)
    ranked = top[row_of]  # [pairs, kmax]
    match = ranked == data.test_items[:, None]
    hit_rank = np.where(match.any(axis=1), match.argmax(axis=1), np.iinfo(np.int64).max)
    n_test = np.bincount(row_of, minlength=len(users))
    percentile = _popularity_percentile(data.item_popularity)
    out = {"test_pairs": int(len(data.test_users)), "test_users": int(len(users)),
           "catalog_size": int(data.num_items)}
    for k in ks:
        hit = hit_rank < k
        out[f"hr@{k}"] = float(hit.mean()) if len(hit) else 0.0
        hits_per_user = np.bincount(row_of, weights=hit, minlength=len(users))
        out[f"recall@{k}"] = float(np.mean(hits_per_user / n_test))
        gain = np.where(hit, 1.0 / np.log2(np.minimum(hit_rank, k) + 2.0), 0.0)
        dcg = np.bincount(row_of, weights=gain, minlength=len(users))
        discounts = np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))
        idcg = discounts[np.minimum(n_test, k) - 1]
        out[f"ndcg@{k}"] = float(np.mean(dcg / idcg))
        shown = top[:, :k]
        out[f"coverage@{k}"] = float(len(np.unique(shown)) / data.num_items)
        out[f"popularity_bias@{k}"] = float(percentile[shown].mean())
    return out


def _popularity_percentile(popularity: np.ndarray) -> np.ndarray:
    """Rank of each item's train popularity, scaled to [0, 1] (ties averaged)."""
    ranks = pd.Series(popularity).rank(method="average").to_numpy()
    return (ranks - 1) / max(len(ranks) - 1, 1)


def popularity_scores(data: EvalSet) -> Callable[[np.ndarray], np.ndarray]:
    """The most-popular baseline: every user gets train click counts as scores."""
    pop = data.item_popularity.astype(np.float32)
    return lambda users: np.broadcast_to(pop, (len(users), len(pop)))


def embedding_scores(user_emb: np.ndarray,
                     item_emb: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Dot-product scores from precomputed embeddings [U, d] and [I, d]."""
    return lambda users: user_emb[users] @ item_emb.T
