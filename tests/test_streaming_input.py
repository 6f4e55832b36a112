"""Sharded Parquet tables and the streamed training input (issue 16 item 3).

Tiny data: the synthetic world of tests/tiny_run_config.py written as shards;
every check is exact (the streamed pass against the in-memory path on the
same files).
"""
import copy
import hashlib
import json

import numpy as np
import pandas as pd
import pytest

from tiny_run_config import TINY

STREAM = copy.deepcopy(TINY)
STREAM["name"] = "tiny-stream"
STREAM["training"] = {"epochs": 2, "batch_size": 256, "learning_rate": 0.01}
STREAM["evaluation"] = {"protocol": "temporal", "test_days": 2, "ks": [10, 50],
                        "ease": False}


def _config(path, **data):
    from trainer.config import parse_config

    raw = copy.deepcopy(STREAM)
    raw["data"] = {"kind": "shards", "path": str(path), "shuffle_buffer": 2000, **data}
    return parse_config(raw)


@pytest.fixture(scope="module")
def tiny_tables():
    from trainer.config import parse_config
    from trainer.data import load_tables

    return load_tables(parse_config(TINY).data)


@pytest.fixture(scope="module")
def shard_dir(tiny_tables, tmp_path_factory):
    """The tiny tables as shards of 2,500 rows (interactions: 5 files)."""
    from trainer.data.shard_files import write_tables

    out = tmp_path_factory.mktemp("shards")
    write_tables(tiny_tables, out, rows_per_shard=2500)
    return out


def test_shard_round_trip_keeps_rows_dtypes_and_manifest(tiny_tables, shard_dir):
    from trainer.data.shard_files import MANIFEST, load_shards

    manifest = json.loads((shard_dir / MANIFEST).read_text())
    entry = manifest["tables"]["interactions"]
    n = len(tiny_tables.interactions)   # 400 users x 30 exposures
    assert n == 12_000 and entry["rows"] == n
    assert [s["rows"] for s in entry["shards"]] == [2500, 2500, 2500, 2500, 2000]
    assert entry["schema"] == {"user_id": "large_string", "item_id": "large_string",
                               "timestamp": "int64", "clicked": "int8", "weight": "float"}
    for shard in entry["shards"]:
        data = (shard_dir / shard["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert shard["bytes"] == len(data)
    ts = tiny_tables.interactions["timestamp"]
    assert min(s["min_timestamp"] for s in entry["shards"]) == ts.min()
    assert max(s["max_timestamp"] for s in entry["shards"]) == ts.max()
    back = load_shards(shard_dir)
    for name in ("interactions", "users", "items", "ranking_log"):
        pd.testing.assert_frame_equal(getattr(back, name), getattr(tiny_tables, name),
                                      check_dtype=True)
    assert back.name == "synthetic"


def test_writer_appends_chunks_across_file_boundaries(tiny_tables, tmp_path):
    from trainer.data.shard_files import ShardSet, ShardWriter, write_manifest

    writer = ShardWriter(tmp_path, "interactions", rows_per_shard=5000)
    rows = tiny_tables.interactions
    for start in range(0, len(rows), 3001):   # chunks that straddle the files
        writer.append(rows.iloc[start:start + 3001])
    entry = writer.close()
    assert [s["rows"] for s in entry["shards"]] == [5000, 5000, 2000]
    tables = {"interactions": entry}
    for name, frame in (("users", tiny_tables.users), ("items", tiny_tables.items)):
        w = ShardWriter(tmp_path, name, 10_000)
        w.append(frame)
        tables[name] = w.close()
    write_manifest(tmp_path, "chunked", tables, {})
    pd.testing.assert_frame_equal(ShardSet.open(tmp_path).read("interactions"),
                                  rows.reset_index(drop=True))


def test_generate_command_writes_the_large_world_chunk_by_chunk(tmp_path, capsys):
    from trainer.data.shard_files import ShardSet
    from trainer.shards import main

    out = tmp_path / "gen"
    assert main(["generate", "--out", str(out), "--users", "30", "--items", "50",
                 "--clicks-per-user", "5", "--exposures-per-user", "2",
                 "--chunk-users", "7", "--rows-per-shard", "64"]) == 0
    assert "interactions: 210 rows in 4 shards" in capsys.readouterr().out
    shards = ShardSet.open(out)
    rows = shards.read("interactions")
    assert len(rows) == 210 and int(rows["clicked"].sum()) == 150
    per_user = rows.groupby("user_id")["item_id"].nunique()
    assert len(per_user) == 30 and (per_user == 7).all()   # drawn without replacement
    assert shards.read("users")["user_id"].tolist() == [f"u{u}" for u in range(30)]
    assert len(shards.read("items")) == 50
    assert main(["check", str(out)]) == 0
    assert main(["generate", "--out", str(out), "--users", "3"]) == 2   # never overwrites
    assert "exists and is not empty" in capsys.readouterr().err
    users = pd.read_parquet(out / "users-00000.parquet")
    users.loc[0, "country"] = "zz"   # same rows and columns, other content
    users.to_parquet(out / "users-00000.parquet", index=False)
    assert main(["check", str(out)]) == 2
    assert "users-00000.parquet: sha256 differs from the manifest's" in capsys.readouterr().err


def test_write_command_converts_a_config(tmp_path, capsys):
    import yaml

    from trainer.shards import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    assert main(["write", "--config", str(config), "--out", str(tmp_path / "s"),
                 "--rows-per-shard", "5000"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "interactions: 12,000 rows in 3 shards", "users: 400 rows in 1 shard",
        "items: 200 rows in 1 shard", "ranking_log: 4,000 rows in 1 shard"]


@pytest.mark.slow
def test_streamed_pass_equals_the_in_memory_path(shard_dir):
    """Vocabularies, statistics, logQ counts and the test set: exactly equal."""
    from trainer.data import load_tables
    from trainer.evaluation import evaluate, popularity_scores
    from trainer.prepare import prepare_data
    from trainer.streaming import prepare_streamed
    from trainer.train import build_model

    cfg_stream, cfg_mem = _config(shard_dir), _config(shard_dir, stream=False)
    streamed = prepare_streamed(cfg_stream)
    memory = prepare_data(cfg_mem, load_tables(cfg_mem.data))
    np.testing.assert_array_equal(streamed.item_counts, memory.item_counts)
    assert streamed.num_train_positives == memory.num_train_positives == 4185
    pd.testing.assert_frame_equal(streamed.trained_users(), memory.trained_users())
    pd.testing.assert_frame_equal(streamed.trained_items(), memory.trained_items())
    encoders = []
    for cfg, prepared in ((cfg_stream, streamed), (cfg_mem, memory)):
        model = build_model(cfg, prepared)
        encoders.append({n: e.get_config() for tower in (model.query_tower,
                                                         model.candidate_tower)
                         for n, e in tower.encoders.items()})
    assert encoders[0] == encoders[1]
    assert len(encoders[0]["user_id"]["terms"]) == 400
    assert encoders[0]["age"]["statistics"]["boundaries"]   # adapted, and equal
    a, b = streamed.test_set(), memory.test_set()
    pairs = lambda s: sorted(zip(s.test_users.tolist(), s.test_items.tolist()))
    assert pairs(a) == pairs(b) and len(a.test_users) == 1841
    np.testing.assert_array_equal(a.item_popularity, b.item_popularity)
    assert evaluate(popularity_scores(a), a, (10, 50)) == \
        evaluate(popularity_scores(b), b, (10, 50))


def test_streamed_batches_hold_the_in_memory_features(shard_dir):
    from trainer.batches import TrainingBatches
    from trainer.data import load_tables
    from trainer.prepare import prepare_data
    from trainer.streaming import StreamingBatches, prepare_streamed

    cfg = _config(shard_dir)
    streaming = StreamingBatches(prepare_streamed(cfg), cfg)
    batch = next(iter(streaming.dataset(64, seed=3)))
    cfg_mem = _config(shard_dir, stream=False)
    memory = TrainingBatches(prepare_data(cfg_mem, load_tables(cfg_mem.data)), cfg_mem)
    memory._hold_tables(3)
    same = memory._batch(batch["user_row"], batch["item_row"], np.int64(0))
    assert set(batch) == set(same) == {"query", "candidate", "item_prob", "item_row",
                                       "user_row", "score_mask"}
    mask = batch["score_mask"].numpy()
    np.testing.assert_array_equal(mask, same["score_mask"].numpy())
    assert mask.shape == (64, 64) and not mask.all()   # some exposures are masked
    for side in ("query", "candidate"):
        assert set(batch[side]) == set(same[side])
        for name in batch[side]:
            np.testing.assert_array_equal(batch[side][name].numpy(), same[side][name].numpy())
    np.testing.assert_array_equal(batch["item_prob"].numpy(), same["item_prob"].numpy())


def test_streamed_exposures_mask_the_users_own_in_batch_negatives(shard_dir):
    """The counting pass collects the in-memory path's exposures exactly; a
    user's exposed-not-clicked item is masked for that user's query only, and
    a positive is never masked."""
    from trainer.data import DataError, load_tables
    from trainer.prepare import prepare_data
    from trainer.sampling import ExclusionSet
    from trainer.streaming import StreamingBatches, _check_keys_fit, prepare_streamed

    cfg, cfg_mem = _config(shard_dir), _config(shard_dir, stream=False)
    streamed = prepare_streamed(cfg)
    memory = prepare_data(cfg_mem, load_tables(cfg_mem.data))
    num_users, num_items = len(memory.encoded.user_index), len(memory.item_counts)
    eu, ei = memory.encoded.rows(memory.splits.exposed)
    exposed = set((eu * num_items + ei).tolist())
    train_rows = int((memory.tables.interactions["timestamp"] <= streamed.boundary).sum())
    assert train_rows == 8354   # 4,185 clicks and 4,169 distinct exposures
    assert len(exposed) == len(memory.splits.exposed) == 8354 - 4185
    every_pair = np.arange(num_users)[:, None], np.arange(num_items)[None, :]
    held = streamed.exposures.contains(*every_pair).numpy()
    assert set(np.flatnonzero(held.ravel()).tolist()) == exposed
    # beyond the dense table's size: the same set as sorted keys
    sparse = ExclusionSet.from_keys(np.array(sorted(exposed)), num_items, dense_limit=0)
    np.testing.assert_array_equal(sparse.contains(*every_pair).numpy(), held)
    a, e = int(eu[0]), int(ei[0])               # user a was shown item e, no click
    cu, ci = memory.train_rows()
    x = int(ci[cu == a][0])                     # a's clicked item
    b, y = next((int(u), int(i)) for u, i in zip(cu, ci)
                if u != a and _apart(u, i, a, x, e, num_items, exposed))
    batches = StreamingBatches(streamed, cfg)
    users, items = np.array([a, b, a]), np.array([x, y, e])
    mask = batches.score_mask(users, items).numpy()
    np.testing.assert_array_equal(mask, [[True, True, False],    # e: a's exposure
                                         [True, True, True],     # not b's
                                         [True, True, True]])    # a's positive e
    with pytest.raises(DataError, match="shards: 4,294,967,296 users x 2,147,483,648 "
                                        "items do not fit the int64"):
        _check_keys_fit(2 ** 32, 2 ** 31, "shards")


def _apart(u, i, a, x, e, num_items, exposed):
    """User u with positive i has no exposure pair with user a's items x, e
    (and a none with i)."""
    return not {a * num_items + i, u * num_items + x, u * num_items + e} & exposed


def test_each_file_goes_to_exactly_one_worker(shard_dir):
    from trainer.streaming import StreamingBatches, assign_files, prepare_streamed

    files = [f"f{k}" for k in range(7)]
    shares = [assign_files(files, 3, k) for k in range(3)]
    assert shares == [["f0", "f3", "f6"], ["f1", "f4"], ["f2", "f5"]]
    with pytest.raises(ValueError, match="7 interaction shard files for 8 input pipelines"):
        assign_files(files, 8, 0)
    cfg = _config(shard_dir)
    prepared = prepare_streamed(cfg)
    batches = StreamingBatches(prepared, cfg)
    seen = []
    for k in range(2):   # the rows two workers stream partition the training clicks
        rows = [(int(u), int(i)) for b in batches.dataset(100, 1, shard=(2, k))
                for u, i in zip(b["user_row"].numpy(), b["item_row"].numpy())]
        seen.append(rows)
    assert len(seen[0]) + len(seen[1]) == prepared.num_train_positives
    both = np.bincount([i for rows in seen for _, i in rows],
                       minlength=len(prepared.item_counts))
    np.testing.assert_array_equal(both, prepared.item_counts)
    # worker 0 holds files 0, 2, 4 and worker 1 files 1, 3: no row in both
    assert len(seen[0]) == sum(len(f) for f in _train_clicks(prepared, [0, 2, 4]))


def _train_clicks(prepared, shards):
    from trainer.streaming import train_clicks

    files = prepared.shards.files("interactions")
    return [frame for k in shards for _, frame in train_clicks(files[k], prepared.boundary)]


@pytest.mark.slow
def test_streamed_training_exports_through_the_normal_path(shard_dir, tmp_path):
    from export.exporter import ExportOptions, export_run
    from trainer.train import train

    run = train(_config(shard_dir), tmp_path / "run", verbose=0)
    assert run.metrics["train_positives"] == 4185
    assert run.metrics["model"]["test_pairs"] == 1841
    assert len(run.history["loss"]) == 2
    seen = pd.read_parquet(run.output_dir / "seen.parquet")
    assert len(seen) == 4185 and list(seen.columns) == ["user_id", "item_id", "timestamp"]
    result = export_run(run.output_dir, tmp_path / "models",
                        ExportOptions(k=10, progress=False, models=(
                                            "query_tower", "candidate_tower",
                                            "retrieval_exact")))
    assert result.version == 1
    assert set(result.paths) == {"query_tower", "candidate_tower", "retrieval_exact"}


def test_bad_shard_files_are_named(shard_dir, tmp_path):
    import shutil

    from trainer.data import DataError
    from trainer.streaming import prepare_streamed

    bad = tmp_path / "bad"
    shutil.copytree(shard_dir, bad)
    target = bad / "interactions-00002.parquet"
    target.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"interactions-00002\.parquet: not a readable "
                                        "Parquet shard"):
        prepare_streamed(_config(bad))
    target.unlink()
    with pytest.raises(DataError, match=r"interactions-00002\.parquet: shard file missing"):
        prepare_streamed(_config(bad))
    # a training click that names a user the users table does not have
    shutil.copy(shard_dir / "interactions-00002.parquet", target)
    frame = pd.read_parquet(target)
    row = int(np.flatnonzero(frame["clicked"].to_numpy() == 1)[3])
    frame.loc[row, "user_id"] = "ghost"
    frame.to_parquet(target, index=False)
    with pytest.raises(DataError, match=rf"interactions-00002\.parquet: row {row}: user_id "
                                        "'ghost' is not in the users table"):
        prepare_streamed(_config(bad))


def test_streaming_refuses_what_needs_the_whole_table(shard_dir):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="objective.kind=listwise: not supported with "
                                          "streamed input"):
        _config_with(shard_dir, objective={"kind": "listwise"})
    with pytest.raises(ConfigError, match="evaluation.protocol=random: not supported"):
        _config_with(shard_dir, evaluation={"protocol": "random", "ease": False})
    with pytest.raises(ConfigError, match="evaluation.ease: not supported .* set "
                                          "evaluation.ease: false"):
        _config_with(shard_dir, evaluation={"protocol": "temporal"})
    _config_with(shard_dir, objective={"kind": "listwise"}, stream=False)   # in memory: fine


def _config_with(path, stream=True, **sections):
    from trainer.config import parse_config

    raw = {**copy.deepcopy(STREAM), **sections,
           "data": {"kind": "shards", "path": str(path), "stream": stream}}
    return parse_config(raw)


def test_parquet_tables_convert_block_by_block_like_in_memory(tiny_tables, tmp_path):
    """kind: tables with Parquet interactions: converted 1,000 rows at a time,
    the shards hold what writing load_tables' tables gives (items table
    missing some ids: they get rows, as load_tables adds them)."""
    from trainer.config import GenericData
    from trainer.data import DataError, load_tables
    from trainer.data.convert import convert_chunked, streamable
    from trainer.data.shard_files import load_shards, write_tables

    events = tiny_tables.interactions.rename(columns={"user_id": "uid", "item_id": "sku"})
    events.to_parquet(tmp_path / "events.parquet", index=False)
    tiny_tables.items.iloc[:150].to_parquet(tmp_path / "items.parquet", index=False)
    data = GenericData.model_validate({
        "kind": "tables",
        "interactions": {"path": str(tmp_path / "events.parquet"),
                         "columns": {"user_id": "uid", "item_id": "sku"}},
        "items": {"path": str(tmp_path / "items.parquet")}})
    assert streamable(data)
    convert_chunked(data, tmp_path / "chunked", rows_per_shard=4000, chunk_rows=1000)
    write_tables(load_tables(data), tmp_path / "memory", rows_per_shard=4000)
    chunked, memory = load_shards(tmp_path / "chunked"), load_shards(tmp_path / "memory")
    for name in ("interactions", "users", "items"):
        pd.testing.assert_frame_equal(getattr(chunked, name), getattr(memory, name))
    assert len(chunked.items) == 200 and chunked.name == memory.name == "events"
    events["timestamp"] = events["timestamp"].astype(str)   # a text column, one bad value
    events.loc[2345, "timestamp"] = "soon"
    events.to_parquet(tmp_path / "events.parquet", index=False)
    with pytest.raises(DataError, match=r"events\.parquet: row 2345 column 'timestamp': "
                                        "expected a number, got 'soon'"):
        convert_chunked(data, tmp_path / "bad", rows_per_shard=4000, chunk_rows=1000)


@pytest.mark.slow
def test_two_workers_stream_their_own_files(shard_dir, tmp_path):
    """--strategy multi_worker on loopback: each worker's input pipeline reads
    its own files (0, 2, 4 and 1, 3), and the chief commits the run."""
    import yaml
    from local_cluster import cluster, run_cluster

    raw = copy.deepcopy(STREAM)
    raw["data"] = {"kind": "shards", "path": str(shard_dir), "shuffle_buffer": 2000}
    raw["training"]["epochs"] = 1
    config = tmp_path / "stream.yaml"
    config.write_text(yaml.safe_dump(raw))
    args = ["-m", "trainer", "--config", str(config), "--output", str(tmp_path / "run"),
            "--quiet", "--strategy", "multi_worker"]
    run_cluster(cluster(worker=2), lambda kind, index: args, [("worker", 0), ("worker", 1)],
                tmp_path)
    for k, files in ((0, "interactions-00000.parquet, interactions-00002.parquet, "
                         "interactions-00004.parquet"),
                     (1, "interactions-00001.parquet, interactions-00003.parquet")):
        log = (tmp_path / f"worker{k}.log").read_text()
        assert f"input pipeline {k} of 2 streams {3 - k} shard files: {files}" in log
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_positives"] == 4185 and metrics["epochs_run"] == 1
