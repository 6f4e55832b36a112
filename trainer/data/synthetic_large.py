"""A synthetic world too large for memory, generated a chunk of users at a time.

The same item world and user features as trainer.data.synthetic (genre
centres, ``make_items``, ``make_users``), with a vectorised behaviour model
so tens of millions of interactions take minutes: per user, items are
ranked by ``4 * affinity + 0.5 * log popularity`` plus Gumbel noise (a draw
without replacement from that softmax); the first ``clicks_per_user`` are
clicked, the next ``exposures_per_user`` shown but not clicked. Each chunk
of users is its own seeded draw of ``make_users`` (so the age direction and
the country preferences differ from chunk to chunk). Memory: one
[chunk_users, num_items] float32 matrix at a time.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd

from trainer.data.synthetic import _DAY, _START, genre_centres, make_items, make_users


def generate_items(num_items: int, seed: int = 0,
                   latent_dim: int = 8) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """(items table, latent vectors [I, d], popularity [I]) of the world ``seed``."""
    rng = np.random.default_rng(seed)
    return make_items(rng, genre_centres(rng, latent_dim), num_items)


def generate_chunks(num_users: int, num_items: int, clicks_per_user: int,
                    exposures_per_user: int = 0, days: int = 14, seed: int = 0,
                    latent_dim: int = 8, chunk_users: int = 1000
                    ) -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:
    """Yield (users chunk, interactions chunk) in canonical form, users u0.. in order.

    Deterministic for equal arguments (``chunk_users`` included).
    """
    shown = clicks_per_user + exposures_per_user
    if not 0 < shown <= num_items:
        raise ValueError(f"clicks_per_user + exposures_per_user = {shown} must be in "
                         f"1..num_items ({num_items})")
    centres = genre_centres(np.random.default_rng(seed), latent_dim)
    _, item_vec, popularity = generate_items(num_items, seed, latent_dim)
    item_vec = item_vec.astype(np.float32)
    log_pop = (0.5 * np.log(popularity)).astype(np.float32)
    for chunk, first in enumerate(range(0, num_users, chunk_users)):
        n = min(chunk_users, num_users - first)
        rng = np.random.default_rng([seed, chunk, 1])
        users, user_vec = make_users(rng, centres, n)
        users["user_id"] = [f"u{first + u}" for u in range(n)]
        logits = 4.0 * (user_vec.astype(np.float32) @ item_vec.T) + log_pop
        logits -= np.log(-np.log(rng.random(logits.shape, dtype=np.float32) + 1e-12)
                         + 1e-12)   # + Gumbel noise
        picked = np.argpartition(-logits, shown - 1, axis=1)[:, :shown]
        order = np.argsort(-np.take_along_axis(logits, picked, axis=1), axis=1)
        picked = np.take_along_axis(picked, order, axis=1)   # best first: clicks first
        clicked = np.zeros((n, shown), np.int8)
        clicked[:, :clicks_per_user] = 1
        activity = rng.uniform(0.2, 1.0, size=n)
        start = ((1 - activity) * days * _DAY)[:, None]
        ts = _START + start + rng.random((n, shown)) * (days * _DAY - start)
        rows = np.repeat(np.arange(first, first + n), shown)
        interactions = pd.DataFrame({
            "user_id": np.char.add("u", rows.astype(str)).astype(object),
            "item_id": np.char.add("i", picked.reshape(-1).astype(str)).astype(object),
            "timestamp": ts.reshape(-1).astype(np.int64),
            "clicked": clicked.reshape(-1),
            "weight": np.ones(n * shown, np.float32),
        }).sort_values("timestamp", kind="stable").reset_index(drop=True)
        yield users, interactions
