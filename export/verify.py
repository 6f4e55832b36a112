"""Checks that fail an export loudly before a version is published.

- the SavedModel embeddings equal the in-memory towers' (allclose);
- exact retrieval equals a numpy brute force;
- ScaNN recall@k against exact reaches the target;
- every SavedModel loads and runs through the session-based loader (tag
  "serve", SignatureDef tensor names), the path TF Serving's C++ server takes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from export.catalog import id_index


class ExportCheckError(RuntimeError):
    """An exported model that does not behave as the towers it came from."""


@dataclass(frozen=True)
class RetrievalChecks:
    """How a staged retrieval model is checked (docs/ARTIFACTS.md, "What an
    export checks").

    ``exact_queries``: sampled users that retrieval_exact answers through the
    session, compared with a numpy brute force (None: every sampled user).
    ``latency_probes``: single queries timed through the session for the metadata.
    ``saved_arrays``: read the staged checkpoint back and compare the arrays the
    model serves from (exact matrix, ScaNN state, row -> item ids) bit for bit
    with what was built, every row.
    """
    exact_queries: Optional[int] = None
    latency_probes: int = 300
    saved_arrays: bool = False


FULL_CHECKS = RetrievalChecks()
# An incremental export changes only rows of arrays whose every byte is compared,
# so its session checks need to prove only that the graph serves from them.
INCREMENTAL_CHECKS = RetrievalChecks(exact_queries=64, latency_probes=50, saved_arrays=True)


class SessionModel:
    """A SavedModel loaded with the tf.compat.v1 loader in its own graph, as TF
    Serving loads it; run by SignatureDef tensor names. Use as a context
    manager (closes the session)."""

    def __init__(self, export_dir: Path):
        self.export_dir = export_dir
        self.session = tf.compat.v1.Session(graph=tf.Graph())
        self.signatures = tf.compat.v1.saved_model.loader.load(
            self.session, ["serve"], str(export_dir)).signature_def

    def __enter__(self) -> "SessionModel":
        return self

    def __exit__(self, *exc) -> None:
        self.session.close()

    def run(self, inputs: dict[str, np.ndarray], signature: str = "serving_default",
            batch_size: int = 256) -> dict[str, np.ndarray]:
        """Run ``batch_size`` rows at a time (exact retrieval over a large catalog
        materialises [batch, catalog] scores) and concatenate the outputs."""
        if signature not in self.signatures:
            raise ExportCheckError(f"{self.export_dir}: no signature {signature!r}")
        sig = self.signatures[signature]
        missing = set(sig.inputs) - set(inputs)
        if missing:
            raise ExportCheckError(f"{self.export_dir}: signature {signature} needs inputs "
                                   f"{sorted(missing)}")
        fetch = {k: v.name for k, v in sig.outputs.items()}
        n = len(next(iter(inputs.values())))
        parts = [self.session.run(fetch, feed_dict={sig.inputs[k].name: v[s:s + batch_size]
                                                    for k, v in inputs.items()})
                 for s in range(0, n, batch_size)]
        return {k: np.concatenate([p[k] for p in parts]) for k in fetch}


def run_with_session(export_dir: Path, inputs: dict[str, np.ndarray],
                     signature: str = "serving_default",
                     batch_size: int = 256) -> dict[str, np.ndarray]:
    """Load ``export_dir`` and run one signature once (see SessionModel)."""
    with SessionModel(export_dir) as model:
        return model.run(inputs, signature, batch_size)


def check_close(name: str, got: np.ndarray, want: np.ndarray, atol: float = 1e-5) -> None:
    if got.shape != want.shape or not np.allclose(got, want, atol=atol, rtol=1e-4):
        diff = (np.abs(got - want).max() if got.shape == want.shape
                else f"shape {got.shape} vs {want.shape}")
        raise ExportCheckError(f"{name}: exported output differs from the in-memory "
                               f"towers (max abs diff {diff})")


def check_exact_retrieval(item_ids: np.ndarray, scores: np.ndarray, query_emb: np.ndarray,
                          truth_rows: np.ndarray, catalog_ids: np.ndarray,
                          catalog_emb: np.ndarray, row_of: Optional[pd.Index] = None) -> None:
    """Exact retrieval must return numpy's top-k scores, with ids that carry them.

    ``truth_rows`` [Q, k]: numpy's exact top-k catalog rows for ``query_emb``;
    ``row_of``: the catalog's ids as a str Index (built here when not given).
    Works per returned row, never materialising [Q, catalog] scores.
    """
    want = np.einsum("qd,qkd->qk", query_emb, catalog_emb[truth_rows])
    if not np.allclose(scores, want, atol=1e-4):
        raise ExportCheckError("retrieval_exact: scores differ from a numpy brute force "
                               f"(max abs diff {np.abs(scores - want).max():.2e})")
    row_of = id_index(catalog_ids) if row_of is None else row_of
    rows = row_of.get_indexer(item_ids.astype(str).ravel())
    if (rows < 0).any():
        raise ExportCheckError("retrieval_exact: returned ids that are not in the catalog")
    rows = rows.reshape(item_ids.shape)
    carried = np.einsum("qd,qkd->qk", query_emb, catalog_emb[rows])
    if not np.allclose(carried, scores, atol=1e-4):
        raise ExportCheckError("retrieval_exact: returned ids do not carry the returned "
                               "scores")


def recall(found_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean overlap of two [Q, k] id matrices, divided by k."""
    return float(np.mean([len(set(a) & set(b)) / len(b)
                          for a, b in zip(found_ids.astype(str), exact_ids.astype(str))]))


def checkpoint_keys(reader) -> dict[str, str]:
    """Object path ("index/_serialized_searcher/dataset") -> checkpoint key, from the
    checkpoint's object graph (the keys themselves only number a layer's variables)."""
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    keys, queue, seen = {}, [("", 0)], set()
    while queue:
        path, node_id = queue.pop(0)
        node = graph.nodes[node_id]
        for attr in node.attributes:  # every path to a variable, not only the first
            if attr.name == "VARIABLE_VALUE":
                keys[path] = attr.checkpoint_key
        if node_id in seen:
            continue
        seen.add(node_id)
        queue.extend((f"{path}/{c.local_name}" if path else c.local_name, c.node_id)
                     for c in node.children)
    return keys


def _same_strings(got: np.ndarray, want: np.ndarray, sep: str = "\x00") -> bool:
    """Whether ``got`` (bytes) equals ``want`` (str) element by element, proven on
    two joined buffers (C loops instead of 1M encode calls): with as many
    elements and no separator inside any of ``want``'s, equal joins mean equal
    elements. False when not proven (the caller then compares one by one)."""
    try:
        joined = sep.join(want.ravel().tolist()).encode()
    except (TypeError, UnicodeError):  # not all str
        return False
    return (got.size == want.size and joined.count(sep.encode()) == max(0, want.size - 1)
            and sep.encode().join(got.ravel().tolist()) == joined)


def check_saved_arrays(name: str, export_dir: Path, expected: dict[str, np.ndarray]) -> None:
    """The staged SavedModel's variables at these object paths hold exactly
    ``expected`` (shape, dtype and every byte): what the served graph reads."""
    reader = tf.train.load_checkpoint(str(Path(export_dir) / "variables" / "variables"))
    keys = checkpoint_keys(reader)
    for path, want in expected.items():
        if path not in keys:
            raise ExportCheckError(f"{name}: the saved model has no variable {path!r}")
        got, want = reader.get_tensor(keys[path]), np.asarray(want)
        if got.dtype == object:  # string tensors come back as bytes
            if got.shape == want.shape and _same_strings(got, want):
                continue
            want = np.array([w if isinstance(w, bytes) else str(w).encode()
                             for w in want.ravel()], dtype=object).reshape(want.shape)
        elif got.dtype != want.dtype:
            raise ExportCheckError(f"{name}: saved variable {path} is {got.dtype}, built "
                                   f"{want.dtype}")
        if got.shape != want.shape:
            raise ExportCheckError(f"{name}: saved variable {path} has shape {got.shape}, "
                                   f"built {want.shape}")
        if got.dtype != object and np.array_equal(  # every byte, without a [N, d] mask
                np.ascontiguousarray(got).reshape(-1).view(np.uint8),
                np.ascontiguousarray(want).reshape(-1).view(np.uint8)):
            continue
        differs = (got != want).reshape(max(1, len(got) if got.ndim else 1), -1).any(axis=1)
        if differs.any():
            raise ExportCheckError(f"{name}: saved variable {path} does not hold what was "
                                   f"built (row {int(np.flatnonzero(differs)[0])} of "
                                   f"{len(differs)} differs first, {int(differs.sum())} in all)")
