"""The embedded default data set: a seeded, deterministic synthetic world.

Users and items live in a latent taste space built from genre centres. What a
model can learn from:
- item features: ``category`` (primary genre), ``tags`` (multi-valued, genre
  plus correlated secondary tags), ``price`` (continuous, tied to a latent
  direction), ``title`` (words drawn from the genre's vocabulary);
- user features: ``age`` (continuous, tied to a latent direction), ``country``
  (weakly genre-correlated), ``favorite_genres`` (noisy multi-valued), and
  ``device`` (pure noise, a control);
- popularity: Zipf-like (exponent ~1) item propensity;
- behaviour: an earlier recommender exposes items (a share by popularity,
  the rest by affinity); a click happens with probability sigmoid(affinity + log
  popularity); exposures not clicked are kept with clicked = 0;
- a ranking log: items an earlier stage scored for the user but filtered out
  (high affinity, never shown) - hard-negative material.
Timestamps spread over ``days`` days. The multi-day world whose tastes,
users and items change from day to day is ``trainer.data.drifting``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from trainer.data.tables import Tables

GENRES = ["action", "comedy", "drama", "horror", "romance", "scifi", "docs",
          "kids", "music", "sports", "crime", "fantasy"]
COUNTRIES = ["us", "uk", "de", "fr", "br", "in", "jp", "mx"]
DEVICES = ["ios", "android", "web", "tv"]
_DAY = 86_400
_START = 1_700_000_000


def generate(num_users: int = 3000, num_items: int = 1500, exposures_per_user: int = 60,
             latent_dim: int = 8, days: int = 14, seed: int = 0,
             ranking_log_per_user: int = 10, popular_exposure_share: float = 0.3,
             popularity_click_weight: float = 0.2) -> Tables:
    """Return canonical Tables; identical for identical arguments."""
    rng = np.random.default_rng(seed)
    centres = genre_centres(rng, latent_dim)
    items, item_vec, popularity = make_items(rng, centres, num_items)

    users, user_vec = make_users(rng, centres, num_users)

    # ---- exposures and clicks
    affinity = user_vec @ item_vec.T  # [users, items], cosine in [-1, 1]
    n_pop = int(round(exposures_per_user * popular_exposure_share))
    n_aff = exposures_per_user - n_pop
    rows_u, rows_i = [], []
    log_pop = np.log(popularity)
    for u in range(num_users):
        pop_pick = rng.choice(num_items, size=n_pop, replace=False, p=popularity)
        logits = 4.0 * affinity[u] + 0.5 * log_pop
        p = np.exp(logits - logits.max())
        p[pop_pick] = 0.0
        p /= p.sum()
        aff_pick = rng.choice(num_items, size=n_aff, replace=False, p=p)
        shown = np.concatenate([pop_pick, aff_pick])
        rows_u.append(np.full(len(shown), u))
        rows_i.append(shown)
    eu = np.concatenate(rows_u)
    ei = np.concatenate(rows_i)
    click_logit = (6.0 * affinity[eu, ei]
                   + popularity_click_weight * (log_pop[ei] - log_pop.mean()) - 2.0)
    clicked = (rng.random(len(eu)) < 1 / (1 + np.exp(-click_logit))).astype(np.int8)
    activity = rng.uniform(0.2, 1.0, size=num_users)  # users start at different times
    start = (1 - activity[eu]) * days * _DAY
    ts = _START + start + rng.random(len(eu)) * (days * _DAY - start)
    interactions = pd.DataFrame({
        "user_id": [f"u{u}" for u in eu],
        "item_id": [f"i{i}" for i in ei],
        "timestamp": ts.astype(np.int64),
        "clicked": clicked,
        "weight": np.ones(len(eu), dtype=np.float32),
    }).sort_values(["timestamp", "user_id"], kind="stable").reset_index(drop=True)

    # ---- ranking log: scored by an earlier stage, filtered out, never shown
    shown_mask = np.zeros((num_users, num_items), dtype=bool)
    shown_mask[eu, ei] = True
    rl_u, rl_i = [], []
    for u in range(num_users):
        cand = np.argsort(-affinity[u])[: 4 * ranking_log_per_user]
        cand = cand[~shown_mask[u, cand]]
        pick = rng.choice(cand, size=min(ranking_log_per_user, len(cand)), replace=False)
        rl_u.append(np.full(len(pick), u))
        rl_i.append(pick)
    ranking_log = pd.DataFrame({
        "user_id": [f"u{u}" for u in np.concatenate(rl_u)],
        "item_id": [f"i{i}" for i in np.concatenate(rl_i)],
    })
    return Tables(interactions, users, items, ranking_log=ranking_log, name="synthetic")


def genre_centres(rng: np.random.Generator, latent_dim: int) -> np.ndarray:
    """Unit vectors [len(GENRES), latent_dim]: the first draws of every world."""
    centres = rng.normal(size=(len(GENRES), latent_dim))
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def make_users(rng: np.random.Generator, centres: np.ndarray,
               num_users: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Users around one or two genre centres: (feature table, unit taste vectors)."""
    n_genres, latent_dim = centres.shape
    g1 = rng.integers(0, n_genres, size=num_users)
    g2 = rng.integers(0, n_genres, size=num_users)
    mix = rng.uniform(0.5, 1.0, size=(num_users, 1))
    user_vec = mix * centres[g1] + (1 - mix) * centres[g2] \
        + 0.35 * rng.normal(size=(num_users, latent_dim))
    user_vec /= np.linalg.norm(user_vec, axis=1, keepdims=True)
    age_dir = rng.normal(size=latent_dim)
    age = np.clip(35 + 12 * user_vec @ age_dir + 6 * rng.normal(size=num_users), 13, 90)
    country_of_genre = rng.integers(0, len(COUNTRIES), size=n_genres)
    country = np.where(rng.random(num_users) < 0.5, country_of_genre[g1],
                       rng.integers(0, len(COUNTRIES), size=num_users))
    fav = []
    for u in range(num_users):
        f = {GENRES[g1[u]]} if rng.random() < 0.8 else set()
        if rng.random() < 0.5:
            f.add(GENRES[g2[u]])
        if rng.random() < 0.2:
            f.add(GENRES[rng.integers(0, n_genres)])
        fav.append("|".join(sorted(f)))
    users = pd.DataFrame({
        "user_id": [f"u{u}" for u in range(num_users)],
        "age": age.astype(np.float32),
        "country": [COUNTRIES[c] for c in country],
        "favorite_genres": fav,
        "device": [DEVICES[d] for d in rng.integers(0, len(DEVICES), size=num_users)],
    })
    return users, user_vec


def make_items(rng: np.random.Generator, centres: np.ndarray, num_items: int,
                id_prefix: str = "i") -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Items around genre centres: (feature table, latent vectors, popularity)."""
    n_genres, latent_dim = centres.shape
    item_genre = rng.integers(0, n_genres, size=num_items)
    item_vec = centres[item_genre] + 0.45 * rng.normal(size=(num_items, latent_dim))
    item_vec /= np.linalg.norm(item_vec, axis=1, keepdims=True)
    popularity = 1.0 / np.arange(1, num_items + 1) ** 1.0
    popularity = popularity[rng.permutation(num_items)]
    popularity /= popularity.sum()
    price_dir = rng.normal(size=latent_dim)
    price = np.exp(2.5 + 0.8 * item_vec @ price_dir + 0.2 * rng.normal(size=num_items))
    secondary = np.argsort(-(item_vec @ centres.T), axis=1)[:, 1:3]
    tags = []
    for i in range(num_items):
        t = {GENRES[item_genre[i]]}
        t.update(GENRES[g] for g in secondary[i] if rng.random() < 0.6)
        if rng.random() < 0.3:
            t.add(f"tag{rng.integers(0, 40)}")
        tags.append("|".join(sorted(t)))
    words = {g: [f"{g[:3]}{k}" for k in range(30)] for g in GENRES}
    titles = [" ".join(list(rng.choice(words[GENRES[item_genre[i]]], size=2))
                       + [f"w{rng.integers(0, 200)}"]) for i in range(num_items)]
    items = pd.DataFrame({
        "item_id": [f"{id_prefix}{i}" for i in range(num_items)],
        "category": [GENRES[g] for g in item_genre],
        "tags": tags,
        "price": price.astype(np.float32),
        "title": titles,
    })

    return items, item_vec, popularity


def generate_catalog(num_items: int, seed: int = 0, latent_dim: int = 8,
                     id_prefix: str = "n") -> pd.DataFrame:
    """A large item table from the same world as ``generate(seed=seed)``.

    Same genre centres, fresh items (ids ``{id_prefix}{i}``): used to benchmark
    export and serving at 100K-1M items with features the towers understand.
    """
    centres = genre_centres(np.random.default_rng(seed), latent_dim)
    items, _, _ = make_items(np.random.default_rng([seed, num_items]), centres, num_items,
                             id_prefix)
    return items
