"""EASE (Steck, WWW 2019): the closed-form item-item reference model.

For the binary user x item click matrix X [U, I] of the training split:

    G = XᵀX,   P = (G + λI)⁻¹,   B = I − P·diag(1/diag(P))   (so diag(B) = 0),
    scores(user) = X[user] · B   [n, I].

It has one knob (the L2 weight λ) and on ML-100K it beats a tutorial-style
two-tower model by a factor of three, so every report shows it beside
most-popular: a two-tower model below it is not worth its serving cost.

Cost: G and P are dense float32 [I, I]. G is built once from a sparse X and
reused for every λ tried; each λ costs one in-place Cholesky factorisation and
inverse (LAPACK ``spotrf``/``spotri``), so the peak is about two I x I float32
matrices (3.2 GB at the default limit of 20,000 items) and the time is one
I³/3 factorisation per λ. Above ``max_items`` EASE is skipped with a note.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import scipy.sparse as sp
from scipy.linalg import lapack

from trainer.evaluation import EvalSet, evaluate

DEFAULT_L2_GRID = (50.0, 150.0, 500.0, 1500.0, 5000.0)
DEFAULT_MAX_ITEMS = 20_000


def click_matrix(users: np.ndarray, items: np.ndarray, num_users: int,
                 num_items: int) -> sp.csr_matrix:
    """Binary X [num_users, num_items] from (user row, item row) pairs [n], [n].

    A pair clicked several times counts once (EASE models "has interacted").
    """
    x = sp.csr_matrix((np.ones(len(users), np.float32), (users, items)),
                      shape=(num_users, num_items), dtype=np.float32)
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


def gram(x: sp.csr_matrix) -> np.ndarray:
    """G = XᵀX as a dense float32 [I, I] (co-occurrence counts)."""
    return np.asarray((x.T @ x).toarray(), dtype=np.float32)


def ease_weights(g: np.ndarray, l2: float) -> np.ndarray:
    """B [I, I] float32 for one λ; ``g`` is left unchanged.

    One Cholesky of G + λI and its inverse, both in place in one copy of G.
    """
    if l2 <= 0:
        raise ValueError(f"EASE l2 must be positive, got {l2}")
    a = np.array(g, dtype=np.float32, order="F", copy=True)
    a[np.diag_indices_from(a)] += np.float32(l2)
    c, info = lapack.spotrf(a, lower=1, overwrite_a=1, clean=0)
    if info != 0:
        raise np.linalg.LinAlgError(f"EASE: Cholesky of XᵀX + {l2}·I failed (info={info})")
    p, info = lapack.spotri(c, lower=1, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"EASE: inverse of XᵀX + {l2}·I failed (info={info})")
    _symmetrize_from_lower(p)
    diag = p.diagonal().copy()
    p /= -diag[None, :]          # B[:, j] = -P[:, j] / P[j, j]
    p[np.diag_indices_from(p)] = 0.0
    return p


def _symmetrize_from_lower(m: np.ndarray, block: int = 2048) -> None:
    """Copy the lower triangle of square ``m`` onto its upper one, in place,
    a block of rows at a time (no full-size temporaries)."""
    n = m.shape[0]
    for start in range(0, n, block):
        stop = min(start + block, n)
        upper = np.triu(np.ones((stop - start, n - start), bool), 1)
        rows = m[start:stop, start:]
        rows[upper] = m[start:, start:stop].T[upper]


def ease_scores(x: sp.csr_matrix, b: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """score_fn(user_rows [n]) -> X[user_rows] · B  [n, I] for ``evaluate``."""
    return lambda users: np.asarray(x[users] @ b, dtype=np.float32)


@dataclass
class EaseResult:
    """A fitted reference model, or why there is none (``skipped``)."""

    l2: Optional[float] = None
    score_fn: Optional[Callable[[np.ndarray], np.ndarray]] = None
    validation: dict = field(default_factory=dict)  # λ -> validation HR@k
    selection_metric: str = ""
    seconds: float = 0.0
    skipped: str = ""


def fit_ease(train: EvalSet, num_users: int, validation: EvalSet,
             l2_grid: Sequence[float] = DEFAULT_L2_GRID, k: int = 100,
             max_items: int = DEFAULT_MAX_ITEMS) -> EaseResult:
    """Choose λ on ``validation`` and return the model fitted on ``train``.

    ``train.seen_*`` are the clicks EASE learns from (the pairs a final model
    is fitted on); ``validation`` scores each λ: its ``seen_*`` are the clicks
    the candidate model learns from and its ``test_*`` the held-out pairs, so a
    choice never looks at the test split. When both share the same clicks the
    fitted λ is reused, otherwise the chosen λ is refitted on ``train``.
    """
    if train.num_items > max_items:
        return EaseResult(skipped=f"EASE skipped: catalog of {train.num_items} items is "
                                  f"above evaluation.ease_max_items = {max_items}")
    started = time.perf_counter()
    metric = f"hr@{k}"
    fit_x = click_matrix(validation.seen_users, validation.seen_items, num_users,
                         validation.num_items)
    g = gram(fit_x)
    scores: dict[float, float] = {}
    best_l2, best_b = None, None
    for l2 in sorted(set(float(v) for v in l2_grid)):
        b = ease_weights(g, l2)
        scores[l2] = evaluate(ease_scores(fit_x, b), validation, ks=[k])[metric]
        if best_l2 is None or scores[l2] > scores[best_l2]:
            best_l2, best_b = l2, b
        del b
    same_clicks = (len(train.seen_users) == len(validation.seen_users)
                   and np.array_equal(train.seen_users, validation.seen_users)
                   and np.array_equal(train.seen_items, validation.seen_items))
    if same_clicks:
        x = fit_x
    else:
        del g, best_b
        x = click_matrix(train.seen_users, train.seen_items, num_users, train.num_items)
        best_b = ease_weights(gram(x), best_l2)
    return EaseResult(best_l2, ease_scores(x, best_b), scores, metric,
                      round(time.perf_counter() - started, 2))
