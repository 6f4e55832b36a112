"""Cut loaded tables to a time window [since, until) (``data.since``/``data.until``).

Events are cut: interactions, and the ranking log when it has a
``timestamp`` column (else it is kept whole). Entity tables describe users
and items, not events, so they are kept, except that a table with
``available_from`` / ``available_until`` columns (unix seconds, until
exclusive, <NA> = open; the drifting world writes them) loses the rows that
exist at no time of the window (joined or published at/after ``until``, or
retired at/before ``since``); an id the window's interactions use is always kept.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional

import numpy as np
import pandas as pd

from trainer.data.tables import DataError, Tables


def cut_window(tables: Tables, since: Optional[int], until: Optional[int]) -> Tables:
    """Tables restricted to [since, until); None bounds are open. Raises DataError
    naming the window when it holds no interactions or no clicks."""
    if since is None and until is None:
        return tables
    ts = tables.interactions["timestamp"]
    keep = _inside(ts, since, until)
    window = describe_window(since, until)
    if not keep.any():
        span = (f"its {len(ts)} interactions run from {_moment(ts.min())} to "
                f"{_moment(ts.max())}" if len(ts) else "it has no interactions")
        raise DataError(f"{tables.name}: data window {window} holds no interactions ({span})")
    interactions = tables.interactions[keep].reset_index(drop=True)
    if not (interactions["clicked"] == 1).any():
        raise DataError(f"{tables.name}: data window {window} holds {len(interactions)} "
                        f"interactions but no clicks (retrieval trains on clicks)")
    ranking_log = tables.ranking_log
    if ranking_log is not None and "timestamp" in ranking_log.columns:
        ranking_log = ranking_log[_inside(ranking_log["timestamp"], since, until)]
        ranking_log = ranking_log.reset_index(drop=True)
    return Tables(
        interactions,
        _existing(tables.users, "user_id", interactions["user_id"], since, until),
        _existing(tables.items, "item_id", interactions["item_id"], since, until),
        ranking_log=ranking_log, name=tables.name, notes=dict(tables.notes))


def describe_window(since, until) -> str:
    """'[2023-11-15T00:00:00Z (1700006400), open)': both forms, so logs and configs match."""
    return f"[{_moment(since)}, {_moment(until)})"


def _moment(t) -> str:
    if t is None:
        return "open"
    iso = datetime.fromtimestamp(int(t), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{iso} ({int(t)})"


def _inside(ts: pd.Series, since, until) -> np.ndarray:
    keep = np.ones(len(ts), dtype=bool)
    if since is not None:
        keep &= ts.to_numpy() >= since
    if until is not None:
        keep &= ts.to_numpy() < until
    return keep


def _existing(table: Optional[pd.DataFrame], key: str, used: pd.Series,
              since, until) -> Optional[pd.DataFrame]:
    if table is None:
        return None
    gone = np.zeros(len(table), dtype=bool)
    if until is not None and "available_from" in table.columns:
        gone |= (table["available_from"] >= until).fillna(False).to_numpy(dtype=bool)
    if since is not None and "available_until" in table.columns:
        gone |= (table["available_until"] <= since).fillna(False).to_numpy(dtype=bool)
    gone &= ~table[key].astype(str).isin(used).to_numpy()
    return table[~gone].reset_index(drop=True) if gone.any() else table
