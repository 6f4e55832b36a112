"""Dispatch a data config to its loader and return canonical Tables."""
from __future__ import annotations

from pathlib import Path

from trainer.config import GenericData, MovieLens100K, MovieLensLatest, SyntheticData
from trainer.data import drifting, movielens, synthetic
from trainer.data.readers import read_table
from trainer.data.tables import Tables, canonical_interactions, ensure_entity_table
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
    else:  # pragma: no cover - pydantic's discriminator rules this out
        raise TypeError(f"unknown data config {type(data).__name__}")
    tables = cut_window(tables, data.since, data.until)
    tables.users = ensure_entity_table(tables.users, "user_id",
                                       tables.interactions["user_id"].to_numpy())
    tables.items = ensure_entity_table(tables.items, "item_id",
                                       tables.interactions["item_id"].to_numpy())
    return tables


def _load_generic(data: GenericData) -> Tables:
    src = data.interactions
    raw = read_table(Path(src.path), src.columns, src.separator,
                     required=("user_id", "item_id"))
    interactions = canonical_interactions(raw, src.path)
    users = items = ranking_log = None
    if data.users is not None:
        users = read_table(Path(data.users.path), data.users.columns,
                           data.users.separator, required=("user_id",))
    if data.items is not None:
        items = read_table(Path(data.items.path), data.items.columns,
                           data.items.separator, required=("item_id",))
    if data.ranking_log is not None:
        rl = data.ranking_log
        ranking_log = read_table(Path(rl.path), rl.columns, rl.separator,
                                 required=("user_id", "item_id"))
        ranking_log = ranking_log.assign(user_id=ranking_log["user_id"].astype(str),
                                         item_id=ranking_log["item_id"].astype(str))
    return Tables(interactions, users, items, ranking_log=ranking_log,
                  name=Path(src.path).stem)
