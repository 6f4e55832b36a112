"""The quality gate: candidate vs the served version on the held-out slice.

Both are scored the same way (trainer.evaluation: exact full-catalog top-K
over the window's catalog, each user's training clicks of the window
excluded) on the newest part of the window, which the candidate did not
train on. The served version is read from the model base as TF Serving
would load it (its query_tower and candidate_tower SavedModels).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import tensorflow as tf

from export.run_artifacts import feature_columns
from export.versioning import existing_versions, is_complete
from trainer.evaluation import EvalSet, embedding_scores, evaluate


@dataclass(frozen=True)
class GateResult:
    metric: str                    # e.g. "hr@10"
    candidate: float
    served: Optional[float]        # None: nothing served yet
    served_version: Optional[int]
    margin: float                  # relative: refused when candidate < served * (1 - margin)

    @property
    def passed(self) -> bool:
        return self.served is None or self.candidate >= self.served * (1.0 - self.margin)

    def describe(self) -> str:
        if self.served is None:
            return f"candidate {self.metric} {self.candidate:.4f}; nothing served yet"
        verdict = "passed" if self.passed else "REFUSED"
        return (f"gate {verdict}: candidate {self.metric} {self.candidate:.4f} vs served "
                f"version {self.served_version} {self.served:.4f} (margin {self.margin:.0%})")

    def as_dict(self) -> dict:
        return {"metric": self.metric, "candidate": self.candidate, "served": self.served,
                "served_version": self.served_version, "margin": self.margin,
                "passed": self.passed}


def served_version(model_base: Path) -> Optional[int]:
    """The highest version complete in both tower models (what a server with the
    default latest policy serves), or None."""
    towers = [set(v for v in existing_versions(Path(model_base) / m)
                  if is_complete(Path(model_base) / m / str(v)))
              for m in ("query_tower", "candidate_tower")]
    common = towers[0] & towers[1]
    return max(common) if common else None


def _embed(model_dir: Path, table: pd.DataFrame, batch: int = 4096) -> np.ndarray:
    fn = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
    specs = fn.structured_input_signature[1]
    features = [{"name": n, "dtype": s.dtype.name} for n, s in specs.items()]
    inputs = feature_columns(table, features, str(model_dir))
    n = len(table)
    out = [fn(**{k: tf.constant(v[i:i + batch]) for k, v in inputs.items()})["embedding"].numpy()
           for i in range(0, n, batch)]
    return np.concatenate(out).astype(np.float32)


def served_metrics(model_base: Path, version: int, users: pd.DataFrame,
                   items: pd.DataFrame, test: EvalSet, ks) -> dict:
    """Metrics of a served version's towers on ``test`` (rows of ``users``/``items``)."""
    base = Path(model_base)
    scores = embedding_scores(_embed(base / "query_tower" / str(version), users),
                              _embed(base / "candidate_tower" / str(version), items))
    return evaluate(scores, test, ks)
