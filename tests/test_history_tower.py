"""A query tower that reads the user's history through the item tower's own table."""
import copy

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tiny_run_config import TINY
from trainer.config import ConfigError, parse_config
from trainer.data import load_tables
from trainer.model import TwoTowerModel
from trainer.prepare import prepare_data
from trainer.towers import TowerEmbedder
from trainer.train import build_model, fit

SHARED = {"name": "history", "type": "history", "pooling": "attention",
          "share_item_embeddings": True, "max_items": 20}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    raw = copy.deepcopy(TINY)
    raw["features"]["user"].append(SHARED)
    raw["training"]["epochs"] = 1
    config = parse_config(raw)
    tf.keras.utils.set_random_seed(0)
    prepared = prepare_data(config, load_tables(config.data))
    model = build_model(config, prepared)
    fit(model, prepared, config, tmp_path_factory.mktemp("fit"), verbose=0)
    return config, prepared, model


def test_one_table_serves_both_towers(trained):
    _, _, model = trained
    history = model.query_tower.encoders["history"]
    items = model.candidate_tower.encoders["item_id"]
    assert history.items is items
    table = items.embedding.embeddings
    assert sum(v is table for v in model.trainable_variables) == 1  # trained once, not twice


def test_a_new_click_moves_the_user_vector_without_retraining(trained):
    _, prepared, model = trained
    features = {k: v[:1].copy() for k, v in prepared.encoded.user_features.items()}
    before = TowerEmbedder(model.query_tower)(features)
    vocabulary = model.candidate_tower.encoders["item_id"].vocabulary_terms()
    new_click = next(t for t in vocabulary if t not in features["history"][0].split("|"))
    features["history"] = np.array([f"{features['history'][0]}|{new_click}"], dtype=object)
    after = TowerEmbedder(model.query_tower)(features)
    assert np.abs(after - before).max() > 1e-4


def test_rebuilt_from_config_and_checkpoint_gives_identical_embeddings(trained, tmp_path):
    _, prepared, model = trained
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    clone = TwoTowerModel.from_config(model.get_config())
    assert clone.query_tower.encoders["history"].items is \
        clone.candidate_tower.encoders["item_id"]
    batch = {k: v[:8] for k, v in prepared.encoded.user_features.items()}
    clone.query_tower(batch)
    clone.candidate_tower({k: v[:8] for k, v in prepared.encoded.item_features.items()})
    tf.train.Checkpoint(model=clone).read(path).assert_existing_objects_matched()
    np.testing.assert_array_equal(TowerEmbedder(clone.query_tower)(batch),
                                  TowerEmbedder(model.query_tower)(batch))


def test_sharing_needs_an_adapted_item_id_table():
    raw = copy.deepcopy(TINY)
    raw["features"]["user"].append({**SHARED, "embedding_dim": 8})
    with pytest.raises(ConfigError, match=r"embedded by item_id's table \(embedding_dim 16\), "
                                          r"not 8"):
        parse_config(raw)
    raw = copy.deepcopy(TINY)
    raw["features"]["user"].append(SHARED)
    raw["features"]["item"][0]["vocabulary"] = "hashing"
    with pytest.raises(ConfigError, match="categorical with vocabulary: adapt"):
        parse_config(raw)


def test_an_update_window_reads_the_history_of_the_clicks_before_it():
    """An update trains on its window only, but a user's history (what serving
    sends) holds the clicks before the window too, in time order, newest last."""
    from trainer.data import Tables

    raw = copy.deepcopy(TINY)
    raw["features"]["user"].append({**SHARED, "max_items": 1000})
    config = parse_config(raw)
    tables = load_tables(config.data)
    clicks = tables.interactions[tables.interactions["clicked"] == 1]
    user = clicks["user_id"].value_counts().index[0]
    mine = clicks[clicks["user_id"] == user].sort_values("timestamp", kind="stable")
    cut = mine["timestamp"].iloc[len(mine) // 2]
    inside = tables.interactions["timestamp"] >= cut
    window = Tables(tables.interactions[inside].reset_index(drop=True), tables.users,
                    tables.items, ranking_log=tables.ranking_log, name=tables.name)
    earlier = clicks[clicks["timestamp"] < cut]

    alone = prepare_data(config, window)
    joined = prepare_data(config, window, earlier_clicks=earlier)
    trained = alone.splits.train_positives
    assert joined.splits.train_positives.equals(trained)        # nothing earlier trains
    history = joined.tables.users.set_index("user_id")["history"]
    # all the user's clicks: the earlier ones, then the window's training ones
    seen = pd.concat([earlier, trained]).sort_values("timestamp", kind="stable")
    expected = seen[seen["user_id"] == user]["item_id"].astype(str).tolist()
    window_only = trained[trained["user_id"] == user].sort_values("timestamp", kind="stable")
    assert len(expected) > len(window_only) > 0
    assert history[user].split("|") == expected
    assert alone.tables.users.set_index("user_id")["history"][user].split("|") == \
        window_only["item_id"].astype(str).tolist()
