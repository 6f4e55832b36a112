"""Read what a training run left on disk (docs/ARTIFACTS.md): towers, spec, catalog.

Export depends on these files only, never on training code: the towers are
SavedModels loaded with ``tf.saved_model.load``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import tensorflow as tf

NUMERIC_DTYPES = {"float32": np.float32}


class RunError(ValueError):
    """A run directory that cannot be exported; the message names the file."""


@dataclass
class TrainedRun:
    path: Path
    query_tower: object  # restored SavedModel with .embed(features) -> {"embedding"}
    candidate_tower: object
    spec: dict  # feature_spec.json
    items: pd.DataFrame
    metrics: dict
    config_text: str
    _embed_fns: dict = field(default_factory=dict, repr=False)

    @property
    def query_signature(self) -> dict[str, tf.TensorSpec]:
        return _signature(self.spec["query"])

    @property
    def candidate_signature(self) -> dict[str, tf.TensorSpec]:
        return _signature(self.spec["candidate"])

    @property
    def embedding_dim(self) -> int:
        return int(self.spec["embedding_dim"])

    def embed(self, side: str, inputs: dict, batch_size: int = 8192,
              progress=None) -> np.ndarray:
        """Embeddings [n, d] of a dict of raw numpy columns, ``side`` "query" or
        "candidate". Calls the tower's saved concrete function: wrapping the
        restored ``embed`` in a new tf.function traced it again (and TF warned
        of retracing on every export)."""
        fn = self._embed_fns.get(side)
        if fn is None:
            tower = self.query_tower if side == "query" else self.candidate_tower
            fn = self._embed_fns[side] = tower.embed.get_concrete_function()
        sig = self.query_signature if side == "query" else self.candidate_signature
        n = len(next(iter(inputs.values())))
        out = np.empty((n, self.embedding_dim), np.float32)
        for start in range(0, n, batch_size):
            chunk = {k: tf.convert_to_tensor(v[start:start + batch_size], sig[k].dtype)
                     for k, v in inputs.items()}
            out[start:start + batch_size] = fn(chunk)["embedding"].numpy()
            if progress is not None:
                progress.update(min(batch_size, n - start))
        return out


def _signature(features: list[dict]) -> dict[str, tf.TensorSpec]:
    return {f["name"]: tf.TensorSpec([None], tf.as_dtype(f["dtype"]), name=f["name"])
            for f in features}


def load_run(run_dir: str | Path) -> TrainedRun:
    root = Path(run_dir)
    for rel in ("towers/query/saved_model.pb", "towers/candidate/saved_model.pb",
                "feature_spec.json", "items.parquet", "users.parquet"):
        if not (root / rel).is_file():
            raise RunError(f"{root / rel}: missing; is {root} a finished training run "
                           "(python -m trainer --output ...)?")
    spec = json.loads((root / "feature_spec.json").read_text())
    metrics_path = root / "metrics.json"
    return TrainedRun(
        path=root,
        query_tower=tf.saved_model.load(str(root / "towers" / "query")),
        candidate_tower=tf.saved_model.load(str(root / "towers" / "candidate")),
        spec=spec,
        items=pd.read_parquet(root / "items.parquet"),
        metrics=json.loads(metrics_path.read_text()) if metrics_path.is_file() else {},
        config_text=(root / "config.yaml").read_text() if (root / "config.yaml").is_file()
        else "",
    )


def string_values(col: pd.Series) -> pd.Series:
    """A string feature's column as the tower gets it: missing values "", all text."""
    return col.fillna("").astype(str)


def feature_columns(table: pd.DataFrame, features: list[dict], source: str) -> dict:
    """Numpy input columns for a tower from a table, coerced to the spec's dtypes."""
    out = {}
    for f in features:
        if f["name"] not in table.columns:
            raise RunError(f"{source}: no column '{f['name']}', which the tower reads "
                           f"(columns: {list(table.columns)})")
        col = table[f["name"]]
        if f["dtype"] == "string":
            out[f["name"]] = string_values(col).to_numpy(dtype=object)
        else:
            values = pd.to_numeric(col, errors="coerce")
            bad = values.isna() & col.notna()
            if bad.any():
                row = int(np.flatnonzero(bad.to_numpy())[0])
                raise RunError(f"{source}: column '{f['name']}' row {row}: expected a "
                               f"number, got {col.iloc[row]!r}")
            out[f["name"]] = values.to_numpy(dtype=NUMERIC_DTYPES[f["dtype"]])
    return out


NUMERIC_NA = ["", "NA", "N/A", "NaN", "nan", "null", "NULL"]   # missing numbers in a CSV


def read_items(path: Optional[str | Path], run: TrainedRun) -> pd.DataFrame:
    """The catalog to index: the run's items, or a new/changed table (refresh)."""
    if path is None:
        return run.items
    p = Path(path)
    if not p.is_file():
        raise RunError(f"{p}: item table not found")
    if p.suffix in (".parquet", ".pq"):
        table = pd.read_parquet(p)
    else:
        # ids and string features stay text ("00042" is not 42; an empty cell
        # is "", not "nan"); numeric features are converted by feature_columns
        strings = {f["name"] for f in run.spec["candidate"] if f["dtype"] == "string"}
        numbers = {f["name"] for f in run.spec["candidate"]} - strings - {"item_id"}
        table = pd.read_csv(p, dtype={name: str for name in strings | {"item_id"}},
                            keep_default_na=False,
                            na_values={name: NUMERIC_NA for name in numbers})
    if "item_id" not in table.columns:
        raise RunError(f"{p}: the item table needs an 'item_id' column")
    missing = table["item_id"].isna() | (table["item_id"].astype(str).str.strip() == "")
    if missing.any():
        raise RunError(f"{p}: row {int(np.flatnonzero(missing.to_numpy())[0])} has no item_id")
    table["item_id"] = table["item_id"].astype(str)
    if table["item_id"].duplicated().any():
        dup = table.loc[table["item_id"].duplicated(), "item_id"].iloc[0]
        raise RunError(f"{p}: duplicate item_id {dup!r}")
    return table
