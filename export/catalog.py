"""Embed the whole catalog with the candidate tower, in batches, with a progress bar."""
from __future__ import annotations

import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm.auto import tqdm

from export.run_artifacts import TrainedRun, feature_columns


def embed_catalog(run: TrainedRun, items: pd.DataFrame, batch_size: int = 8192,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Return (item ids [N] str, embeddings [N, d] float32) for every catalog row."""
    columns = feature_columns(items, run.spec["candidate"], "item table")
    n = len(items)
    embed = tf.function(run.candidate_tower.embed, input_signature=[run.candidate_signature])
    out = np.empty((n, run.embedding_dim), np.float32)
    with tqdm(total=n, desc="embedding catalog", unit="item", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            chunk = {k: v[start:start + batch_size] for k, v in columns.items()}
            out[start:start + batch_size] = embed(chunk)["embedding"].numpy()
            bar.update(min(batch_size, n - start))
    return items["item_id"].astype(str).to_numpy(dtype=object), out
