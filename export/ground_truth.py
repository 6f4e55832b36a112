"""Exact top-k of an export's check queries, carried from version to version.

Every retrieval version stores, for the held-out users its recall was measured
on, a list per user of the best catalog items with their exact scores and a
bound ``tau``: every catalog item not in the list scores at most ``tau``
(``assets.extra/exact_top.npz``). When the next export is incremental and its
query vectors are bit-identical (same users, same query tower: a digest of the
vectors is stored), the new exact top-k needs only the re-embedded rows scored:

    list entries whose item was neither re-embedded nor deleted keep their score;
    re-embedded items are scored against every query ([Q, changed] matmul);
    every other item still scores <= tau.

So the merged candidates scoring >= tau, best first, are the exact top of the
new catalog. A query whose list got shorter than k (its best items changed) is
scored against the whole catalog again, and so are a few queries picked at
random, which must come out the same: the stored lists are checked on every use.
At 1M items this replaces a [1000, 1M] matmul and selection (seconds) by a
[1000, 20K] one.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from export.catalog import id_index
from export.scann_tuning import exact_top_k

TRUTH_FILE = "exact_top.npz"   # in a retrieval version's assets.extra/
_SPOT_CHECKS = 16


class TruthMismatch(RuntimeError):
    """The stored exact lists disagree with a fresh brute force."""


@dataclass
class ExactLists:
    """Per query: ``ids`` [Q, M] best first (padded ""), ``scores`` [Q, M] (padded
    -inf) and ``tau`` [Q]: no item outside the list scores above it."""
    digest: str
    ids: np.ndarray
    scores: np.ndarray
    tau: np.ndarray

    def top_rows(self, k: int, row_of: pd.Index) -> np.ndarray:
        """Catalog rows [Q, k] of each query's k best."""
        return row_of.get_indexer(self.ids[:, :k].ravel()).reshape(len(self.ids), k)


def query_digest(query_emb: np.ndarray) -> str:
    q = np.ascontiguousarray(query_emb, dtype=np.float32)
    return hashlib.sha256(repr(q.shape).encode() + q.tobytes()).hexdigest()


def full_lists(query_emb: np.ndarray, catalog_ids: np.ndarray, catalog_emb: np.ndarray,
               m: int) -> ExactLists:
    """Brute force: each query's m best over the whole catalog."""
    m = min(m, len(catalog_ids))
    rows = exact_top_k(query_emb, catalog_emb, m)
    scores = np.einsum("qd,qmd->qm", query_emb, catalog_emb[rows])
    return ExactLists(query_digest(query_emb), np.asarray(catalog_ids)[rows].astype(str),
                      scores.astype(np.float32), scores[:, -1].copy())


def updated_lists(previous: ExactLists, query_emb: np.ndarray, catalog_ids: np.ndarray,
                  catalog_emb: np.ndarray, changed_ids: np.ndarray, k: int,
                  seed: int = 0, row_of: Optional[pd.Index] = None) -> Optional[ExactLists]:
    """The lists after ``changed_ids`` (re-embedded or deleted items) moved, or
    None when the queries are not the ones the lists were made for (``row_of``:
    ``catalog_ids`` as a str Index, when the caller has one)."""
    if previous.digest != query_digest(query_emb):
        return None
    m = previous.ids.shape[1]
    row_of = id_index(catalog_ids) if row_of is None else row_of
    changed = id_index(changed_ids).unique()
    keep = (changed.get_indexer(previous.ids.ravel()) < 0).reshape(previous.ids.shape)
    keep &= previous.ids != ""
    fresh_rows = row_of.get_indexer(changed)
    fresh_rows = fresh_rows[fresh_rows >= 0]  # the re-embedded ones still in the catalog
    fresh_scores = query_emb @ catalog_emb[fresh_rows].T  # [Q, changed]
    fresh_ids = row_of[fresh_rows].to_numpy(dtype=str)
    # candidates: column j < m is the previous list's entry j, column m + i fresh row i
    scores = np.concatenate([np.where(keep, previous.scores, -np.inf), fresh_scores], axis=1)
    scores[scores < previous.tau[:, None]] = -np.inf
    # the few candidates left (about m per query of m + changed columns), best
    # first per query: sorted as a sparse list, not partitioned row by row
    width = min(m, scores.shape[1])
    q, col = np.nonzero(np.isfinite(scores))
    value = scores[q, col]
    order = np.lexsort((col, -value, q))
    q, col, value = q[order], col[order], value[order]
    rank = np.arange(len(q)) - np.searchsorted(q, q)   # position within its query
    listed = rank < width
    out_scores = np.full((len(query_emb), width), -np.inf, np.float32)
    out_scores[q[listed], rank[listed]] = value[listed]
    out_ids = np.full((len(query_emb), width), "", dtype=previous.ids.dtype if
                      len(fresh_ids) == 0 else np.result_type(previous.ids, fresh_ids))
    lc = col[listed]
    out_ids[q[listed], rank[listed]] = np.where(
        lc < m, previous.ids[q[listed], np.minimum(lc, m - 1)],
        fresh_ids[np.maximum(lc - m, 0)] if len(fresh_ids) else "")
    # what fell off the end of a full list is no longer listed: it bounds the rest
    tau = previous.tau.astype(np.float32).copy()
    np.maximum.at(tau, q[~listed], value[~listed].astype(np.float32))
    lists = ExactLists(previous.digest, out_ids, out_scores, tau)

    short = np.flatnonzero(np.isfinite(out_scores).sum(axis=1) < min(k, len(catalog_ids)))
    rng = np.random.default_rng(seed)
    spot = rng.choice(len(query_emb), min(_SPOT_CHECKS, len(query_emb)), replace=False)
    redo = np.union1d(short, spot)
    full = full_lists(query_emb[redo], catalog_ids, catalog_emb, m)
    for j, q in enumerate(redo):
        if q in short:
            lists.ids[q], lists.scores[q], lists.tau[q] = full.ids[j], full.scores[j], full.tau[j]
        elif not np.allclose(lists.scores[q, :k], full.scores[j, :k], atol=1e-5):
            raise TruthMismatch(f"the stored exact top-{k} of check query {q} disagrees with "
                                "a brute force over the updated catalog")
    return lists


def write_lists(version_dir: Path, lists: ExactLists) -> Path:
    path = Path(version_dir) / "assets.extra" / TRUTH_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, digest=np.array(lists.digest), ids=lists.ids.astype(str),
             scores=lists.scores, tau=lists.tau)
    return path


def read_lists(version_dir: Path) -> Optional[ExactLists]:
    path = Path(version_dir) / "assets.extra" / TRUTH_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as f:
        return ExactLists(str(f["digest"]), f["ids"], f["scores"], f["tau"])
