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
