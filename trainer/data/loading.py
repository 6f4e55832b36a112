"""Dispatch a data config to its loader and return canonical Tables."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from trainer.config import (GenericData, MovieLens100K, MovieLensLatest, ShardData,
                            SyntheticData, TableSource)
from trainer.data import drifting, movielens, synthetic
from trainer.data.readers import read_table, rows_of
from trainer.data.shard_files import load_shards
from trainer.data.tables import (Tables, canonical_interactions, check_unique,
                                 ensure_entity_table)
from trainer.data.windows import cut_window


def load_tables(data) -> Tables:
    """Load the configured data set; user/item tables cover every id seen."""
    if isinstance(data, SyntheticData):
        world = dict(num_users=data.num_users, num_items=data.num_items,
                     exposures_per_user=data.exposures_per_user, latent_dim=data.latent_dim,
                     days=data.days, seed=data.seed)
        tables = (synthetic.generate(**world) if data.drift is None
                  else drifting.generate_drifting(**world, **data.drift.model_dump()))
    elif isinstance(data, MovieLens100K):
        tables = movielens.load_ml100k(data.path)
    elif isinstance(data, MovieLensLatest):
        tables = movielens.load_ml_latest(data.path)
    elif isinstance(data, GenericData):
        tables = _load_generic(data)
    elif isinstance(data, ShardData):
        tables = load_shards(data.path)
    else:  # pragma: no cover - pydantic's discriminator rules this out
        raise TypeError(f"unknown data config {type(data).__name__}")
    tables = cut_window(tables, data.since, data.until)
    tables.users = ensure_entity_table(tables.users, "user_id",
                                       tables.interactions["user_id"].to_numpy())
    tables.items = ensure_entity_table(tables.items, "item_id",
                                       tables.interactions["item_id"].to_numpy())
    return tables


def _load_generic(data: GenericData) -> Tables:
    interactions = _read_source(data.interactions, ("user_id", "item_id"),
                                canonical_interactions)
    return Tables(interactions, *load_entities(data), name=Path(data.interactions.path).stem)


def load_entities(data: GenericData) -> tuple:
    """(users, items, ranking_log) of a ``kind: tables`` config, each None when
    not configured; ids checked unique."""
    users = items = ranking_log = None
    if data.users is not None:
        users = _read_source(data.users, ("user_id",), _unique_ids("user_id"))
    if data.items is not None:
        items = _read_source(data.items, ("item_id",), _unique_ids("item_id"))
    if data.ranking_log is not None:
        ranking_log = _read_source(data.ranking_log, ("user_id", "item_id"),
                                   lambda df, source: df.assign(
                                       user_id=df["user_id"].astype(str),
                                       item_id=df["item_id"].astype(str)))
    return users, items, ranking_log


def _read_source(src: TableSource, required: tuple[str, ...],
                 check: Callable[[pd.DataFrame, str], pd.DataFrame]) -> pd.DataFrame:
    """Read one configured table and run ``check`` on it; its row errors name
    the file and line."""
    path = Path(src.path)
    raw, text = read_table(path, src.columns, src.separator, required=required,
                           header=src.header, names=src.names)
    with rows_of(text, str(path)):
        return check(raw, str(path))


def _unique_ids(key: str) -> Callable[[pd.DataFrame, str], pd.DataFrame]:
    def check(df: pd.DataFrame, source: str) -> pd.DataFrame:
        check_unique(df, key, source)
        return df
    return check
