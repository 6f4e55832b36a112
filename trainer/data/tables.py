"""Canonical tables every loader produces and every later stage consumes.

- interactions: user_id (str), item_id (str), timestamp (int64 seconds),
  clicked (int8: 1 clicked/rated, 0 exposed but not clicked), weight (float32).
  Exposures without a click stay as rows: ranking models want them, and the
  retrieval pipeline filters them out (they are never retrieval negatives).
- users: user_id + user features; items: item_id + item features.
- ranking_log (optional): user_id, item_id, timestamp: items an earlier
  stage scored for the user but filtered out (hard-negative material).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp", "clicked", "weight")


class DataError(ValueError):
    """Input data that cannot be used; the message names file, line or column."""


class RowError(DataError):
    """A problem at DataFrame rows; the reader that made the frame turns it into
    ``file:LINE`` (trainer.data.readers.rows_of), so tables need no file.

    ``rows``: 0-based row indexes (two for a duplicate: first, second).
    """

    def __init__(self, source: str, rows: tuple[int, ...], column: str, problem: str):
        self.rows, self.column, self.problem = tuple(int(r) for r in rows), column, problem
        super().__init__(f"{source}: column '{column}' row "
                         f"{' and '.join(map(str, self.rows))}: {problem}")


@dataclass
class Tables:
    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    ranking_log: Optional[pd.DataFrame] = None
    name: str = "data"
    # Per-feature separators for multi-valued string columns, as loaders know them.
    notes: dict = field(default_factory=dict)

    def positives(self) -> pd.DataFrame:
        """Clicked interactions only: the only rows retrieval ever trains on."""
        return self.interactions[self.interactions["clicked"] == 1]


def canonical_interactions(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Coerce a frame with at least user_id, item_id to canonical dtypes."""
    for col in ("user_id", "item_id"):
        if col not in df.columns:
            raise DataError(f"{source}: missing column '{col}' (have {list(df.columns)})")
        if df[col].isna().any():   # astype(str) would make it the id 'nan'
            row = int(np.flatnonzero(df[col].isna().to_numpy())[0])
            raise RowError(source, (row,), col, "missing (an empty field)")
    out = pd.DataFrame({
        "user_id": df["user_id"].astype(str).to_numpy(dtype=object),
        "item_id": df["item_id"].astype(str).to_numpy(dtype=object),
    })
    out["timestamp"] = _numeric(df, "timestamp", source, default=0).astype(np.int64)
    out["clicked"] = _numeric(df, "clicked", source, default=1).astype(np.int8)
    bad = ~np.isin(out["clicked"].to_numpy(), (0, 1))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise RowError(source, (row,), "clicked",
                       f"must be 0 or 1, got {_shown(df['clicked'].iloc[row])}")
    out["weight"] = _numeric(df, "weight", source, default=1.0).astype(np.float32)
    return out


def _numeric(df: pd.DataFrame, col: str, source: str, default) -> np.ndarray:
    if col not in df.columns:
        return np.full(len(df), default)
    values = pd.to_numeric(df[col], errors="coerce")
    bad = values.isna() & df[col].notna() | df[col].isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        value = df[col].iloc[row]
        raise RowError(source, (row,), col, "expected a number, got "
                       + ("an empty field" if pd.isna(value) else _shown(value)))
    return values.to_numpy()


def _shown(value) -> str:
    """A file value as an error shows it: 'abc' quoted, a number plain."""
    return repr(value) if isinstance(value, str) else str(value)


def ensure_entity_table(table: Optional[pd.DataFrame], key: str,
                        ids: np.ndarray) -> pd.DataFrame:
    """Return a table keyed by ``key`` covering every id in ``ids``.

    Ids without a row get one with missing features (the towers' OOV and
    imputation handle them), so no interaction is ever dropped silently.
    """
    ids = pd.unique(pd.Series(ids, dtype=object))
    if table is None:
        return pd.DataFrame({key: ids})
    table = table.copy()
    table[key] = table[key].astype(str)
    check_unique(table, key, f"{key} table")
    missing = np.setdiff1d(ids.astype(str), table[key].to_numpy(dtype=str))
    if len(missing):
        table = pd.concat([table, pd.DataFrame({key: missing})], ignore_index=True)
    return table.reset_index(drop=True)


def check_unique(table: pd.DataFrame, key: str, source: str) -> None:
    """RowError (first row, duplicate row) at the first id that appears twice."""
    ids = table[key].astype(str)
    dup = ids.duplicated()
    if dup.any():
        second = int(np.flatnonzero(dup.to_numpy())[0])
        first = int(np.flatnonzero((ids == ids.iloc[second]).to_numpy())[0])
        raise RowError(source, (first, second), key, f"duplicate {key} {ids.iloc[second]!r}")
