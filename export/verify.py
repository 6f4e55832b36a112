"""Checks that fail an export loudly before a version is published.

- the SavedModel embeddings equal the in-memory towers' (allclose);
- exact retrieval equals a numpy brute force;
- ScaNN recall@k against exact reaches the target;
- every SavedModel loads and runs through the session-based loader (tag
  "serve", SignatureDef tensor names), the path TF Serving's C++ server takes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf


class ExportCheckError(RuntimeError):
    """An exported model that does not behave as the towers it came from."""


def run_with_session(export_dir: Path, inputs: dict[str, np.ndarray],
                     signature: str = "serving_default") -> dict[str, np.ndarray]:
    """Load with tf.compat.v1 loader in a fresh graph and run one signature."""
    graph = tf.Graph()
    with tf.compat.v1.Session(graph=graph) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], str(export_dir))
        if signature not in meta.signature_def:
            raise ExportCheckError(f"{export_dir}: no signature {signature!r}")
        sig = meta.signature_def[signature]
        missing = set(sig.inputs) - set(inputs)
        if missing:
            raise ExportCheckError(f"{export_dir}: signature {signature} needs inputs "
                                   f"{sorted(missing)}")
        feed = {sig.inputs[k].name: v for k, v in inputs.items()}
        fetch = {k: v.name for k, v in sig.outputs.items()}
        return sess.run(fetch, feed_dict=feed)


def check_close(name: str, got: np.ndarray, want: np.ndarray, atol: float = 1e-5) -> None:
    if got.shape != want.shape or not np.allclose(got, want, atol=atol, rtol=1e-4):
        diff = (np.abs(got - want).max() if got.shape == want.shape
                else f"shape {got.shape} vs {want.shape}")
        raise ExportCheckError(f"{name}: exported output differs from the in-memory "
                               f"towers (max abs diff {diff})")


def check_exact_retrieval(item_ids: np.ndarray, scores: np.ndarray, query_emb: np.ndarray,
                          catalog_ids: np.ndarray, catalog_emb: np.ndarray) -> None:
    """Exact retrieval must return numpy's top-k scores, and ids whose scores match."""
    k = scores.shape[1]
    full = query_emb @ catalog_emb.T
    want = -np.sort(-full, axis=1)[:, :k]
    if not np.allclose(scores, want, atol=1e-4):
        raise ExportCheckError("retrieval_exact: scores differ from a numpy brute force "
                               f"(max abs diff {np.abs(scores - want).max():.2e})")
    row_of = {iid: r for r, iid in enumerate(catalog_ids)}
    ids = item_ids.astype(str)
    rows = np.vectorize(row_of.__getitem__)(ids)
    got = np.take_along_axis(full, rows, axis=1)
    if not np.allclose(got, scores, atol=1e-4):
        raise ExportCheckError("retrieval_exact: returned ids do not carry the returned "
                               "scores")


def recall(found_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean overlap of two [Q, k] id matrices, divided by k."""
    return float(np.mean([len(set(a) & set(b)) / len(b)
                          for a, b in zip(found_ids.astype(str), exact_ids.astype(str))]))
