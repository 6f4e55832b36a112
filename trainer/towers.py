"""A tower: raw feature dict -> L2-normalised embedding [batch, output_dim].

Feature encoders (trainer.features) -> concat -> MLP (ReLU hidden layers, a
linear output layer) -> L2 normalisation, so dot products are cosines.
``Tower.from_config(tower.get_config())`` rebuilds an adapted tower
(vocabularies and statistics are in its encoders' configs); restoring a
checkpoint into it gives bit-identical embeddings.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
import pydantic
import tensorflow as tf

from trainer.config import FeatureConfig, TowerConfig
from trainer.features import RAW_DTYPES, make_encoder, raw_column

_FEATURE = pydantic.TypeAdapter(FeatureConfig)


@tf.keras.utils.register_keras_serializable(package="trainer")
class Tower(tf.keras.Model):
    """Maps {feature name: raw tensor [batch]} to embeddings [batch, output_dim].

    ``encoders`` (feature name -> encoder) and ``members`` (ensemble member
    towers) are given by ``from_config``; a new tower makes them from the specs.
    ``item_encoder``: the candidate tower's item_id encoder, for a history
    feature of this (query) tower that shares its table.
    """

    def __init__(self, specs: Sequence[FeatureConfig], config: TowerConfig,
                 encoders: Optional[dict] = None, members: Optional[list] = None,
                 item_encoder: Optional[tf.keras.layers.Layer] = None, **kwargs):
        super().__init__(**kwargs)
        self.specs = list(specs)
        self.tower_config = config
        # members > 1: an ensemble of independent towers, concatenated (see TowerConfig).
        if config.members > 1:
            self.members = members or [
                Tower(specs, config.model_copy(update={"members": 1}), name=f"member_{m}")
                for m in range(config.members)]
            return
        self.members = []
        self.encoders = encoders or {s.name: make_encoder(s, item_encoder)
                                     for s in self.specs}
        self.hidden = [tf.keras.layers.Dense(u, activation="relu") for u in config.hidden_units]
        self.dropout = (tf.keras.layers.Dropout(config.dropout) if config.dropout else None)
        self.projection = tf.keras.layers.Dense(config.output_dim)

    def get_config(self) -> dict:
        config = {"name": self.name, "specs": [s.model_dump(mode="json") for s in self.specs],
                  "config": self.tower_config.model_dump(mode="json")}
        if self.members:
            config["members"] = [m.get_config() for m in self.members]
        else:
            config["encoders"] = {n: tf.keras.layers.serialize(e)
                                  for n, e in self.encoders.items()}
        return config

    @classmethod
    def from_config(cls, config: dict, custom_objects=None,
                    item_encoder: Optional[tf.keras.layers.Layer] = None) -> "Tower":
        """``item_encoder``: the candidate tower's, for a history encoder that shares
        it (without one, the encoder rebuilds its own copy from its config)."""
        from trainer.history_attention import HistoryEncoder

        def encoder(e: dict):
            if item_encoder is not None and e["config"].get("shared"):
                return HistoryEncoder.from_config(e["config"], custom_objects, item_encoder)
            return tf.keras.layers.deserialize(e, custom_objects=custom_objects)

        encoders = {n: encoder(e) for n, e in config.get("encoders", {}).items()}
        return cls([_FEATURE.validate_python(s) for s in config["specs"]],
                   TowerConfig.model_validate(config["config"]),
                   encoders=encoders or None,
                   members=[cls.from_config(m) for m in config.get("members", [])] or None,
                   name=config["name"])

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

    def grow_vocabularies(self, table: pd.DataFrame, table_name: str,
                          features: Optional[Sequence[str]] = None) -> dict[str, list[str]]:
        """Append the values of ``table`` new to the vocabularies of the
        categorical / multi-valued encoders (``features``: those names only).

        Known values keep their index and embedding row exactly; new ones get
        rows at the end. Returns {feature: values added} (ensemble members grow
        alike). Functions traced over the tower before (``TowerEmbedder``, a
        compiled ``fit``) and optimizer slots of the grown tables must be made
        again.
        """
        added = {}
        for member in self.members:
            added = member.grow_vocabularies(table, table_name, features) or added
        if self.members:
            return added
        for spec in self.specs:
            encoder = self.encoders[spec.name]
            if (features is None or spec.name in features) and \
                    hasattr(encoder, "grow_vocabulary"):
                added[spec.name] = encoder.grow_vocabulary(raw_column(table, spec, table_name))
        return added

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
        for layer in self.hidden + [self.projection]:   # dropout on every Dense layer's input
            if self.dropout is not None:
                x = self.dropout(x, training=training)
            x = layer(x)
        if self.tower_config.l2_normalize:
            x = tf.math.l2_normalize(x, axis=-1)
        return x


def features_of(table: pd.DataFrame, specs: Sequence[FeatureConfig],
                table_name: str) -> dict:
    """Raw numpy columns for ``specs`` from ``table`` (the tower's input dict)."""
    return {s.name: raw_column(table, s, table_name) for s in specs}


class TowerEmbedder:
    """Runs a tower over dicts of numpy columns in batches -> [n, d] float32.

    Tracing the tower (0.3-0.6 s for a tower with text and multi-valued
    features) costs more than running it eagerly over one batch, so the first
    ``eager_calls`` calls that fit in one batch run eagerly (an update's gate
    and a replay's scores embed a few thousand rows once); larger calls and
    the ones after them (per-epoch validation) run the function traced once
    per embedder. Make a new one after the tower's variables change shape
    (``Tower.grow_vocabularies``).
    """

    def __init__(self, tower: Tower, batch_size: int = 4096, eager_calls: int = 2):
        self.tower, self.batch_size = tower, batch_size
        self._eager_calls_left = eager_calls
        self._traced = None

    def _function(self, n: int):
        if self._traced is None and n <= self.batch_size and self._eager_calls_left > 0:
            self._eager_calls_left -= 1
            return lambda f: self.tower(f, training=False)
        if self._traced is None:
            self._traced = tf.function(lambda f: self.tower(f, training=False),
                                       input_signature=[self.tower.input_signature])
        return self._traced

    def __call__(self, features: dict) -> np.ndarray:
        n = len(next(iter(features.values())))
        if n == 0:
            return np.zeros((0, self.tower.embedding_dim), np.float32)
        call = self._function(n)
        out = [call({k: v[start:start + self.batch_size] for k, v in features.items()})
               .numpy() for start in range(0, n, self.batch_size)]
        return np.concatenate(out).astype(np.float32)


def embed(tower: Tower, features: dict, batch_size: int = 4096) -> np.ndarray:
    """One-off ``TowerEmbedder(tower, batch_size)(features)``."""
    return TowerEmbedder(tower, batch_size)(features)
