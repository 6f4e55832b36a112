"""MovieLens loaders: the 100K directory and the "latest" CSV directory.

All ratings are positive (implicit feedback): clicked = 1 for every row.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from trainer.data.readers import read_delimited, require_file
from trainer.data.tables import DataError, Tables, canonical_interactions

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
]


def load_ml100k(path: str | Path) -> Tables:
    """Read ``u.data``, ``u.user`` and ``u.item`` from a MovieLens 100K directory.

    Interactions keep u.data's file order (the ml100k-random protocol indexes
    rows in that order).
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: MovieLens 100K directory not found")
    ratings = read_delimited(
        root / "u.data", "\t", ["user_id", "item_id", "rating", "timestamp"],
        {"user_id": int, "item_id": int, "rating": int, "timestamp": int},
        expected="user id, item id, rating, timestamp separated by tabs")
    interactions = canonical_interactions(ratings, str(root / "u.data"))

    users = read_delimited(
        root / "u.user", "|", ["user_id", "age", "gender", "occupation", "zip"],
        {"user_id": int, "age": float}, encoding="latin-1")
    users["user_id"] = users["user_id"].astype(str)
    users["age"] = users["age"].astype(np.float32)
    users["zip_prefix"] = users["zip"].str[:2]
    users = users.drop(columns=["zip"])

    item_cols = ["item_id", "title", "release_date", "video_release_date", "url"]
    items = read_delimited(
        root / "u.item", "|", item_cols + [f"g{i}" for i in range(19)],
        {"item_id": int, **{f"g{i}": int for i in range(19)}}, encoding="latin-1")
    flags = items[[f"g{i}" for i in range(19)]].to_numpy(dtype=bool)
    genres = ["|".join(g for g, on in zip(ML100K_GENRES, row) if on) for row in flags]
    year = pd.to_datetime(items["release_date"], format="%d-%b-%Y", errors="coerce").dt.year
    items = pd.DataFrame({
        "item_id": items["item_id"].astype(str),
        "title": items["title"].map(_strip_year),
        "genres": genres,
        "year": year.astype(np.float32),  # NaN where unknown; the tower imputes
    })
    return Tables(interactions, users, items, name="movielens-100k")


def load_ml_latest(path: str | Path) -> Tables:
    """Read ``ratings.csv`` and ``movies.csv`` (and nothing else) of ml-latest(-small)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: MovieLens latest directory not found")
    ratings = read_delimited(
        root / "ratings.csv", ",", ["user_id", "item_id", "rating", "timestamp"],
        {"user_id": int, "item_id": int, "rating": float, "timestamp": int},
        header=True, expected="header userId,movieId,rating,timestamp")
    interactions = canonical_interactions(ratings, str(root / "ratings.csv"))
    movies = read_delimited(
        root / "movies.csv", ",", ["item_id", "title", "genres"], {"item_id": int},
        header=True, expected="header movieId,title,genres")
    years = movies["title"].map(_year_of)
    items = pd.DataFrame({
        "item_id": movies["item_id"].astype(str),
        "title": movies["title"].map(_strip_year),
        "genres": movies["genres"].replace("(no genres listed)", ""),
        "year": years.astype(np.float32),
    })
    users = pd.DataFrame({"user_id": pd.unique(interactions["user_id"])})
    require_file(root / "movies.csv", "movies.csv")
    return Tables(interactions, users, items, name="movielens-latest")


_YEAR = re.compile(r"\((\d{4})\)\s*$")


def _year_of(title: str) -> float:
    m = _YEAR.search(title or "")
    return float(m.group(1)) if m else np.nan


def _strip_year(title: str) -> str:
    return _YEAR.sub("", title or "").strip()
