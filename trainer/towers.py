"""A tower: raw feature dict -> L2-normalised embedding [batch, output_dim].

Feature encoders (trainer.features) -> concat -> MLP (ReLU hidden layers, a
linear output layer) -> L2 normalisation, so dot products are cosines.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import tensorflow as tf

from trainer.config import FeatureConfig, TowerConfig
from trainer.features import RAW_DTYPES, make_encoder, raw_column


class Tower(tf.keras.Model):
    """Maps {feature name: raw tensor [batch]} to embeddings [batch, output_dim]."""

    def __init__(self, specs: Sequence[FeatureConfig], config: TowerConfig, **kwargs):
        super().__init__(**kwargs)
        self.specs = list(specs)
        self.tower_config = config
        # members > 1: an ensemble of independent towers, concatenated (see TowerConfig).
        self.members = [Tower(specs, config.model_copy(update={"members": 1}),
                              name=f"member_{m}") for m in range(config.members)] \
            if config.members > 1 else []
        if self.members:
            return
        self.encoders = {s.name: make_encoder(s) for s in self.specs}
        self.hidden = [tf.keras.layers.Dense(u, activation="relu") for u in config.hidden_units]
        self.dropout = (tf.keras.layers.Dropout(config.dropout) if config.dropout else None)
        self.projection = tf.keras.layers.Dense(config.output_dim)

    @property
    def input_signature(self) -> dict[str, tf.TensorSpec]:
        """One [None] tensor per raw feature, with the dtype serving must send."""
        return {s.name: tf.TensorSpec([None], RAW_DTYPES[s.type], name=s.name)
                for s in self.specs}

    def adapt(self, table: pd.DataFrame, table_name: str) -> None:
        """Fit vocabularies / statistics of every encoder on ``table``."""
        for member in self.members:
            member.adapt(table, table_name)
        if self.members:
            return
        for spec in self.specs:
            self.encoders[spec.name].adapt(raw_column(table, spec, table_name))

    @property
    def embedding_dim(self) -> int:
        return self.tower_config.output_dim * self.tower_config.members

    def call(self, features, training=False):
        if self.members:
            scale = 1.0 / float(len(self.members)) ** 0.5
            return tf.concat([m(features, training=training) for m in self.members],
                             axis=-1) * scale
        parts = [self.encoders[s.name](features[s.name]) for s in self.specs]
        x = tf.concat(parts, axis=-1) if len(parts) > 1 else parts[0]
        for layer in self.hidden:
            x = layer(x)
            if self.dropout is not None:
                x = self.dropout(x, training=training)
        x = self.projection(x)
        if self.tower_config.l2_normalize:
            x = tf.math.l2_normalize(x, axis=-1)
        return x


def features_of(table: pd.DataFrame, specs: Sequence[FeatureConfig],
                table_name: str) -> dict:
    """Raw numpy columns for ``specs`` from ``table`` (the tower's input dict)."""
    return {s.name: raw_column(table, s, table_name) for s in specs}


def embed(tower: Tower, features: dict, batch_size: int = 4096) -> np.ndarray:
    """Run a tower over a dict of numpy columns in batches; returns [n, d] float32.

    The traced inference function is kept on the tower, so per-epoch
    validation does not trace it again.
    """
    n = len(next(iter(features.values())))
    out = []
    call = getattr(tower, "_inference_fn", None)
    if call is None:
        call = tf.function(lambda f: tower(f, training=False),
                           input_signature=[tower.input_signature])
        object.__setattr__(tower, "_inference_fn", call)  # not tracked by Keras
    for start in range(0, n, batch_size):
        chunk = {k: v[start:start + batch_size] for k, v in features.items()}
        out.append(call(chunk).numpy())
    if not out:
        return np.zeros((0, tower.embedding_dim), np.float32)
    return np.concatenate(out).astype(np.float32)
