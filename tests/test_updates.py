"""Model updates: id admission / expiry, optimizer slots through growth,
full vs incremental (frozen weights bit-identical), lineage, bad windows."""
import json

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from update_world import DAY2, DAY3, copy_runs, shared_initial


@pytest.fixture(scope="module")
def initial_runs(tmp_path_factory):
    return shared_initial(tmp_path_factory)


@pytest.fixture
def runs(initial_runs, tmp_path):
    return copy_runs(initial_runs, tmp_path)


def _options(**kw):
    from updates.update import UpdateOptions
    return UpdateOptions(**kw)


def _checkpoint(run_dir):
    reader = tf.train.load_checkpoint(str(run_dir / "model" / "state"))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k.startswith("model/") and "VARIABLE_VALUE" in k}


def test_plan_admits_after_min_count_and_reuses_expired_rows():
    from updates.vocabulary import plan_vocabulary

    stats = pd.DataFrame({"clicks": [5, 1, 3, 2, 4], "last_seen": [900, 950, 990, 995, 100]},
                         index=pd.Index(["a", "b", "c", "d", "old"]))
    # terms a, old, b occupy rows 1..3 (one OOV bucket); now=1000, expiry 0.005 days = 432 s
    plan = plan_vocabulary(["a", "old", "b"], 1, stats, min_count=2, now=1000,
                           expire_days=0.005)
    assert plan.expired == ["old"]          # last click 900 s before now
    assert plan.admitted == ["c", "d"]      # b has 1 click < 2; c (3) before d (2)
    assert plan.terms == ["a", "c", "b", "d"]   # c reuses row 2 of 'old', d appended
    assert plan.fresh_rows == [2]
    plan = plan_vocabulary(["a"], 1, stats, min_count=4, now=1000)
    assert plan.terms == ["a", "old"] and plan.expired == []


def test_growth_keeps_rows_vectors_and_adam_slots(initial_runs):
    from trainer.batches import TrainingBatches
    from trainer.config import load_config
    from trainer.data import load_tables
    from trainer.prepare import prepare_data
    from updates.model_state import id_encoders, restore_model, set_vocabularies

    run = initial_runs / "initial"
    config = load_config(run / "config.yaml")
    prepared = prepare_data(config, load_tables(config.data))
    batch = next(iter(TrainingBatches(prepared, config).dataset(64, 0)))
    model = restore_model(run, batch)
    saved = _checkpoint(run)
    key = "model/query_tower/encoders/user_id/embedding/embeddings/.ATTRIBUTES/VARIABLE_VALUE"
    np.testing.assert_array_equal(model.query_tower.encoders["user_id"].embedding.embeddings
                                  .numpy(), saved[key])   # restored bit for bit
    encoder = dict((s, e) for s, e in id_encoders(model))["query"]
    opt = model.optimizer
    table = encoder.embedding.embeddings
    m_old = opt._momentums[opt._index_dict[opt._var_key(table)]].numpy()
    v_old = opt._velocities[opt._index_dict[opt._var_key(table)]].numpy()
    assert np.abs(m_old).sum() > 0         # trained: slots are not all zero
    old_terms, rows = encoder.vocabulary_terms(), table.shape[0]
    terms = list(old_terms)
    reused_row = 1 + 4                      # term 4 given to a new id
    terms[4] = "new-a"
    terms.append("new-b")
    iterations = int(opt.iterations.numpy())
    set_vocabularies(model, {encoder: (terms, [reused_row])})
    new_table = encoder.embedding.embeddings.numpy()
    opt = model.optimizer
    var = encoder.embedding.embeddings
    m_new = opt._momentums[opt._index_dict[opt._var_key(var)]].numpy()
    v_new = opt._velocities[opt._index_dict[opt._var_key(var)]].numpy()
    kept = [r for r in range(rows) if r != reused_row]
    assert new_table.shape[0] == rows + 1
    np.testing.assert_array_equal(new_table[kept], saved[key][kept])
    np.testing.assert_array_equal(m_new[kept], m_old[kept])
    np.testing.assert_array_equal(v_new[kept], v_old[kept])
    assert not m_new[[reused_row, rows]].any() and not v_new[[reused_row, rows]].any()
    assert not np.array_equal(new_table[reused_row], saved[key][reused_row])
    assert int(opt.iterations.numpy()) == iterations
    # the lookup: new ids on their rows, the replaced id now out of vocabulary (row 0)
    ids = encoder.lookup(tf.constant(["new-a", "new-b", old_terms[4], old_terms[0]])).numpy()
    assert ids.tolist() == [reused_row, rows, 0, 1]


def test_incremental_update_trains_only_the_id_tables(runs, tmp_path):
    from updates.update import train_candidate

    cand = train_candidate("incremental", runs, tmp_path / "models",
                           _options(until=DAY2 + 43200, min_count=1))
    before, after = _checkpoint(runs / "initial"), _checkpoint(cand.staging)
    ids = [k for k in after if "/encoders/user_id/" in k or "/encoders/item_id/" in k]
    assert len(ids) == 2 and set(before) == set(after)
    for k in after:
        if k in ids:
            old = before[k]
            assert after[k].shape[0] > old.shape[0]          # new ids admitted
            assert not np.array_equal(after[k][:old.shape[0]], old)   # trained
        else:
            np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    # lazy sparse updates: an id row moves only when its id was in a training batch
    # (Adam's momentum would move every row the initial run trained)
    config = json.loads((cand.staging / "model" / "config.json").read_text())
    clicked = pd.read_parquet(cand.staging / "seen.parquet")
    for side, feature in (("query_tower", "user_id"), ("candidate_tower", "item_id")):
        encoder = config[side]["encoders"][feature]["config"]
        row = {t: i + encoder["num_oov_buckets"] for i, t in enumerate(encoder["terms"])}
        key = next(k for k in ids if f"/encoders/{feature}/" in k)
        old = before[key]
        moved = np.flatnonzero((after[key][:len(old)] != old).any(axis=1))
        assert set(moved) == {row[t] for t in clicked[feature].astype(str)
                              if row[t] < len(old)}, feature
    update = json.loads((cand.staging / "update.json").read_text())
    assert update["kind"] == "incremental"
    assert update["parent"] == str((runs / "initial").resolve())
    trained_until = int(pd.read_parquet(runs / "initial" / "seen.parquet")["timestamp"].max()) + 1
    assert update["window"] == {"since": trained_until, "until": DAY2 + 43200,
                                "text": update["window"]["text"]}
    assert update["vocabulary"]["user_id"]["admitted"] > 0
    # the model state it saved restores to what it trained, config trainable again,
    # with the configured optimizer (LazyAdam only for the update's own training)
    assert json.loads((cand.staging / "model" / "optimizer.json").read_text())[
        "class_name"] == "Adam"
    assert all(e["config"]["trainable"] for e in
               config["query_tower"]["encoders"].values())


def test_small_window_trains_eagerly_to_the_traced_weights(runs, tmp_path, monkeypatch):
    import updates.update as update

    modes, fit = [], update.fit

    def recording_fit(model, *args, **kwargs):
        modes.append(model.run_eagerly)
        return fit(model, *args, **kwargs)

    monkeypatch.setattr(update, "fit", recording_fit)
    trained = {}
    for name, eager_max_steps in (("traced", 0), ("eager", 10_000)):
        copy = tmp_path / name
        copy.mkdir()
        runs_copy = copy_runs(runs, copy)
        cand = update.train_candidate("incremental", runs_copy, copy / "models",
                                      _options(until=DAY2 + 43200,
                                               eager_max_steps=eager_max_steps))
        trained[name] = _checkpoint(cand.staging)
    assert modes == [False, True]
    assert set(trained["traced"]) == set(trained["eager"])
    for k, value in trained["traced"].items():
        np.testing.assert_allclose(trained["eager"][k], value, rtol=1e-5, atol=1e-6,
                                   err_msg=k)


def test_full_update_trains_every_weight(runs, tmp_path):
    from updates.update import train_candidate

    over = tmp_path / "over.yaml"     # an objective option --config changes is trained with
    over.write_text("objective: {temperature: 0.3, logq_weight: 1.25}\n")
    cand = train_candidate("full", runs, tmp_path / "models",
                           _options(until=DAY3, config=str(over)))
    objective = json.loads((cand.staging / "model" / "config.json").read_text())["objective"]
    assert (objective["config"]["temperature"], objective["config"]["logq_weight"]) == \
        (0.3, 1.25)
    before, after = _checkpoint(runs / "initial"), _checkpoint(cand.staging)
    proj = "model/query_tower/projection/kernel/.ATTRIBUTES/VARIABLE_VALUE"
    assert not np.array_equal(before[proj], after[proj])
    update = json.loads((cand.staging / "update.json").read_text())
    assert (update["kind"], update["window"]["since"], update["window"]["until"]) == \
        ("full", DAY3 - 86400, DAY3)
    assert cand.gate.served is None and cand.gate.passed   # nothing served yet


def test_a_run_written_before_logq_weight_keeps_weight_1(tmp_path):
    """A parent config.yaml without objective.logq_weight trained with 1 (the
    unset weight means 1.25 since): its updates keep 1 unless --config sets it."""
    import yaml

    from trainer.config import dump_config, parse_config
    from update_world import DRIFT
    from updates.update import UpdateError, _config

    raw = yaml.safe_load(dump_config(parse_config({**DRIFT, "objective": {}})))
    assert raw["objective"].pop("logq_weight") == 1.25
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    assert _config(tmp_path, _options()).objective.logq_weight == 1.0
    over = tmp_path / "over.yaml"
    over.write_text("objective: {logq_weight: 1.25}\n")
    assert _config(tmp_path, _options(config=str(over))).objective.logq_weight == 1.25
    over.write_text("objective: {kind: pointwise}\n")    # other batches: refused
    with pytest.raises(UpdateError, match="objective.kind=pointwise trains on other batches"):
        _config(tmp_path, _options(config=str(over)))


def test_window_without_new_data_names_it(runs, tmp_path):
    from updates.update import UpdateError, run_update

    with pytest.raises(UpdateError, match=r"data window \[2023-11-16T00:00:00Z \(1700092800\), "
                                          r"2023-11-17T00:00:00Z \(1700179200\)\) holds no "
                                          r"data newer than the parent run"):
        run_update("full", runs, tmp_path / "models", _options(until=DAY2))
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_empty_window_names_it(runs, tmp_path):
    from updates.update import UpdateError, run_update

    far = DAY3 + 30 * 86400
    with pytest.raises(UpdateError, match=r"data window \[2023-12-17T00:00:00Z .* holds no "
                                          r"interactions"):
        run_update("full", runs, tmp_path / "models", _options(until=far))


def test_unreadable_input_names_the_file(runs, tmp_path):
    from updates.update import UpdateError, run_update

    bad = tmp_path / "events.csv"
    bad.write_text("user_id,item_id,timestamp,clicked\nu1,i1,notatime,1\n")
    override = tmp_path / "tables.yaml"
    override.write_text(f"data: {{kind: tables, interactions: {{path: {bad}}}}}\n")
    with pytest.raises(UpdateError, match=r"events.csv"):
        run_update("full", runs, tmp_path / "models", _options(config=override))


def test_no_run_to_update(tmp_path):
    from updates.lineage import LineageError, latest_run

    (tmp_path / "runs").mkdir()
    with pytest.raises(LineageError, match=r"holds no finished run with model state"):
        latest_run(tmp_path / "runs")


def test_scheduled_commands_parse_with_the_update_cli():
    import shlex
    from pathlib import Path

    import yaml

    from updates.cli import parse_args

    deploy = Path(__file__).resolve().parent.parent / "deploy"
    jobs = [d for d in yaml.safe_load_all((deploy / "k8s" / "updates-cronjob.yaml").read_text())
            if d["kind"] == "CronJob"]
    kinds = []
    for job in jobs:
        container = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["twotower-update"]
        args = parse_args(container["args"])
        kinds.append(args.kind)
        assert (args.runs, args.models, args.keep) == (Path("/runs"), Path("/models"), 3)
        assert job["spec"]["concurrencyPolicy"] == "Forbid"
    assert kinds == ["full", "incremental"]
    lines = [line for line in (deploy / "updates.crontab").read_text().splitlines()
             if line and not line.startswith("#") and "=" not in line.split()[0]]
    for line in lines:
        words = shlex.split(line.replace("$RUNS", "/r").replace("$MODELS", "/m"))
        words = words[:words.index(">>")]
        assert parse_args(words[words.index("twotower-update") + 1:]).runs == Path("/r")
    assert len(lines) == 2


def test_pruning_keeps_what_a_server_may_serve(tmp_path):
    from pathlib import Path

    from updates.publish import prune, serving_num_versions

    deploy = Path(__file__).resolve().parent.parent / "deploy"
    assert serving_num_versions(deploy / "models.config") == 1
    config = tmp_path / "two.config"
    config.write_text('model_config_list { config { name: "retrieval" base_path: "/m" '
                      'model_version_policy { latest { num_versions: 2 } } } }')
    assert serving_num_versions(config) == 2
    for m in ("query_tower", "candidate_tower", "retrieval", "retrieval_exact"):
        for v in (1, 2, 3, 4):
            (tmp_path / "base" / m / str(v) / "variables").mkdir(parents=True)
            (tmp_path / "base" / m / str(v) / "saved_model.pb").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"--keep 2: a server serving the latest 2 "
                                         r"version\(s\) needs at least 3 on disk"):
        prune(tmp_path / "base", 2, serving_num_versions=2)
    removed = prune(tmp_path / "base", 3, serving_num_versions=2)
    assert sorted(p.name for p in removed) == ["1"] * 4
    assert sorted(p.name for p in (tmp_path / "base" / "retrieval").iterdir()) == ["2", "3", "4"]
