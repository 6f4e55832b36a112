"""Which ids get (or lose) an embedding row in an update: admission and expiry.

Chosen design: vocabularies grow in place (``_Vocabulary.set_terms``): a
StringLookup over a fixed term list in front of an embedding table, both
rebuilt larger when ids are admitted; every kept id keeps its index, row
and optimizer slots. Serving sees a plain StringLookup + embedding (pure TF
ops, a static hash table).

- **Admission**: an id gets a row once it has ``min_count`` clicks in the
  data seen so far (``IdStats``: clicks and last click per id, carried from
  run to run in ``id_stats.parquet``); until then the OOV bucket and the
  entity's other features represent it.
- **Expiry** (``expire_days``): an id without a click for that many days
  loses its row: its term becomes a placeholder ``<free:ROW>`` that no id
  matches (it maps to OOV again), and the row is **reused by the next
  admission** (fresh initial vector and optimizer slots) instead of
  appending. Rows never move, so nothing else is touched. A full update
  uses the same plan; only a fresh training (python -m trainer) compacts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

FREE_PREFIX = "<free:"
STATS_FILE = "id_stats.parquet"
_DAY = 86400


def is_free(term: str) -> bool:
    return term.startswith(FREE_PREFIX)


class IdStats:
    """Clicks and last click time per (feature, id): [feature, id, clicks, last_seen]."""

    COLUMNS = ["feature", "id", "clicks", "last_seen"]

    def __init__(self, table: pd.DataFrame | None = None):
        self.table = (pd.DataFrame({c: pd.Series(dtype=t) for c, t in
                                    zip(self.COLUMNS, ["str", "str", "int64", "int64"])})
                      if table is None else table[self.COLUMNS].reset_index(drop=True))

    @classmethod
    def of_clicks(cls, clicks: pd.DataFrame, columns: dict[str, str]) -> "IdStats":
        """``columns``: feature name -> column of ``clicks`` holding its ids."""
        parts = []
        for feature, column in columns.items():
            g = clicks.groupby(clicks[column].astype(str))["timestamp"]
            parts.append(pd.DataFrame({"feature": feature, "id": g.size().index,
                                       "clicks": g.size().to_numpy(np.int64),
                                       "last_seen": g.max().to_numpy(np.int64)}))
        return cls(pd.concat(parts, ignore_index=True) if parts else None)

    def plus(self, other: "IdStats") -> "IdStats":
        both = pd.concat([self.table, other.table], ignore_index=True)
        merged = both.groupby(["feature", "id"], as_index=False).agg(
            clicks=("clicks", "sum"), last_seen=("last_seen", "max"))
        return IdStats(merged)

    def of(self, feature: str) -> pd.DataFrame:
        return self.table[self.table["feature"] == feature].set_index("id")

    def save(self, run_dir: Path) -> None:
        self.table.to_parquet(Path(run_dir) / STATS_FILE, index=False)

    @classmethod
    def load(cls, run_dir: Path, columns: dict[str, str]) -> "IdStats":
        """A run's stats; an initial training run has none and starts from its
        training clicks (seen.parquet)."""
        path = Path(run_dir) / STATS_FILE
        if path.is_file():
            return cls(pd.read_parquet(path))
        return cls.of_clicks(pd.read_parquet(Path(run_dir) / "seen.parquet"), columns)


@dataclass
class VocabularyPlan:
    """New terms for one encoder: ``terms`` (same length or longer), the rows
    given to a new id (``fresh_rows``), and what changed."""

    terms: list[str]
    fresh_rows: list[int] = field(default_factory=list)
    admitted: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.admitted or self.expired)


def plan_vocabulary(terms: list[str], num_oov: int, stats: pd.DataFrame, min_count: int,
                    now: int, expire_days: float | None = None) -> VocabularyPlan:
    """Admit ids of ``stats`` (indexed by id: clicks, last_seen) with at least
    ``min_count`` clicks, expire ids unseen for ``expire_days`` before ``now``.

    Row of term j is ``num_oov + j``. Expired terms become ``<free:ROW>``;
    admissions fill free rows (lowest first), then append, most clicked first
    (ties by id), so a plan is reproducible.
    """
    terms = list(terms)
    expired = []
    if expire_days is not None:
        cutoff = now - expire_days * _DAY
        last = stats["last_seen"]
        for j, t in enumerate(terms):
            if not is_free(t) and (t not in last.index or last[t] < cutoff):
                expired.append(t)
                terms[j] = f"{FREE_PREFIX}{num_oov + j}>"
    known = set(terms)
    eligible = stats[stats["clicks"] >= min_count]
    if expire_days is not None:
        eligible = eligible[eligible["last_seen"] >= now - expire_days * _DAY]
    eligible = eligible[~eligible.index.isin(known) & ~eligible.index.str.startswith(FREE_PREFIX)]
    order = eligible.assign(_id=eligible.index).sort_values(["clicks", "_id"],
                                                            ascending=[False, True])
    admitted = list(order.index)
    free = [j for j, t in enumerate(terms) if is_free(t)]
    fresh = []
    for new_id in admitted:
        if free:
            j = free.pop(0)
            terms[j] = new_id
            fresh.append(num_oov + j)
        else:
            terms.append(new_id)
    return VocabularyPlan(terms, fresh, admitted, expired)
