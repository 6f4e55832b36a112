"""Towers take raw features and return unit-norm embeddings of the right shape."""
import json

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from trainer.config import (CategoricalFeature, ContinuousFeature, MultiCategoricalFeature,
                            TextFeature, TowerConfig)
from trainer.saving import save_tower
from trainer.towers import Tower, TowerEmbedder, embed, features_of

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


def test_embedder_runs_eagerly_first_then_traced_and_both_agree():
    tower = make_tower()
    feats = features_of(TABLE, SPECS, "items")
    embedder = TowerEmbedder(tower, batch_size=4, eager_calls=1)
    eager = embedder(feats)                  # one batch, first call: no tracing
    assert embedder._traced is None
    traced = embedder(feats)                 # the eager budget is spent: traced
    assert embedder._traced is not None
    np.testing.assert_allclose(eager, traced, rtol=1e-6, atol=1e-7)
    batched = TowerEmbedder(tower, batch_size=3)   # two batches: traced at once
    np.testing.assert_allclose(batched(feats), eager, rtol=1e-6, atol=1e-7)
    assert batched._traced is not None
    assert TowerEmbedder(tower)({k: v[:0] for k, v in feats.items()}).shape == (0, 6)


def test_saved_tower_matches_in_memory(tmp_path):
    tower = make_tower()
    feats = features_of(TABLE, SPECS, "items")
    save_tower(tower, tmp_path / "tower")
    loaded = tf.saved_model.load(str(tmp_path / "tower"))
    sig = loaded.signatures["serving_default"]
    assert set(sig.structured_input_signature[1]) == {"item_id", "tags", "price", "title"}
    got = sig(**{k: tf.constant(v) for k, v in feats.items()})["embedding"].numpy()
    np.testing.assert_allclose(got, embed(tower, feats), rtol=1e-5, atol=1e-6)


def _trained(tower, feats):
    """One optimizer step, so no weight is still at its initial value."""
    opt = tf.keras.optimizers.SGD(0.5)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tower(feats, training=True)[:, 0])
    opt.apply_gradients(zip(tape.gradient(loss, tower.trainable_variables),
                            tower.trainable_variables))
    return tower


@pytest.mark.parametrize("members,build_first", [(1, False), (2, True)])
def test_tower_rebuilt_from_config_and_checkpoint_is_bit_identical(tmp_path, members,
                                                                   build_first):
    feats = features_of(TABLE, SPECS, "items")
    tower = _trained(make_tower(members=members), feats)
    path = tf.train.Checkpoint(tower=tower).write(str(tmp_path / "ckpt"))
    config = json.loads(json.dumps(tower.get_config()))   # plain JSON, nothing hidden
    rebuilt = Tower.from_config(config)
    unseen = {"item_id": np.array(["a", "new"], object), "tags": np.array(["x|q", ""], object),
              "price": np.array([np.nan, 3.0], np.float32),
              "title": np.array(["red", "blue car"], object)}
    if build_first:
        rebuilt(unseen)
    tf.train.Checkpoint(tower=rebuilt).read(path).assert_existing_objects_matched()
    assert json.loads(json.dumps(rebuilt.get_config())) == config
    for inputs in (feats, unseen):
        np.testing.assert_array_equal(embed(rebuilt, inputs), embed(tower, inputs))


def test_grown_vocabulary_keeps_old_rows_and_appends_new_ones(tmp_path):
    tower = make_tower()
    feats = features_of(TABLE, SPECS, "items")
    before = embed(tower, feats)
    encoder = tower.encoders["item_id"]
    old_table = encoder.embedding.embeddings.numpy()
    new_items = pd.DataFrame({"item_id": ["e", "a", "f", "e"], "tags": ["x|w", "", "", "w"],
                              "price": [1.0] * 4, "title": [""] * 4})
    added = tower.grow_vocabularies(new_items, "items")
    assert added == {"item_id": ["e", "f"], "tags": ["w"]}
    assert encoder.vocabulary_terms()[-2:] == ["e", "f"]
    table = encoder.embedding.embeddings.numpy()
    assert table.shape == (old_table.shape[0] + 2, 8)
    np.testing.assert_array_equal(table[:old_table.shape[0]], old_table)
    assert not np.allclose(table[-1], table[-2])  # own rows, not copies
    np.testing.assert_array_equal(embed(tower, feats), before)   # old ids: same vectors
    lookup = encoder.lookup(tf.constant(["e", "f", "zzz"])).numpy().tolist()
    assert lookup == [old_table.shape[0], old_table.shape[0] + 1, 0]
    assert tower.grow_vocabularies(new_items, "items") == {"item_id": [], "tags": []}
    # the grown table replaced the old one in tracking, and a grown tower round-trips
    assert sum(v.shape == old_table.shape for v in tower.trainable_variables) == 0
    path = tf.train.Checkpoint(tower=tower).write(str(tmp_path / "grown"))
    rebuilt = Tower.from_config(tower.get_config())
    tf.train.Checkpoint(tower=rebuilt).read(path).assert_existing_objects_matched()
    new_feats = features_of(new_items, SPECS, "items")
    np.testing.assert_array_equal(embed(rebuilt, new_feats), embed(tower, new_feats))


@pytest.mark.parametrize("hidden", [[], [16]])
def test_dropout_acts_in_training_only_with_or_without_hidden_layers(hidden):
    """Dropout sits on the input of every Dense layer, so a tower without
    hidden layers (ids straight to the projection) is regularised too."""
    tower = Tower(SPECS, TowerConfig(hidden_units=hidden, output_dim=6, dropout=0.5))
    tower.adapt(TABLE, "items")
    features = {k: tf.constant(v) for k, v in features_of(TABLE, SPECS, "items").items()}
    tf.random.set_seed(0)
    inference = tower(features, training=False).numpy()
    np.testing.assert_array_equal(inference, tower(features, training=False).numpy())
    assert not np.allclose(inference, tower(features, training=True).numpy())
