"""End to end: the four exported models behind the project's server, with deploy/ configs.

The server runs as a subprocess with ``deploy/models.config`` (base paths
rewritten to a copy of the ``exported`` fixture's model base),
``deploy/batching.config`` and ``deploy/monitoring.config``; it is queried
through TF Serving's own gRPC stubs and REST, and every answer is compared with
the same SavedModel run in-process through a session (TF Serving's loader).
The last test hot-swaps ``retrieval`` to a freshly exported version 2 under a
Predict loop, then drops in a corrupt version 3.
"""
import json
import os
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import get_model_status_pb2, predict_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving_harness import running_server, statuses, wait_for

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
MODELS = ("query_tower", "candidate_tower", "retrieval", "retrieval_exact")
State = get_model_status_pb2.ModelVersionStatus.State


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def model_base(exported, tmp_path_factory):
    """A private copy of the exported base: the lifecycle test adds versions to it."""
    base, _ = exported
    copy = tmp_path_factory.mktemp("e2e") / "models"
    shutil.copytree(base, copy)
    return copy


@pytest.fixture(scope="module")
def server(model_base, tmp_path_factory):
    cfg = model_server_config_pb2.ModelServerConfig()
    text_format.Parse((DEPLOY / "models.config").read_text(), cfg)
    for c in cfg.model_config_list.config:
        assert c.base_path == f"/models/{c.name}"
        c.base_path = str(model_base / c.name)
    tmp = tmp_path_factory.mktemp("e2e-server")
    config_file = tmp / "models.config"
    config_file.write_text(text_format.MessageToString(cfg))
    with running_server([f"--model_config_file={config_file}", "--enable_batching",
                         f"--batching_parameters_file={DEPLOY / 'batching.config'}",
                         f"--monitoring_config_file={DEPLOY / 'monitoring.config'}",
                         "--file_system_poll_wait_seconds=0.3", "--max_num_load_retries=0"],
                        str(tmp / "server.log")) as srv:
        yield srv


def _spec(tiny_run):
    return json.loads((Path(tiny_run.output_dir) / "feature_spec.json").read_text())


@pytest.fixture(scope="module")
def users(tiny_run):
    """Raw query-tower inputs of 5 users (5 rows: the batcher pads them to 8)."""
    from export.run_artifacts import feature_columns
    table = pd.read_parquet(Path(tiny_run.output_dir) / "users.parquet").head(5)
    return feature_columns(table, _spec(tiny_run)["query"], "users")


@pytest.fixture(scope="module")
def items(tiny_run):
    from export.run_artifacts import feature_columns
    table = pd.read_parquet(Path(tiny_run.output_dir) / "items.parquet").head(6)
    return feature_columns(table, _spec(tiny_run)["candidate"], "items")


class InProcess:
    """Session-based calls of a SavedModel by its SignatureDef, as TF Serving runs it."""

    def __init__(self):
        import scann  # noqa: F401  registers the Scann>* ops
        self._sessions = {}

    def __call__(self, path, inputs, signature="serving_default"):
        path = str(path)
        if path not in self._sessions:
            graph = tf.Graph()
            sess = tf.compat.v1.Session(graph=graph)
            meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)
            self._sessions[path] = (sess, meta)
        sess, meta = self._sessions[path]
        sig = meta.signature_def[signature]
        fetch = {alias: info.name for alias, info in sig.outputs.items()}
        return sess.run(fetch, {sig.inputs[a].name: v for a, v in inputs.items()})

    def close(self):
        for sess, _ in self._sessions.values():
            sess.close()


@pytest.fixture(scope="module")
def in_process():
    ref = InProcess()
    yield ref
    ref.close()


# --------------------------------------------------------------------------- helpers

def predict_request(model, inputs, signature="serving_default"):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    req.model_spec.signature_name = signature
    for alias, values in inputs.items():
        req.inputs[alias].CopyFrom(tf.make_tensor_proto(values))
    return req


def as_array(proto):
    return tf.make_ndarray(proto)


def assert_retrieval_equal(ids, scores, ref):
    np.testing.assert_array_equal(np.asarray(ids, dtype=object).astype(bytes),
                                  ref["item_ids"].astype(bytes))
    np.testing.assert_allclose(np.asarray(scores, dtype=np.float32), ref["scores"],
                               rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- tests

def test_all_four_models_available(server):
    _, models = server.stubs()
    for name in MODELS:
        st = statuses(models, name)
        assert list(st) == [1] and st[1].state == State.AVAILABLE, name


@pytest.mark.parametrize("model", ["retrieval", "retrieval_exact"])
def test_grpc_retrieval_matches_in_process(server, model_base, users, in_process, model):
    predict, _ = server.stubs()
    resp = predict.Predict(predict_request(model, users), timeout=30)
    assert resp.model_spec.version.value == 1
    ref = in_process(model_base / model / "1", users)
    assert ref["item_ids"].shape == (5, 20)
    assert_retrieval_equal(as_array(resp.outputs["item_ids"]),
                           as_array(resp.outputs["scores"]), ref)


@pytest.mark.parametrize("model", ["query_tower", "candidate_tower"])
def test_grpc_towers_match_in_process(server, model_base, users, items, in_process, model):
    inputs = users if model == "query_tower" else items
    predict, _ = server.stubs()
    resp = predict.Predict(predict_request(model, inputs), timeout=30)
    got = as_array(resp.outputs["embedding"])
    ref = in_process(model_base / model / "1", inputs)["embedding"]
    assert got.shape == ref.shape == (len(next(iter(inputs.values()))), 16)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def _json_rows(inputs):
    n = len(next(iter(inputs.values())))
    return [{a: (v[i].item() if hasattr(v[i], "item") else v[i]) for a, v in inputs.items()}
            for i in range(n)]


def test_rest_instances_and_inputs_match_in_process(server, model_base, users, in_process):
    ref = in_process(model_base / "retrieval" / "1", users)
    status, body = server.http("POST", "/v1/models/retrieval:predict",
                               {"instances": _json_rows(users)})
    assert status == 200, body
    preds = body["predictions"]
    assert len(preds) == 5
    assert_retrieval_equal([p["item_ids"] for p in preds], [p["scores"] for p in preds], ref)

    columns = {a: [x.item() if hasattr(x, "item") else x for x in v] for a, v in users.items()}
    status, body = server.http("POST", "/v1/models/retrieval/versions/1:predict",
                               {"signature_name": "serving_default", "inputs": columns})
    assert status == 200, body
    assert_retrieval_equal(body["outputs"]["item_ids"], body["outputs"]["scores"], ref)


def test_grpc_retrieve_excluding(server, model_base, users, in_process):
    plain = in_process(model_base / "retrieval_exact" / "1", users)
    # ragged seen lists: user 0 excludes its top 3, user 1 its top 1, the others nothing
    seen_lists = [list(plain["item_ids"][0][:3]), [plain["item_ids"][1][0]], [], [], []]
    width = max(len(s) for s in seen_lists)
    seen = np.array([s + [b""] * (width - len(s)) for s in seen_lists], dtype=object)
    inputs = {**users, "seen_item_ids": seen}
    predict, _ = server.stubs()
    for model in ("retrieval", "retrieval_exact"):
        resp = predict.Predict(predict_request(model, inputs, "retrieve_excluding"), timeout=30)
        ids, scores = as_array(resp.outputs["item_ids"]), as_array(resp.outputs["scores"])
        ref = in_process(model_base / model / "1", inputs, "retrieve_excluding")
        assert_retrieval_equal(ids, scores, ref)
        for row, excluded in zip(ids, seen_lists):
            assert not set(row) & set(excluded), model
    # exact retrieval: excluding the top 3 shifts the list up by 3
    assert list(ids[0][:5]) == list(plain["item_ids"][0][3:8])


def test_batching_and_monitoring_configs_in_effect(server):
    status, text = server.http("GET", "/monitoring/prometheus/metrics")
    assert status == 200
    assert ':tensorflow:serving:request_count{model_name="retrieval",status="OK"}' in text
    assert ':tensorflow:serving:batching_session:batch_size_bucket{le="8.0",' \
           'model_name="retrieval"}' in text or \
           'batching_session:batch_size_count{model_name="retrieval"}' in text


def test_new_version_swaps_in_and_corrupt_version_is_refused(server, model_base, tiny_run,
                                                              exported, users):
    from export.exporter import ExportOptions, export_run
    from export.scann_tuning import ScannParams

    predict, models = server.stubs()
    request = predict_request("retrieval", {a: v[:1] for a, v in users.items()})
    failures, versions, stop = [], [], threading.Event()

    def loop():
        while not stop.is_set():
            try:
                versions.append(predict.Predict(request, timeout=30).model_spec.version.value)
            except grpc.RpcError as err:  # any failure during the swap is a bug
                failures.append(err)
            time.sleep(0.01)

    client = threading.Thread(target=loop, daemon=True)
    client.start()
    try:
        wait_for(lambda: len(versions) > 3, what="first answers")
        params = exported[1].metadata["retrieval"]["index"]["params"]
        result = export_run(tiny_run.output_dir, model_base,
                            ExportOptions(k=20, models=["retrieval"], progress=False,
                                          scann_params=ScannParams(**params)))
        assert result.version == 2
        assert sorted(os.listdir(model_base / "retrieval")) == ["1", "2"]   # no staging left
        wait_for(lambda: versions and versions[-1] == 2, what="version 2 serving")
        wait_for(lambda: statuses(models, "retrieval")[1].state == State.END,
                 what="version 1 unloaded")
        st = statuses(models, "retrieval")
        assert st[2].state == State.AVAILABLE
        assert st[1].status.error_code == 0      # unloaded, not failed

        # a corrupt version 3, copied in under a temporary name then renamed
        tmp = model_base / "retrieval" / ".tmp-3"
        (tmp / "variables").mkdir(parents=True)
        (tmp / "saved_model.pb").write_bytes(b"\x08garbage, not a SavedModel")
        os.rename(tmp, model_base / "retrieval" / "3")
        wait_for(lambda: 3 in statuses(models, "retrieval")
                 and statuses(models, "retrieval")[3].state == State.END,
                 what="version 3 failed")
        n = len(versions)
        wait_for(lambda: len(versions) > n + 3, what="answers after the failed load")
    finally:
        stop.set()
        client.join(timeout=30)
    st = statuses(models, "retrieval")
    assert st[3].status.error_code != 0 and st[3].status.error_message
    assert st[2].state == State.AVAILABLE
    assert versions[-1] == 2 and set(versions) == {1, 2}
    assert failures == [], [f.details() for f in failures[:3]]
    # the other models were untouched
    for name in ("query_tower", "candidate_tower", "retrieval_exact"):
        assert statuses(models, name)[1].state == State.AVAILABLE
