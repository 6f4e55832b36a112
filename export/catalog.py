"""Embed the whole catalog with the candidate tower, in batches, with a progress bar."""
from __future__ import annotations

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from export.run_artifacts import TrainedRun, feature_columns


def embed_catalog(run: TrainedRun, items: pd.DataFrame, batch_size: int = 8192,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Return (item ids [N] str, embeddings [N, d] float32) for every catalog row."""
    columns = feature_columns(items, run.spec["candidate"], "item table")
    with tqdm(total=len(items), desc="embedding catalog", unit="item",
              disable=not progress) as bar:
        embeddings = run.embed("candidate", columns, batch_size, progress=bar)
    return items["item_id"].astype(str).to_numpy(dtype=object), embeddings


def id_index(ids) -> pd.Index:
    """Item ids [N] as an object-dtype pandas Index of str (id -> row by
    ``get_indexer``): object, because pandas 3 would otherwise copy the ids into
    an Arrow string array and back again for every lookup (~0.5 s at 1M ids)."""
    ids = ids.to_numpy(dtype=object) if isinstance(ids, (pd.Series, pd.Index)) else np.asarray(ids)
    if ids.dtype != object or pd.api.types.infer_dtype(ids, skipna=False) != "string":
        ids = ids.astype(str)
    return pd.Index(ids.astype(object, copy=False), dtype=object)
