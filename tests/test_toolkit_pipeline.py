"""The training pipeline: exposure filtering, negatives, history leave-out, end to end."""
import copy
import json

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from trainer.batches import TrainingBatches
from trainer.config import ConfigError, parse_config
from trainer.data.synthetic import generate
from trainer.evaluation import split_interactions
from trainer.prepare import prepare_data
from trainer.train import train

IDS = {"user": [{"name": "user_id", "type": "categorical", "embedding_dim": 8}],
       "item": [{"name": "item_id", "type": "categorical", "embedding_dim": 8}]}
BASE = {
    "name": "tiny",
    "data": {"kind": "synthetic", "num_users": 120, "num_items": 80,
             "exposures_per_user": 20, "seed": 2},
    "features": IDS,
    "model": {"query_tower": {"output_dim": 8}, "candidate_tower": {"output_dim": 8}},
    "training": {"epochs": 1, "batch_size": 128, "learning_rate": 0.01},
    "evaluation": {"protocol": "random", "ks": [10]},
}


def config(**over):
    raw = copy.deepcopy(BASE)
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v}
    return parse_config(raw)


@pytest.fixture(scope="module")
def tables():
    return generate(num_users=120, num_items=80, exposures_per_user=20, seed=2)


def pipeline(tables, cfg):
    """train()'s own prepare step, then the batches it trains on."""
    prepared = prepare_data(cfg, tables)
    splits = prepared.splits
    return (TrainingBatches(prepared, cfg), prepared.encoded, splits.train_positives,
            splits.exposed)


def pairs(df, enc):
    u, i = enc.rows(df)
    return set(zip(u.tolist(), i.tolist()))


def test_exposed_not_clicked_items_are_never_retrieval_negatives(tables):
    cfg = config(objective={"kind": "listwise"},
                 sampling={"negatives": {"num_negatives": 6, "hard_fraction": 0.5,
                                         "hard_source": "ranking_log"}})
    data, enc, pos, exposed = pipeline(tables, cfg)
    assert (tables.interactions["clicked"] == 0).any()  # they stay in the tables
    clicked, shown = pairs(pos, enc), pairs(exposed, enc)
    assert shown and not clicked & shown
    seen_neg = 0
    for batch in data.dataset(64, seed=0).take(4):
        users = batch["query"]["user_id"].numpy().astype(str)
        u = enc.user_index.get_indexer(users)
        for b, row in enumerate(batch["item_row"].numpy()):
            assert (u[b], row) in clicked            # positives are clicks only
        rows, valid = batch["neg_row"].numpy(), batch["neg_valid"].numpy()
        for b in range(len(u)):
            for r in rows[b][valid[b]]:
                assert (u[b], r) not in shown        # never an exposure ...
                assert (u[b], r) not in clicked      # ... nor one of the user's clicks
                seen_neg += 1
    assert seen_neg > 500


def test_mining_pool_holds_distinct_items(tables):
    """Catalog draws repeat popular items; the pool the model mines from does not."""
    cfg = config(objective={"kind": "listwise"},
                 sampling={"negatives": {"num_negatives": 4, "hard_fraction": 0.5,
                                         "hard_source": "mined", "mining_pool": 64}})
    data, enc, _, _ = pipeline(tables, cfg)
    for batch in data.dataset(32, seed=0).take(3):
        ids = batch["pool"]["item_id"].numpy()
        assert 1 < len(ids) <= 64 and len(set(ids)) == len(ids)
        assert batch["pool_excluded"].shape == (32, len(ids))


def test_extra_candidates_mask_the_users_own_items(tables):
    cfg = config(sampling={"negatives": {"extra_candidates": 40}})
    data, enc, pos, exposed = pipeline(tables, cfg)
    own = pairs(pos, enc) | pairs(exposed, enc)
    batch = next(iter(data.dataset(64, seed=1)))
    u = enc.user_index.get_indexer(batch["query"]["user_id"].numpy().astype(str))
    rows = batch["candidate_row"].numpy()
    mask = batch["score_mask"].numpy()
    assert mask.shape == (64, 64 + 40) and len(rows) == 104
    shown = pairs(exposed, enc)
    for b in range(64):
        # in-batch part: only the user's exposed-not-clicked items are masked by default
        for c in range(64):
            assert mask[b, c] == (b == c or (u[b], rows[c]) not in shown)
        for c in range(64, 104):
            assert mask[b, c] == ((u[b], rows[c]) not in own)
    p, q = data.item_prob, data.catalog.prob
    want = (64 * p[rows] + 40 * q[rows]) / 104      # the mixture logQ term of every candidate
    np.testing.assert_allclose(batch["candidate_prob"].numpy(), want, rtol=1e-5)


def test_in_batch_negatives_never_include_the_users_exposures(tables):
    """Default in_batch_softmax: another user's click that this user was shown
    and did not click is masked out of this user's in-batch negatives."""
    cfg = config()
    data, enc, pos, exposed = pipeline(tables, cfg)
    shown = pairs(exposed, enc)
    masked = 0
    for batch in data.dataset(64, seed=3).take(4):
        u = enc.user_index.get_indexer(batch["query"]["user_id"].numpy().astype(str))
        rows = batch["item_row"].numpy()
        mask = batch["score_mask"].numpy()
        assert mask.shape == (len(u), len(u))
        for b in range(len(u)):
            for c in range(len(u)):
                assert mask[b, c] == (b == c or (u[b], rows[c]) not in shown)
        masked += int((~mask).sum())
    assert masked > 0   # the tiny data set does put exposures in the batches


def test_matrix_factorization_is_the_only_user_of_exposures(tables):
    cfg = config(objective={"kind": "matrix_factorization", "unobserved_per_row": 1},
                 model={"query_tower": {"output_dim": 8, "l2_normalize": False},
                        "candidate_tower": {"output_dim": 8, "l2_normalize": False}})
    data, enc, pos, exposed = pipeline(tables, cfg)
    observed = []
    for batch in data.dataset(256, seed=0):
        y, w = batch["label"].numpy(), batch["weight"].numpy()
        half = len(y) // 2                                # one unobserved draw per row
        observed.append(y[:half])
        assert (y[half:] == 0).all() and np.allclose(w[half:], 0.1)
    observed = np.concatenate(observed)
    # every click (y = 1) and every exposure without one (y = 0), once
    assert (observed == 1).sum() == len(pos) and (observed == 0).sum() == len(exposed)


def test_history_never_contains_the_training_target(tables):
    cfg = config(features={"user": IDS["user"] + [{"name": "history", "type": "history"}]})
    data, enc, pos, _ = pipeline(tables, cfg)
    full = dict(zip(enc.user_index, enc.user_features["history"]))
    batch = next(iter(data.dataset(128, seed=0)))
    users = batch["query"]["user_id"].numpy().astype(str)
    hist = batch["query"]["history"].numpy().astype(str)
    items = np.asarray(enc.item_index)[batch["item_row"].numpy()]
    for user, h, item in zip(users, hist, items):
        assert item not in h.split("|")
        assert set(h.split("|")) - {""} == set(full[user].split("|")) - {item, ""}


def test_history_requires_the_user_tower():
    with pytest.raises(ConfigError, match="a 'history' feature belongs to the user tower"):
        config(features={"user": IDS["user"],
                         "item": IDS["item"] + [{"name": "history", "type": "history"}]})


@pytest.mark.parametrize("kind,extra", [
    ("matrix_factorization", {"objective": {"unobserved_per_row": 1}, "model": {
        "query_tower": {"output_dim": 8, "l2_normalize": False},
        "candidate_tower": {"output_dim": 8, "l2_normalize": False}}}),
    ("pointwise", {"sampling": {"negatives": {"hard_fraction": 0.5, "hard_source": "mined",
                                              "mining_pool": 32}}}),
    ("pairwise_hinge", {"sampling": {"negatives": {"hard_fraction": 0.5}}}),
    ("pairwise_logistic", {"model": {"query_tower": {"output_dim": 4, "members": 2},
                                     "candidate_tower": {"output_dim": 4, "members": 2}}}),
    ("listwise", {"sampling": {"positives": {"subsample_threshold": 0.01,
                                             "upsample_below": 3, "upsample_factor": 2}}}),
    ("in_batch_softmax", {"objective": {"num_hard_negatives": 20},
                          "sampling": {"negatives": {"extra_candidates": 32,
                                                     "mask_user_positives": True}},
                          "features": {"user": IDS["user"] + [
                              {"name": "history", "type": "history", "dropout": 0.2}]}}),
])
@pytest.mark.slow
def test_every_objective_trains_and_exports(kind, extra, tmp_path, tables):
    over = copy.deepcopy(extra)
    over.setdefault("objective", {})["kind"] = kind
    cfg = config(**over)
    run = train(cfg, tmp_path, verbose=0)
    assert np.isfinite(run.history["loss"]).all()
    spec = json.loads((tmp_path / "feature_spec.json").read_text())
    query = tf.saved_model.load(str(tmp_path / "towers" / "query"))
    cand = tf.saved_model.load(str(tmp_path / "towers" / "candidate"))
    all_users = pd.read_parquet(tmp_path / "users.parquet")
    users = all_users.head(3)
    q = query.signatures["serving_default"](
        **{f["name"]: tf.constant(users[f["name"]].astype(str).to_numpy())
           for f in spec["query"]})["embedding"].numpy()
    c = cand.signatures["serving_default"](item_id=tf.constant(["i0", "i1"]))["embedding"]
    assert spec["embedding_dim"] == 8 and q.shape == (3, 8) and c.shape == (2, 8)
    # the reported HR@10 is what the saved towers score: full-catalog top 10,
    # the user's training clicks excluded (recomputed here in numpy)
    items = pd.read_parquet(tmp_path / "items.parquet")["item_id"].to_numpy()
    q_all = query.signatures["serving_default"](
        **{f["name"]: tf.constant(all_users[f["name"]].astype(str).to_numpy())
           for f in spec["query"]})["embedding"].numpy()
    c_all = cand.signatures["serving_default"](item_id=tf.constant(items))["embedding"].numpy()
    scores = q_all @ c_all.T
    user_row = pd.Series(range(len(all_users)), index=all_users["user_id"])
    item_col = pd.Series(range(len(items)), index=items)
    train_rows, test_rows = split_interactions(tables.interactions, "random", 42, 0.8)
    seen = train_rows[train_rows["clicked"] == 1]
    scores[user_row[seen["user_id"]], item_col[seen["item_id"]]] = -np.inf
    test = test_rows[test_rows["clicked"] == 1]
    u, i = user_row[test["user_id"]].to_numpy(), item_col[test["item_id"]].to_numpy()
    rank = (scores[u] > scores[u, i][:, None]).sum(axis=1)   # items scored above it
    assert run.metrics["model"]["test_pairs"] == len(test)
    assert run.metrics["model"]["hr@10"] == pytest.approx(np.mean(rank < 10),
                                                          abs=1.01 / len(test))
    norms = np.linalg.norm(q, axis=1)
    if kind == "matrix_factorization":
        assert spec["l2_normalized"] is False and not np.allclose(norms, 1.0)
    else:
        assert spec["l2_normalized"] is True
        np.testing.assert_allclose(norms, 1.0, rtol=1e-4)


def test_variant_overlays_validate_on_both_base_configs():
    from pathlib import Path

    from trainer.config import load_config

    root = Path(__file__).resolve().parent.parent / "configs"
    variants = sorted((root / "variants").glob("*.yaml"))
    assert len(variants) >= 12
    kinds = set()
    for v in variants:
        for base in ("ml100k.yaml", "synthetic.yaml"):
            kinds.add(load_config(root / base, [v]).objective.kind)
    assert kinds == {"in_batch_softmax", "matrix_factorization", "pointwise",
                     "pairwise_hinge", "pairwise_logistic", "listwise"}


def test_matrix_factorization_needs_plain_id_towers():
    with pytest.raises(ConfigError, match="set model.query_tower.l2_normalize and"):
        config(objective={"kind": "matrix_factorization"})


def test_ensemble_members_each_get_their_own_loss():
    from trainer.config import CategoricalFeature, TowerConfig
    from trainer.model import TwoTowerModel
    from trainer.objectives import InBatchSoftmax
    from trainer.towers import Tower

    specs = [CategoricalFeature(name="item_id", type="categorical", embedding_dim=4)]
    tower = Tower(specs, TowerConfig(output_dim=3, members=2))
    tower.adapt(pd.DataFrame({"item_id": ["a", "b", "c"]}), "items")
    out = tower({"item_id": tf.constant(["a", "b"])}).numpy()
    assert out.shape == (2, 6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out[:, :3], axis=1), 0.5 ** 0.5, rtol=1e-5)
    obj = InBatchSoftmax(0.5, logq_correction=False, remove_accidental_hits=False)
    model = TwoTowerModel(tower, tower, obj)
    batch = {"query": {"item_id": tf.constant(["a", "b", "c"])},
             "candidate": {"item_id": tf.constant(["b", "c", "a"])}}
    q = tower(batch["query"]).numpy() * 2 ** 0.5
    c = tower(batch["candidate"]).numpy() * 2 ** 0.5
    want = sum(float(obj(tf.constant(q[:, m * 3:(m + 1) * 3]),
                         tf.constant(c[:, m * 3:(m + 1) * 3]), {})) for m in range(2))
    np.testing.assert_allclose(float(model.compute_loss(batch)), want, rtol=1e-5)


def test_validation_clicks_stay_known_items_for_the_test(tables, tmp_path):
    """With a validation split, the test ranking still excludes every train-split
    click (GUIDE 4), and seen.parquet holds them all."""
    cfg = config(training={"epochs": 1, "batch_size": 128, "learning_rate": 0.01,
                           "validation_fraction": 0.2, "early_stopping_patience": 1})
    train(cfg, tmp_path, tables=tables, verbose=0)
    train_rows, _ = split_interactions(tables.interactions, "random")
    clicks = train_rows[train_rows["clicked"] == 1]
    assert len(pd.read_parquet(tmp_path / "seen.parquet")) == len(clicks)


def test_two_tower_model_rebuilt_from_config_and_checkpoint_gives_the_same_loss(tmp_path):
    from trainer.config import CategoricalFeature, TowerConfig
    from trainer.model import TwoTowerModel
    from trainer.objectives import Listwise
    from trainer.towers import Tower

    def tower(name):
        t = Tower([CategoricalFeature(name="item_id", type="categorical", embedding_dim=4)],
                  TowerConfig(output_dim=3), name=name)
        t.adapt(pd.DataFrame({"item_id": ["a", "b", "c"]}), "items")
        return t

    model = TwoTowerModel(tower("q"), tower("c"), Listwise(0.5), "per_query")
    batch = {"query": {"item_id": tf.constant(["a", "b"])},
             "candidate": {"item_id": tf.constant(["b", "c"])},
             "negatives": {"item_id": tf.constant(["c", "a", "zz", "b"])},
             "neg_valid": tf.constant([[True, True], [True, False]]),
             "neg_logq": tf.zeros([2, 2])}
    want = float(model.compute_loss(batch))
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    rebuilt = TwoTowerModel.from_config(json.loads(json.dumps(model.get_config())))
    tf.train.Checkpoint(model=rebuilt).read(path).assert_existing_objects_matched()
    assert rebuilt.batch == "per_query" and isinstance(rebuilt.objective, Listwise)
    assert float(rebuilt.compute_loss(batch)) == want
