"""Multi-worker training on loopback (trainer.distributed, trainer.global_batch).

Two workers (subprocesses with TF_CONFIG) train the tiny config with
MultiWorkerMirroredStrategy; on a fixed global batch their summed loss and
gradient equal one worker's on the whole batch, the chief alone writes the
run, and its towers export through the normal export path.
"""
import json

import pytest
import yaml

from local_cluster import cluster, run_cluster
from tiny_run_config import TINY


def test_strategy_from_tf_config():
    from trainer.distributed import resolve_kind

    workers = {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}
    with_ps = {"cluster": {"chief": ["a:1"], "worker": ["b:2"], "ps": ["c:3"]},
               "task": {"type": "chief", "index": 0}}
    assert resolve_kind("auto", {}) == "default"
    assert resolve_kind("auto", workers) == "multi_worker"
    assert resolve_kind("auto", with_ps) == "parameter_server"
    assert resolve_kind("default", workers) == "default"
    with pytest.raises(ValueError, match="--strategy multi_worker needs TF_CONFIG"):
        resolve_kind("multi_worker", {})


def test_bad_tf_config_is_named(monkeypatch):
    from trainer.distributed import cluster_spec

    monkeypatch.setenv("TF_CONFIG", '{"cluster": {}}')
    with pytest.raises(ValueError, match="TF_CONFIG: needs 'cluster'"):
        cluster_spec()
    monkeypatch.setenv("TF_CONFIG", "{oops")
    with pytest.raises(ValueError, match="TF_CONFIG: not JSON"):
        cluster_spec()


def test_streaming_logq_is_refused_under_a_strategy():
    from trainer.config import parse_config
    from trainer.objective_registry import check_distributed

    config = parse_config({**TINY, "objective": {"logq": "streaming"}})
    with pytest.raises(ValueError, match=r"objective.logq=streaming: not supported with "
                                         r"--strategy multi_worker: the streaming"):
        check_distributed(config, "multi_worker")
    check_distributed(parse_config(TINY), "multi_worker")   # the default objective trains


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """The tiny config trained by 2 workers (1 epoch) after the equivalence check."""
    d = tmp_path_factory.mktemp("multi_worker")
    (d / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "training": {**TINY["training"],
                                                                      "epochs": 1}}))
    spec = cluster(worker=2)
    args = ["-m", "trainer.equivalence", "--config", str(d / "tiny.yaml"),
            "--output", str(d / "run"), "--json", str(d / "check.json")]
    run_cluster(spec, lambda kind, index: args, [("worker", 0), ("worker", 1)], d)
    return d


@pytest.mark.slow
def test_two_workers_compute_the_single_worker_loss_and_gradient(two_workers):
    check = json.loads((two_workers / "check.json").read_text())
    assert check["replicas"] == 2 and check["global_batch"] == TINY["training"]["batch_size"]
    # loss: a sum over the 256 queries of the global batch (about 1.4e3)
    assert check["distributed_loss"] == pytest.approx(check["single_loss"], rel=1e-5)
    assert check["per_query_diff"] <= 1e-5
    assert check["grad_rel_diff"] <= 1e-5


@pytest.mark.slow
def test_only_the_chief_writes_the_run_and_it_exports(two_workers, tmp_path):
    from export.exporter import ExportOptions, export_run

    run = two_workers / "run"
    assert sorted(p.name for p in two_workers.iterdir() if p.name.startswith("run")) == ["run"]
    assert "worker 1: done (the chief writes" in (two_workers / "worker1.log").read_text()
    history = json.loads((run / "history.json").read_text())
    assert len(history["loss"]) == 1
    result = export_run(run, tmp_path / "models", ExportOptions(k=20, progress=False))
    assert (tmp_path / "models").is_dir() and result is not None


@pytest.mark.slow
def test_parameter_servers_shard_the_id_tables_and_export_whole(tmp_path):
    """A coordinator, 2 workers and 2 parameter servers on loopback: the id
    embedding tables are split over the ps tasks, the run's towers hold them
    whole, and the exported towers load in the C++ loader TF Serving uses."""
    import tensorflow as tf

    from export.exporter import ExportOptions, export_run
    from export.native_loader import check_saved_model, compiler_available

    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "training": {
        **TINY["training"], "epochs": 1}}))
    args = ["-m", "trainer", "--config", str(tmp_path / "tiny.yaml"), "--output",
            str(tmp_path / "run"), "--quiet", "--strategy", "parameter_server",
            "--min-shard-bytes", "4096"]
    run_cluster(cluster(chief=1, worker=2, ps=2), lambda kind, index: args,
                [("chief", 0)], tmp_path)
    log = (tmp_path / "chief0.log").read_text()
    # 400 users + 1 OOV row, 200 items + 1, 16 dims: 25.7 KB and 12.9 KB > 4 KiB
    assert "query_tower/embeddings partitioned over the ps tasks: [201, 16] + [200, 16]" in log
    assert "candidate_tower/embeddings partitioned over the ps tasks: [101, 16] + [100, 16]" in log
    saved = tf.train.load_checkpoint(str(tmp_path / "run/towers/query/variables/variables"))
    assert saved.get_variable_to_shape_map()[
        "tower/encoders/user_id/embedding/embeddings/.ATTRIBUTES/VARIABLE_VALUE"] == [401, 16]
    export_run(tmp_path / "run", tmp_path / "models", ExportOptions(k=20, progress=False))
    if compiler_available():
        for model in ("query_tower", "candidate_tower"):
            results = check_saved_model(tmp_path / "models" / model / "1")
            assert results and all(r["outputs"] for r in results)
