"""An update that grows the item vocabulary of a query tower whose history
encoder shares the item tower's id table (``share_item_embeddings``): the
shared table grows once, both towers read the new rows, old rows are kept bit
for bit, and the grown run exports and serves a history with a new item."""
import copy

import numpy as np
import pytest
import tensorflow as tf

from update_world import DAY2, DRIFT

SHARED = {"name": "history", "type": "history", "pooling": "attention",
          "share_item_embeddings": True, "max_items": 20}
TABLE = "model/candidate_tower/encoders/item_id/embedding/embeddings/.ATTRIBUTES/VARIABLE_VALUE"


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
    from trainer.config import parse_config
    from trainer.train import train

    raw = copy.deepcopy(DRIFT)
    raw["features"]["user"].append(SHARED)
    raw["training"]["epochs"] = 1
    runs = tmp_path_factory.mktemp("shared-history") / "runs"
    train(parse_config(raw), runs / "initial", verbose=0)
    return runs


def _restored(run):
    from trainer.batches import TrainingBatches
    from trainer.config import load_config
    from trainer.data import load_tables
    from trainer.prepare import prepare_data
    from updates.model_state import restore_model

    config = load_config(run / "config.yaml")
    prepared = prepare_data(config, load_tables(config.data))
    return restore_model(run, next(iter(TrainingBatches(prepared, config).dataset(64, 0))))


def test_growth_extends_the_one_shared_table_for_both_towers(initial):
    from updates.model_state import id_encoders, set_vocabularies

    model = _restored(initial / "initial")
    items = dict(id_encoders(model))["candidate"]
    history = model.query_tower.encoders["history"]
    assert history.items is items
    saved = tf.train.load_checkpoint(str(initial / "initial" / "model" / "state"))
    old_rows = saved.get_tensor(TABLE)
    terms = items.vocabulary_terms()
    set_vocabularies(model, {items: (terms + ["new-a", "new-b"], [])})

    table = items.embedding.embeddings
    assert history.items is items and table.shape[0] == old_rows.shape[0] + 2
    assert sum(v is table for v in model.trainable_variables) == 1   # grown once
    np.testing.assert_array_equal(table.numpy()[:old_rows.shape[0]], old_rows)
    new = tf.constant(["new-a", "new-b", "never-seen"])
    looked_up = history.items(new).numpy()             # what the history pooling reads
    np.testing.assert_array_equal(looked_up[:2], table.numpy()[-2:])
    np.testing.assert_array_equal(looked_up, items(new).numpy())
    assert np.abs(looked_up[0] - looked_up[2]).max() > 0          # own row, not OOV
    opt = model.optimizer                               # one slot pair for the one table
    assert opt._momentums[opt._index_dict[opt._var_key(table)]].shape == table.shape


def test_an_incremental_update_with_new_items_exports_both_towers_on_the_grown_table(
        initial, tmp_path):
    """The update path a user runs (restore, grow, train, gate, commit), then the
    export of both towers (checked with the session loader); the retrieval
    models, which add nothing of their own to the shared table, are
    left out to keep this to seconds."""
    from export.exporter import ExportOptions, export_run
    from trainer import run_dir
    from trainer.towers import TowerEmbedder
    from updates.update import UpdateOptions, train_candidate

    candidate = train_candidate("incremental", initial, tmp_path / "models",
                                UpdateOptions(until=DAY2 + 43200))
    assert candidate.gate.passed and candidate.vocabulary["item_id"]["admitted"] > 0
    run_dir.commit(candidate.out)
    exported = export_run(candidate.out, tmp_path / "models", ExportOptions(
        k=20, progress=False, models=("query_tower", "candidate_tower")))
    assert exported.version == 1

    model = _restored(candidate.out)          # as the next update restores it
    items = model.candidate_tower.encoders["item_id"]
    assert model.query_tower.encoders["history"].items is items
    new_item = items.vocabulary_terms()[-1]   # admitted ids are appended (no expiry here)

    def served(model_name, **features):
        fn = tf.saved_model.load(str(tmp_path / "models" / model_name / "1")).signatures[
            "serving_default"]
        inputs = {n: tf.constant(features.get(n, [""] if s.dtype == tf.string else [0.0]),
                                 s.dtype) for n, s in fn.structured_input_signature[1].items()}
        return fn(**inputs)["embedding"].numpy()

    user = dict(user_id=["u0"], age=[30.0], favorite_genres=["drama"])
    with_new = served("query_tower", history=[new_item], **user)
    with_unknown = served("query_tower", history=["never-seen"], **user)
    assert np.abs(with_new - with_unknown).max() > 1e-4   # the history reads the new row
    expected = TowerEmbedder(model.query_tower)({"user_id": np.array(["u0"], object),
                                     "age": np.array([30.0], np.float32),
                                     "favorite_genres": np.array(["drama"], object),
                                     "history": np.array([new_item], object)})
    np.testing.assert_allclose(with_new, expected, atol=1e-5)


def test_a_dumped_run_config_with_a_shared_history_loads_again(initial):
    """A run's config.yaml writes every field; the history's embedding_dim is the
    item_id table's (16 here, not the default 32), or no update could restore it."""
    from trainer.config import load_config

    config = load_config(initial / "initial" / "config.yaml")
    assert [f.embedding_dim for f in config.features.user if f.name == "history"] == [16]
