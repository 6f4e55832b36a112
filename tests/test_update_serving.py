"""End to end: the project's server watches the model base while a full and two
incremental updates are published; each version becomes AVAILABLE without a
restart, a client loop sees zero failed requests, ids first seen in an
incremental window are served with their own rows, and a worse candidate is
not published."""
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2, predict_pb2

from update_world import DAY2, DAY3, copy_runs, shared_initial

sys.path.insert(0, str(Path(__file__).resolve().parent / "serving"))
from serving_harness import running_server, statuses, wait_for  # noqa: E402

MODELS = ("query_tower", "candidate_tower", "retrieval", "retrieval_exact")
State = get_model_status_pb2.ModelVersionStatus.State
SCANN = dict(num_leaves=4, num_leaves_to_search=4, num_reordering_candidates=100)


def _options(until, **kw):
    """An update's options. Most items of this ~110-item world are clicked,
    added or aged out in any incremental window, so the index refresh is
    allowed to change all of it here (not the 10 % default)."""
    from export.scann_tuning import ScannParams
    from updates.publish import PublishOptions
    from updates.update import UpdateOptions
    return UpdateOptions(until=until, publish=PublishOptions(
        k=20, progress=False, scann_params=ScannParams(**SCANN), max_changed_fraction=10.0),
        **kw)


def _metadata(version_dir):
    from export.metadata import read_metadata
    return read_metadata(version_dir)


def _request(model, inputs):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    for name, values in inputs.items():
        req.inputs[name].CopyFrom(tf.make_tensor_proto(values))
    return req


def _user_inputs(run, user_ids):
    from export.run_artifacts import feature_columns, load_run
    spec = load_run(run).spec["query"]
    users = pd.read_parquet(run / "users.parquet").set_index("user_id").loc[user_ids]
    return feature_columns(users.reset_index(), spec, "users")


def test_updates_are_served_without_restart_or_failures(tmp_path, tmp_path_factory):
    from updates.update import GateRefused, run_update

    runs, base = copy_runs(shared_initial(tmp_path_factory), tmp_path), tmp_path / "models"
    first = run_update("full", runs, base, _options(DAY2 + 43200))
    assert first.version == 1
    from updates.init import write_model_config
    config = write_model_config(base)
    with running_server([f"--model_config_file={config}",
                         "--file_system_poll_wait_seconds=0.2"],
                        str(tmp_path / "server.log")) as server:
        predict, status = server.stubs()
        probe = _request("retrieval", _user_inputs(first.run, ["u1"]))
        answers, failures, stop = [], [], threading.Event()

        def loop():
            for _ in range(20000):            # bounded; stopped long before
                if stop.is_set():
                    return
                try:
                    answers.append(predict.Predict(probe, timeout=30).model_spec.version.value)
                except grpc.RpcError as err:
                    failures.append(err)
                time.sleep(0.02)

        client = threading.Thread(target=loop, daemon=True)
        client.start()
        try:
            wait_for(lambda: len(answers) > 3, what="first answers")
            results = [first]
            for until in (DAY2 + 64800, DAY3):
                result = run_update("incremental", runs, base, _options(until))
                results.append(result)
                v = result.version
                for m in MODELS:
                    wait_for(lambda: v in statuses(status, m) and
                             statuses(status, m)[v].state == State.AVAILABLE,
                             what=f"{m} version {v} AVAILABLE")
                wait_for(lambda: answers[-1] == v, what=f"answers from version {v}")
            assert [r.version for r in results] == [1, 2, 3]
            # the full update rebuilt the index; each incremental one refreshed the served one
            assert results[0].index == "index built and tuned from scratch"
            for r in results[1:]:
                assert r.index.startswith(f"index refreshed from version {r.version - 1}:"), \
                    r.index
                meta = _metadata(base / "retrieval" / str(r.version))
                assert meta["update"]["kind"] == "incremental"
                assert meta["update"]["inserted"] > 0       # the window's new items

            # a worse candidate (a learning rate that wrecks the towers) is refused
            wreck = tmp_path / "wreck.yaml"
            wreck.write_text("training: {learning_rate: 30.0}\n")
            with pytest.raises(GateRefused) as refused:
                run_update("full", runs, base, _options(DAY3 + 43200, config=wreck,
                                                        gate_margin=0.0))
            gate = refused.value.result
            assert gate.served_version == 3 and gate.candidate < gate.served
            n = len(answers)
            wait_for(lambda: len(answers) > n + 5, what="answers after the refusal")
        finally:
            stop.set()
            client.join(timeout=30)
        assert failures == [], [f.details() for f in failures[:3]]
        assert answers[-1] == 3 and set(answers) == {1, 2, 3}
        assert sorted(p.name for p in (base / "retrieval").iterdir()) == ["1", "2", "3"]

        # ids first seen in the incremental windows have their own rows
        last = results[-1].run
        initial_ids = set(pd.read_parquet(runs / "initial" / "seen.parquet")["user_id"]) | \
            set(pd.read_parquet(results[0].run / "seen.parquet")["user_id"])
        seen = pd.read_parquet(last / "seen.parquet")
        new_users = sorted(set(seen["user_id"]) - initial_ids)
        assert new_users
        inputs = _user_inputs(last, new_users[:1])
        stranger = dict(inputs, user_id=np.asarray(["never-seen"], dtype=object))
        own = tf.make_ndarray(predict.Predict(_request("query_tower", inputs), timeout=30)
                              .outputs["embedding"])
        oov = tf.make_ndarray(predict.Predict(_request("query_tower", stranger), timeout=30)
                              .outputs["embedding"])
        assert np.abs(own - oov).max() > 1e-3
        old_items = set(pd.read_parquet(runs / "initial" / "seen.parquet")["item_id"]) | \
            set(pd.read_parquet(results[0].run / "seen.parquet")["item_id"])
        fresh = seen[~seen["item_id"].isin(old_items)]
        item = fresh["item_id"].value_counts().index[0]       # the most clicked new item
        fans = sorted(set(fresh.loc[fresh["item_id"] == item, "user_id"]))
        reply = predict.Predict(_request("retrieval", _user_inputs(last, fans)), timeout=30)
        returned = tf.make_ndarray(reply.outputs["item_ids"]).astype(str)
        assert any(item in row for row in returned), (item, fans)
