"""Exported SavedModels: signatures, ids, exclusion, versions, metadata, refresh."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import scann  # noqa: F401
import tensorflow as tf

from export.exporter import ExportOptions, export_run
from export.metadata import read_metadata
from export.run_artifacts import feature_columns, load_run
from export.scann_tuning import ScannParams
from export.verify import ExportCheckError, SessionModel, run_with_session
from export.versioning import VersionError, existing_versions

K = 20
MODELS = ("query_tower", "candidate_tower", "retrieval", "retrieval_exact")


def signature_defs(path):
    with tf.compat.v1.Session(graph=tf.Graph()) as sess:
        return tf.compat.v1.saved_model.loader.load(sess, ["serve"], str(path)).signature_def


def copy_exported(exported, base, models):
    """``base`` holding the ``exported`` fixture's version 1 of ``models`` (a
    private copy: the fixture is shared read-only, and exporting it again costs)."""
    for name in models:
        shutil.copytree(exported[0] / name / "1", base / name / "1")
    return base


def user_inputs(run_dir, n=8):
    run = load_run(run_dir)
    users = pd.read_parquet(run_dir / "users.parquet").head(n)
    return feature_columns(users, run.spec["query"], "users")


def test_layout_and_signatures(exported, tiny_run):
    base, result = exported
    assert result.version == 1
    spec = json.loads((tiny_run.output_dir / "feature_spec.json").read_text())
    for name in MODELS:
        assert (base / name / "1" / "saved_model.pb").is_file()
        assert (base / name / "1" / "assets.extra" / "tf_serving_warmup_requests").is_file()
    user_feats = {f["name"]: f["dtype"] for f in spec["query"]}
    for name in ("retrieval", "retrieval_exact"):
        sigs = signature_defs(base / name / "1")
        assert {"serving_default", "retrieve_excluding"} <= set(sigs)
        default = sigs["serving_default"]
        assert set(default.inputs) == set(user_feats)
        for alias, info in default.inputs.items():
            assert tf.as_dtype(info.dtype).name == user_feats[alias]
            assert [d.size for d in info.tensor_shape.dim] == [-1]
        outs = default.outputs
        assert tf.as_dtype(outs["item_ids"].dtype) == tf.string
        assert tf.as_dtype(outs["scores"].dtype) == tf.float32
        for out in outs.values():
            assert [d.size for d in out.tensor_shape.dim] == [-1, K]
        seen = sigs["retrieve_excluding"].inputs["seen_item_ids"]
        assert [d.size for d in seen.tensor_shape.dim] == [-1, -1]
    emb = signature_defs(base / "candidate_tower" / "1")["serving_default"]
    assert set(emb.inputs) == {f["name"] for f in spec["candidate"]}
    assert [d.size for d in emb.outputs["embedding"].tensor_shape.dim] == [-1, 16]


def test_ids_come_from_catalog_and_scores_sorted(exported, tiny_run):
    base, _ = exported
    catalog = set(pd.read_parquet(tiny_run.output_dir / "items.parquet")["item_id"])
    for name in ("retrieval", "retrieval_exact"):
        out = run_with_session(base / name / "1", user_inputs(tiny_run.output_dir))
        ids = out["item_ids"].astype(str)
        assert set(ids.ravel()) <= catalog
        assert all(len(set(row)) == K for row in ids)
        assert (np.diff(out["scores"], axis=1) <= 1e-6).all()


def test_exclusion_removes_seen_and_backfills(exported, tiny_run):
    base, _ = exported
    inputs = user_inputs(tiny_run.output_dir, 3)
    path = base / "retrieval_exact" / "1"
    plain = run_with_session(path, inputs)["item_ids"].astype(str)
    seen = np.array([list(row[:5]) + [""] for row in plain], dtype=object)
    seen[1, 3:] = ""  # ragged rows padded with ""
    out = run_with_session(path, {**inputs, "seen_item_ids": seen},
                           "retrieve_excluding")["item_ids"].astype(str)
    for row, s, before in zip(out, seen.astype(str), plain):
        s = {x for x in s if x}
        assert not s & set(row)
        kept = [x for x in before if x not in s]
        assert list(row[: len(kept)]) == kept  # the rest of the ranking is unchanged


def _string_constants(saved_model_pb):
    """Every string value of every Const node in a SavedModel's graph and functions."""
    from tensorflow.core.protobuf import saved_model_pb2

    model = saved_model_pb2.SavedModel()
    model.ParseFromString(saved_model_pb.read_bytes())
    graph = model.meta_graphs[0].graph_def
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    return {v.decode(errors="replace") for n in nodes if n.op == "Const"
            for v in n.attr["value"].tensor.string_val}


def test_served_ids_are_stored_once_in_the_checkpoint_not_the_graph(exported, tiny_run):
    """The row -> id variable fills the id -> row table at load (no [N] string
    constant in saved_model.pb); every loader gets the same exclusion from it."""
    base, _ = exported
    catalog = set(pd.read_parquet(tiny_run.output_dir / "items.parquet")["item_id"])
    inputs = user_inputs(tiny_run.output_dir, 2)
    for name in ("retrieval", "retrieval_exact"):
        path = base / name / "1"
        assert not _string_constants(path / "saved_model.pb") & catalog, name
        plain = run_with_session(path, inputs)["item_ids"].astype(str)
        seen = np.array([[row[0], row[2]] for row in plain], dtype=object)
        session = run_with_session(path, {**inputs, "seen_item_ids": seen},
                                   "retrieve_excluding")["item_ids"].astype(str)
        fn = tf.saved_model.load(str(path)).signatures["retrieve_excluding"]  # TF2 loader
        eager = fn(**{k: tf.constant(v) for k, v in inputs.items()},
                   seen_item_ids=tf.constant(seen))["item_ids"].numpy().astype(str)
        np.testing.assert_array_equal(eager, session)
        for row, before in zip(session, plain):
            assert list(row[:K - 2]) == [before[1]] + list(before[3:K])


def test_both_signatures_search_one_scann_searcher(exported, tiny_run):
    """Every op that builds the ScaNN searcher from the saved state carries the same
    shared name, unique to the export: the session builds one searcher for
    serving_default and retrieve_excluding (TFRS's own layer built one per
    signature), which both answer from."""
    from tensorflow.core.protobuf import saved_model_pb2

    def names(version_dir):
        model = saved_model_pb2.SavedModel()
        model.ParseFromString((version_dir / "saved_model.pb").read_bytes())
        graph = model.meta_graphs[0].graph_def
        # (ScannState's own recreate_handle is saved too, but no signature calls it)
        nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def
                                    if "recreate_handle" not in f.signature.name]
        return [n.attr["shared_name"].s.decode() for n in nodes if "TensorsToScann" in n.op]

    base, _ = exported
    found = names(base / "retrieval" / "1")
    assert len(found) >= 2 and len(set(found)) == 1
    assert found[0].startswith("retrieval-scann-")
    assert not names(base / "retrieval_exact" / "1")
    inputs = user_inputs(tiny_run.output_dir, 3)
    with SessionModel(base / "retrieval" / "1") as model:   # one session, both signatures
        plain = model.run(inputs)["item_ids"].astype(str)
        excl = model.run({**inputs, "seen_item_ids": plain[:, :1]}, "retrieve_excluding")
    for row, before in zip(excl["item_ids"].astype(str), plain):
        assert list(row[:K - 1]) == list(before[1:K])


def test_too_many_seen_ids_is_an_error(exported, tiny_run):
    base, _ = exported
    inputs = user_inputs(tiny_run.output_dir, 1)
    seen = np.full((1, 257), "", dtype=object)
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_exclude"):
        run_with_session(base / "retrieval" / "1", {**inputs, "seen_item_ids": seen},
                         "retrieve_excluding")


def test_seen_ids_need_one_row_per_user(exported, tiny_run):
    """One row of seen ids for a batch of 3 users must not apply to all three."""
    base, _ = exported
    inputs = user_inputs(tiny_run.output_dir, 3)
    seen = np.array([["", ""]], dtype=object)
    for name in ("retrieval", "retrieval_exact"):
        with pytest.raises(tf.errors.InvalidArgumentError, match="one row per user"):
            run_with_session(base / name / "1", {**inputs, "seen_item_ids": seen},
                             "retrieve_excluding")


def test_publish_is_all_or_nothing_and_exports_are_locked(tmp_path):
    from export.versioning import StagedVersion, export_lock

    base = tmp_path / "models"
    with StagedVersion(base, ["a", "b"], 1) as stage:
        for name in ("a", "b"):
            (stage.dir(name) / "saved_model.pb").write_bytes(b"x")
        (base / "b" / "1").mkdir()   # another writer took b/1 meanwhile (empty)
        with pytest.raises(VersionError, match="appeared while this export was staged"):
            stage.publish()
    assert not (base / "a" / "1").exists()            # a was not published alone
    assert [p.name for p in (base / "a").iterdir()] == []   # staging removed
    with export_lock(base):
        with pytest.raises(VersionError, match="another export into .* is running"):
            with export_lock(base):
                pass
    leftover = base / "a" / ".staging-7-deadbeef"   # a killed export's staging dir
    leftover.mkdir()
    with export_lock(base):   # released: free again, and it clears the leftover
        assert not leftover.exists()


def test_metadata_contents(exported):
    base, _ = exported
    meta = read_metadata(base / "retrieval" / "1")
    assert meta["model_name"] == "retrieval" and meta["version"] == 1
    assert meta["catalog_size"] == 200 and meta["embedding_dim"] == 16
    assert meta["dataset"] == "synthetic"
    assert meta["index"]["type"] == "scann"
    assert {"num_leaves", "num_leaves_to_search", "num_reordering_candidates"} <= set(
        meta["index"]["params"])
    assert meta[f"recall@{K}_vs_exact"] >= 0.95
    assert meta["latency"]["p50_ms"] > 0
    assert "hr@10" in meta["training_metrics"]["model"]
    assert "exported_at" in meta and "name: tiny" in meta["config"]
    assert read_metadata(base / "retrieval_exact" / "1")["index"]["type"] == "brute_force"


def test_versions_increase_and_never_overwrite(tiny_run, exported, tmp_path):
    opts = ExportOptions(k=K, models=["query_tower", "retrieval_exact"], progress=False)
    base = copy_exported(exported, tmp_path / "models", opts.models)
    # a broken (partial) version 2 in one model: the next export skips past it
    broken = base / "retrieval_exact" / "2"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"garbage")
    second = export_run(tiny_run.output_dir, base, opts)
    assert second.version == 3
    assert (broken / "saved_model.pb").read_bytes() == b"garbage"
    with pytest.raises(VersionError, match="already exists"):
        export_run(tiny_run.output_dir, base,
                   ExportOptions(k=K, models=["query_tower"], version=3, progress=False))
    assert existing_versions(base / "query_tower") == [1, 3]
    assert not [p for p in (base / "query_tower").iterdir() if p.name.startswith(".")]


def test_failed_check_publishes_nothing(tiny_run, exported, tmp_path):
    base = copy_exported(exported, tmp_path / "models", ["retrieval"])
    before = sorted(p.name for p in (base / "retrieval").iterdir())
    params = ScannParams(**exported[1].metadata["retrieval"]["index"]["params"])
    with pytest.raises(ExportCheckError, match="recall"):   # unreachable: every build fails
        export_run(tiny_run.output_dir, base, ExportOptions(
            k=K, models=["retrieval", "retrieval_exact"], recall_target=1.01,
            scann_params=params, progress=False))
    assert sorted(p.name for p in (base / "retrieval").iterdir()) == before == ["1"]
    assert not (base / "retrieval_exact").exists() or not list(
        (base / "retrieval_exact").iterdir())


def test_failed_latency_probe_publishes_nothing_and_closes_every_session(
        tiny_run, exported, tmp_path, monkeypatch):
    """A probe failing on the first model must not leave the other models'
    sessions (held open from their checks for the probe) open."""
    import export.exporter as exporter

    opened = []

    class Tracked(SessionModel):
        def __init__(self, export_dir):
            super().__init__(export_dir)
            opened.append(self)

    def broken_probe(model, inputs, n):
        raise ExportCheckError(f"{model.export_dir}: probe failed")

    monkeypatch.setattr(exporter, "SessionModel", Tracked)
    monkeypatch.setattr(exporter, "_latency", broken_probe)
    base = copy_exported(exported, tmp_path / "models", ["retrieval", "retrieval_exact"])
    params = ScannParams(**exported[1].metadata["retrieval"]["index"]["params"])
    with pytest.raises(ExportCheckError, match="probe failed"):
        export_run(tiny_run.output_dir, base, ExportOptions(
            k=K, models=["retrieval", "retrieval_exact"], scann_params=params,
            progress=False))
    assert len(opened) == 2 and all(m.session._closed for m in opened)
    assert existing_versions(base / "retrieval") == [1]
    assert existing_versions(base / "retrieval_exact") == [1]


def test_catalog_refresh_makes_new_item_retrievable(tiny_run, exported, tmp_path):
    run_dir = tiny_run.output_dir
    items = pd.read_parquet(run_dir / "items.parquet")
    new = items.iloc[[0]].assign(item_id="brand-new-item", tags="drama|tag7")
    items_path = tmp_path / "items.parquet"
    pd.concat([items, new], ignore_index=True).to_parquet(items_path)
    # the fixture's tuned ScaNN setting: this test is about the new item, not tuning
    params = ScannParams(**exported[1].metadata["retrieval"]["index"]["params"])
    opts = dict(k=K, models=["candidate_tower", "retrieval", "retrieval_exact"],
                progress=False, scann_params=params)
    base = copy_exported(exported, tmp_path / "models", opts["models"])
    refreshed = export_run(run_dir, base, ExportOptions(**opts, items_path=str(items_path)))
    assert refreshed.version == 2
    assert read_metadata(base / "retrieval" / "2")["catalog_size"] == len(items) + 1
    # the new (cold, OOV-id) item is embedded from its features; find the user it
    # suits best and check that user now retrieves it
    run = load_run(run_dir)
    new_cols = feature_columns(new, run.spec["candidate"], "new item")
    e_new = run.candidate_tower.embed(new_cols)["embedding"].numpy()[0]
    users = pd.read_parquet(run_dir / "users.parquet")
    inputs = feature_columns(users, run.spec["query"], "users")
    q = run.query_tower.embed(inputs)["embedding"].numpy()
    best = int(np.argmax(q @ e_new))
    one = {k: v[best:best + 1] for k, v in inputs.items()}
    for name in ("retrieval", "retrieval_exact"):
        old = run_with_session(base / name / "1", one)["item_ids"].astype(str)
        now = run_with_session(base / name / "2", one)["item_ids"].astype(str)
        assert "brand-new-item" not in old[0]
        assert "brand-new-item" in now[0], name


def test_bad_run_dir_is_named(tmp_path):
    from export.run_artifacts import RunError

    with pytest.raises(RunError, match="towers/query/saved_model.pb: missing"):
        export_run(tmp_path, tmp_path / "models")


def test_scann_tuning_meets_recall_and_sweeps_both_ah_block_sizes():
    """The sweep covers 2- and 1-dim AH blocks and returns a setting whose recall
    on the sampled queries reaches the target (+ margin)."""
    from export.scann_tuning import tune

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, 16))
    items = centers[rng.integers(0, 40, 5000)] + 0.3 * rng.normal(size=(5000, 16))
    items = (items / np.linalg.norm(items, axis=1, keepdims=True)).astype(np.float32)
    queries = items[rng.integers(0, 5000, 200)] + 0.1 * rng.normal(size=(200, 16))
    result = tune(items, queries.astype(np.float32), k=10, recall_target=0.9)
    assert {t["dimensions_per_block"] for t in result.trials} == {1, 2}
    assert result.recall >= 0.91
    assert result.params.dimensions_per_block in (1, 2)
    chosen = [t for t in result.trials if t["recall"] >= 0.91]
    # the lowest search cost per query among the settings that reach the target
    assert result.batched_ms_per_query == min(t["batched_ms_per_query"] for t in chosen)


def test_csv_item_table_keeps_ids_and_strings_as_text(tmp_path):
    """A CSV catalog for refresh: "00042" stays "00042", an empty string feature
    is "" (not "nan" or a float), an empty number is NaN, a row without an id fails."""
    from export.run_artifacts import RunError, TrainedRun, read_items

    spec = {"candidate": [{"name": "item_id", "dtype": "string"},
                          {"name": "genre", "dtype": "string"},
                          {"name": "year", "dtype": "float32"}]}
    run = TrainedRun(path=tmp_path, query_tower=None, candidate_tower=None, spec=spec,
                     items=None, metrics={}, config_text="")
    path = tmp_path / "items.csv"
    path.write_text("item_id,genre,year\n00042,NA,1999\n00043,,\n")
    table = read_items(path, run)
    assert table["item_id"].tolist() == ["00042", "00043"]
    cols = feature_columns(table, spec["candidate"], "items.csv")
    assert cols["genre"].tolist() == ["NA", ""]
    assert cols["year"][0] == 1999 and np.isnan(cols["year"][1])
    path.write_text("item_id,genre,year\n00042,drama,1999\n,comedy,2001\n")
    with pytest.raises(RunError, match="row 1 has no item_id"):
        read_items(path, run)
