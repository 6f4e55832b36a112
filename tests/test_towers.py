"""Towers take raw features and return unit-norm embeddings of the right shape."""
import numpy as np
import pandas as pd
import tensorflow as tf

from trainer.config import (CategoricalFeature, ContinuousFeature, MultiCategoricalFeature,
                            TextFeature, TowerConfig)
from trainer.saving import save_tower
from trainer.towers import Tower, embed, features_of

SPECS = [
    CategoricalFeature(name="item_id", type="categorical", embedding_dim=8),
    MultiCategoricalFeature(name="tags", type="multi_categorical", embedding_dim=4),
    ContinuousFeature(name="price", type="continuous", buckets=3),
    TextFeature(name="title", type="text", embedding_dim=4, max_tokens=50),
]
TABLE = pd.DataFrame({"item_id": ["a", "b", "c", "d"], "tags": ["x|y", "y", "", "z"],
                      "price": [1.0, 2.0, np.nan, 8.0],
                      "title": ["big red", "small", "red car", ""]})


def make_tower(**cfg):
    tower = Tower(SPECS, TowerConfig(hidden_units=[16], output_dim=6, **cfg))
    tower.adapt(TABLE, "items")
    return tower


def test_shapes_and_unit_norm():
    tower = make_tower()
    out = embed(tower, features_of(TABLE, SPECS, "items"))
    assert out.shape == (4, 6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_unseen_values_still_embed():
    tower = make_tower()
    out = tower({"item_id": tf.constant(["new"]), "tags": tf.constant(["never|seen"]),
                 "price": tf.constant([1e6]), "title": tf.constant(["unknown words"])})
    assert out.shape == (1, 6) and np.isfinite(out.numpy()).all()


def test_saved_tower_matches_in_memory(tmp_path):
    tower = make_tower()
    feats = features_of(TABLE, SPECS, "items")
    save_tower(tower, tmp_path / "tower")
    loaded = tf.saved_model.load(str(tmp_path / "tower"))
    sig = loaded.signatures["serving_default"]
    assert set(sig.structured_input_signature[1]) == {"item_id", "tags", "price", "title"}
    got = sig(**{k: tf.constant(v) for k, v in feats.items()})["embedding"].numpy()
    np.testing.assert_allclose(got, embed(tower, feats), rtol=1e-5, atol=1e-6)
