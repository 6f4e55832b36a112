"""The drifting world: the synthetic world of ``trainer.data.synthetic`` over days.

Users and items are those of the single-day world (same genre centres,
features and Zipf popularity), but what users want and what exists changes:

- **long-term taste**: each user's latent vector, fixed for the whole timeline
  (what their features ``age``, ``country``, ``favorite_genres`` reflect);
- **short-term interest**: each user has an interest genre, replaced by a
  random one with probability ``interest_switch`` each day (so it lasts
  1 / interest_switch days on average);
- **trends**: ``trend_genres`` genres trend at a time; each day each trending
  genre is replaced by a non-trending one with probability ``trend_turnover``
  (``trend_schedule``). The day's taste of a user is
  normalize(long-term + interest_weight · interest centre + trend_weight ·
  trend direction), and trending items' popularity (for exposures and the
  click's popularity term) is multiplied by e^(2 · trend_weight);
- **new users and items**: ``num_users`` users and ``num_items`` items exist
  on day 0; each later day ``new_users_per_day`` users join and
  ``new_items_per_day`` items are published, each at a uniformly drawn time of
  that day (before its last hour); a new user is active on the day they join;
- **ageing out**: after each of its days an item retires with probability
  1 / ``item_lifetime_days`` (a geometric lifetime with that mean; 0 = never),
  at the end of that day.

Each day every existing user is active with probability ``active_share``;
an active user has one session at a uniform time of the day (after joining):
``exposures_per_user`` items are shown, one second apart, chosen among the
items available at that time as in the single-day world (a share by current
popularity, the rest by the day's taste); clicks follow sigmoid(6 · affinity
+ popularity term − 2); the ranking log gets ``ranking_log_per_session``
high-affinity items of the session that were not shown, stamped with the
session's time.

What the generator says happened is in the tables: ``users.available_from``
(join time), ``items.available_from`` (publish time) and
``items.available_until`` (retirement time, exclusive; <NA> while the item is
still live at the end of the timeline), all unix seconds. Day ``d`` (0-based)
is ``day_window(d)``; the timeline starts at 2023-11-15T00:00:00Z.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from trainer.data.synthetic import GENRES, genre_centres, make_items, make_users
from trainer.data.tables import Tables

DAY = 86_400
START = 1_700_006_400  # 2023-11-15T00:00:00Z, a midnight so days are calendar days
_LAST_HOUR = 3_600     # arrivals and sessions start before a day's last hour


def day_window(day: int) -> tuple[int, int]:
    """[since, until) unix seconds of day ``day`` (0-based) of the timeline."""
    return START + day * DAY, START + (day + 1) * DAY


def trend_schedule(seed: int, days: int, trend_genres: int = 2,
                   trend_turnover: float = 0.5) -> list[tuple[str, ...]]:
    """The trending genres of each day (sorted names), from their own seeded stream."""
    if not 0 <= trend_genres < len(GENRES):
        raise ValueError(f"trend_genres must be in [0, {len(GENRES) - 1}], got {trend_genres}")
    rng = np.random.default_rng([seed, 1])
    current = list(rng.choice(len(GENRES), size=trend_genres, replace=False))
    schedule = []
    for day in range(days):
        if day:
            for slot in range(trend_genres):
                if rng.random() < trend_turnover:
                    others = [g for g in range(len(GENRES)) if g not in current]
                    current[slot] = others[rng.integers(len(others))]
        schedule.append(tuple(sorted(GENRES[g] for g in current)))
    return schedule


def generate_drifting(num_users: int = 2000, num_items: int = 1000,
                      exposures_per_user: int = 20, latent_dim: int = 8, days: int = 14,
                      seed: int = 0, new_users_per_day: int = 100,
                      new_items_per_day: int = 50, item_lifetime_days: float = 30.0,
                      active_share: float = 0.35, trend_genres: int = 2,
                      trend_turnover: float = 0.5, trend_weight: float = 0.6,
                      interest_weight: float = 0.5, interest_switch: float = 0.3,
                      ranking_log_per_session: int = 4, popular_exposure_share: float = 0.3,
                      popularity_click_weight: float = 0.2) -> Tables:
    """Return canonical Tables of ``days`` days; identical for identical arguments.

    ``num_users``/``num_items``: the day-0 population; ``exposures_per_user``:
    exposures per session (one session per active user and day).
    """
    if item_lifetime_days and item_lifetime_days < 1:
        raise ValueError(f"item_lifetime_days must be 0 (never) or >= 1, got {item_lifetime_days}")
    if exposures_per_user >= _LAST_HOUR:
        raise ValueError(f"exposures_per_user must be < {_LAST_HOUR} (one second apart)")
    rng = np.random.default_rng(seed)
    centres = genre_centres(rng, latent_dim)
    n_users = num_users + new_users_per_day * (days - 1)
    n_items = num_items + new_items_per_day * (days - 1)
    items, item_vec, popularity = make_items(rng, centres, n_items)
    users, long_taste = make_users(rng, centres, n_users)
    item_genre = items["category"].map(GENRES.index).to_numpy()
    log_pop = np.log(popularity)

    user_day = _arrival_days(n_users, num_users, new_users_per_day)
    item_day = _arrival_days(n_items, num_items, new_items_per_day)
    joined = _arrival_times(rng, user_day, num_users)
    published = _arrival_times(rng, item_day, num_items)
    if item_lifetime_days:
        last_day = item_day + rng.geometric(1.0 / item_lifetime_days, size=n_items) - 1
    else:
        last_day = np.full(n_items, days)
    users["available_from"] = joined
    items["available_from"] = published
    retired = last_day < days - 1
    items["available_until"] = pd.Series(START + (last_day + 1) * DAY,
                                         dtype="Int64").mask(~retired)

    trends = trend_schedule(seed, days, trend_genres, trend_turnover)
    interest = rng.integers(0, len(GENRES), size=n_users)
    n_pop = int(round(exposures_per_user * popular_exposure_share))
    n_aff = exposures_per_user - n_pop
    events, ranked = [], []
    for day in range(days):
        if day:
            switch = rng.random(n_users) < interest_switch
            interest = np.where(switch, rng.integers(0, len(GENRES), size=n_users), interest)
        trending = np.isin(np.array(GENRES), trends[day])
        joins_today = (user_day == day) & (day > 0)
        active = np.flatnonzero((user_day <= day)
                                & (joins_today | (rng.random(n_users) < active_share)))
        if not len(active):
            continue
        day_start, day_end = day_window(day)
        begin = np.maximum(day_start, joined[active])
        session = begin + (rng.random(len(active))
                           * (day_end - _LAST_HOUR - begin)).astype(np.int64)

        direction = centres[trending].sum(axis=0)
        direction = direction / max(np.linalg.norm(direction), 1e-12)
        taste = (long_taste[active] + interest_weight * centres[interest[active]]
                 + trend_weight * direction)
        taste /= np.linalg.norm(taste, axis=1, keepdims=True)
        affinity = taste @ item_vec.T                                    # [A, I]
        pop_now = log_pop + 2.0 * trend_weight * trending[item_genre]   # [I]
        available = (published[None, :] <= session[:, None]) & (last_day >= day)[None, :]
        need, have = exposures_per_user + 4 * ranking_log_per_session, available.sum(1).min()
        if have < need:
            raise ValueError(f"day {day}: a session finds only {have} live items, fewer than "
                             f"exposures_per_user + 4 x ranking_log_per_session = {need}; "
                             f"raise num_items, new_items_per_day or item_lifetime_days")

        pop_pick = _gumbel_top(rng, np.where(available, pop_now, -np.inf), n_pop)
        open_ = available.copy()
        np.put_along_axis(open_, pop_pick, False, axis=1)
        aff_pick = _gumbel_top(rng, np.where(open_, 4.0 * affinity + 0.5 * pop_now, -np.inf),
                               n_aff)
        shown = np.concatenate([pop_pick, aff_pick], axis=1)             # [A, E]
        shown = np.take_along_axis(shown, np.argsort(rng.random(shown.shape), axis=1), axis=1)
        aff_shown = np.take_along_axis(affinity, shown, axis=1)
        logit = (6.0 * aff_shown - 2.0 + popularity_click_weight
                 * (pop_now[shown] - log_pop.mean()))
        clicked = rng.random(shown.shape) < 1 / (1 + np.exp(-logit))
        events.append((np.repeat(active, exposures_per_user), shown.ravel(),
                       (session[:, None] + np.arange(exposures_per_user)).ravel(),
                       clicked.ravel()))

        np.put_along_axis(open_, aff_pick, False, axis=1)
        near = _gumbel_top(None, np.where(open_, affinity, -np.inf), 4 * ranking_log_per_session)
        pick = _gumbel_top(rng, np.zeros(near.shape), ranking_log_per_session)
        ranked.append((np.repeat(active, ranking_log_per_session),
                       np.take_along_axis(near, pick, axis=1).ravel(),
                       np.repeat(session, ranking_log_per_session)))

    if not events:
        raise ValueError(f"no user was active in {days} days: raise num_users or active_share")
    eu, ei, ts, clicked = (np.concatenate(c) for c in zip(*events))
    interactions = pd.DataFrame({
        "user_id": users["user_id"].to_numpy()[eu],
        "item_id": items["item_id"].to_numpy()[ei],
        "timestamp": ts.astype(np.int64),
        "clicked": clicked.astype(np.int8),
        "weight": np.ones(len(eu), dtype=np.float32),
    }).sort_values(["timestamp", "user_id"], kind="stable").reset_index(drop=True)
    ru, ri, rt = (np.concatenate(c) for c in zip(*ranked))
    ranking_log = pd.DataFrame({"user_id": users["user_id"].to_numpy()[ru],
                                "item_id": items["item_id"].to_numpy()[ri],
                                "timestamp": rt.astype(np.int64)})
    return Tables(interactions, users, items, ranking_log=ranking_log,
                  name="synthetic-drifting")


def _arrival_days(total: int, initial: int, per_day: int) -> np.ndarray:
    """Day of arrival of each entity: the first ``initial`` on day 0, then ``per_day`` a day."""
    later = np.arange(total - initial) // max(per_day, 1) + 1
    return np.concatenate([np.zeros(initial, dtype=np.int64), later])


def _arrival_times(rng: np.random.Generator, day: np.ndarray, initial: int) -> np.ndarray:
    """Unix seconds: the timeline's start for day-0 entities, else a uniform time of the day."""
    offset = (rng.random(len(day)) * (DAY - _LAST_HOUR)).astype(np.int64)
    offset[:initial] = 0
    return START + day * DAY + offset


def _gumbel_top(rng: np.random.Generator | None, logits: np.ndarray, k: int) -> np.ndarray:
    """[rows, k] column indices drawn without replacement with p ∝ exp(logits) per
    row (Gumbel top-k: -log of an Exp(1) draw is Gumbel); rng None: the k largest."""
    if k == 0:
        return np.zeros((len(logits), 0), dtype=np.int64)
    if rng is None:
        return np.argpartition(-logits, k - 1, axis=1)[:, :k]
    draws = rng.standard_exponential(size=logits.shape, dtype=np.float32)
    keys = logits - np.log(np.maximum(draws, np.finfo(np.float32).tiny))
    return np.argpartition(-keys, k - 1, axis=1)[:, :k]
