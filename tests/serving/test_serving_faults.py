"""Operator faults against a real server subprocess: base paths that vanish,
non-atomic publishes, a corrupt newest version at startup, SIGTERM mid-call."""
import json
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2, predict_pb2, prediction_service_pb2_grpc

from serving_harness import Server, install_version, statuses, wait_for

State = get_model_status_pb2.ModelVersionStatus.State
POLL = "--file_system_poll_wait_seconds=0.2"
A_FEW_POLLS = 1.0


def predict_request(rows=1):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "m"
    req.inputs["user_id"].CopyFrom(tf.make_tensor_proto(np.array([b"u1"] * rows)))
    req.inputs["age"].CopyFrom(tf.make_tensor_proto(np.full(rows, 30.0, np.float32)))
    return req


def full_log(server) -> str:
    with open(server.log_path, encoding="utf-8", errors="replace") as f:
        return f.read()


class PredictLoop:
    """Predicts in a loop on its own thread; records versions and failures."""

    def __init__(self, stub):
        self.versions, self.failures = [], []
        self._stub, self._stop = stub, threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.versions.append(
                    self._stub.Predict(predict_request(), timeout=10).model_spec.version.value)
            except grpc.RpcError as err:
                self.failures.append(f"{err.code().name}: {err.details()}")
            time.sleep(0.005)

    def answers_continue(self):
        n = len(self.versions)
        wait_for(lambda: len(self.versions) > n + 5, timeout=20, what="more answers")

    def __enter__(self):
        self._thread.start()
        wait_for(lambda: len(self.versions) > 3, what="first answers")
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)


def test_base_path_faults_fail_no_request(start_server, templates, tmp_path):
    """Renamed away, a symlink flipped non-atomically (removed, then pointed at
    a new directory), the directory deleted: loaded versions keep serving."""
    dir_a, dir_b, link = tmp_path / "a", tmp_path / "b", tmp_path / "m"
    install_version(templates[1], str(dir_a), 1)
    os.symlink(dir_a, link)
    server = start_server("--model_name=m", f"--model_base_path={link}", POLL)
    predict, models = server.stubs()
    missing = f"Could not find base path {link} for servable m"
    with PredictLoop(predict) as loop:
        dir_a.rename(tmp_path / "a.away")                 # renamed away
        wait_for(lambda: missing in full_log(server), what="the missing base path logged")
        time.sleep(A_FEW_POLLS)
        loop.answers_continue()
        assert statuses(models)[1].state == State.AVAILABLE
        (tmp_path / "a.away").rename(dir_a)
        wait_for(lambda: f"Base path {link} for servable m can be read again"
                 in full_log(server), what="the base path back")

        install_version(templates[2], str(dir_b), 2)      # symlink flip, with a gap
        os.remove(link)
        time.sleep(A_FEW_POLLS)
        loop.answers_continue()
        os.symlink(dir_b, link)
        wait_for(lambda: loop.versions[-1] == 2, what="version 2 from the new target")
        wait_for(lambda: statuses(models)[1].state == State.END, what="version 1 unloaded")

        shutil.rmtree(dir_b)                              # deleted
        time.sleep(A_FEW_POLLS)
        loop.answers_continue()
        assert statuses(models)[2].state == State.AVAILABLE
    assert loop.failures == []
    assert set(loop.versions) == {1, 2} and loop.versions[-1] == 2
    assert full_log(server).count(missing) == 3   # once per disappearance, not per poll


def test_non_atomic_publish_is_retried_until_complete(start_server, templates, tmp_path):
    """saved_model.pb lands before variables/ (cp -r, rsync): the load fails,
    is retried every --load_retry_interval_micros, and succeeds once complete;
    a version that stays broken ends in END after --max_num_load_retries."""
    base = tmp_path / "m"
    install_version(templates[1], str(base), 1)
    server = start_server("--model_name=m", f"--model_base_path={base}", POLL,
                          "--max_num_load_retries=3", "--load_retry_interval_micros=1000000")
    predict, models = server.stubs()
    with PredictLoop(predict) as loop:
        v2 = base / "2"
        v2.mkdir()
        shutil.copy(os.path.join(templates[2], "saved_model.pb"), v2)
        wait_for(lambda: "{name: m version: 2} failed" in full_log(server),
                 what="a failed load")
        assert "retrying in 1s (retry 1 of 3)" in full_log(server)
        st = statuses(models)
        assert st[2].state == State.LOADING and st[1].state == State.AVAILABLE
        for sub in ("variables", "assets", "assets.extra"):
            if os.path.isdir(os.path.join(templates[2], sub)):
                shutil.copytree(os.path.join(templates[2], sub), v2 / sub)
        wait_for(lambda: loop.versions[-1] == 2, what="version 2 after its retry")
        assert statuses(models)[2].status.error_code == 0

        v3 = base / "3"
        v3.mkdir()
        (v3 / "saved_model.pb").write_bytes(b"this is not a SavedModel")
        wait_for(lambda: 3 in statuses(models) and statuses(models)[3].state == State.END,
                 timeout=30,
                 what="version 3 ended after its retries")
        loop.answers_continue()
    assert loop.failures == []
    log = full_log(server)
    assert log.count("{name: m version: 3} failed") == 4   # 1 + 3 retries
    assert "(after 3 retries)" in log
    assert statuses(models)[3].status.error_message
    assert loop.versions[-1] == 2


@pytest.fixture
def corrupt_newest(templates, tmp_path):
    base = tmp_path / "m"
    install_version(templates[1], str(base), 1)
    (base / "2").mkdir()
    (base / "2" / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    return base


def test_serve_latest_good_version_starts_on_the_older_version(start_server, corrupt_newest):
    """The newest version keeps its retries (default 5, every minute) in the
    background; the server starts at once on version 1.  (Without the flag the
    server refuses to start: test_serving_lifecycle.py.)"""
    server = start_server("--model_name=m", f"--model_base_path={corrupt_newest}",
                          "--serve_latest_good_version")
    predict, models = server.stubs()
    assert predict.Predict(predict_request(), timeout=10).model_spec.version.value == 1
    st = statuses(models)
    assert st[1].state == State.AVAILABLE and st[2].state == State.LOADING
    assert "retrying in 60s (retry 1 of 5)" in full_log(server)


def _rest_predict(url, results):
    body = json.dumps({"instances": [{"user_id": "u1", "age": 30.0}]}).encode()
    req = urllib.request.Request(url + "/v1/models/m:predict", data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            results.append("OK" if resp.status == 200 and b"predictions" in resp.read()
                           else f"HTTP {resp.status}")
    except (urllib.error.URLError, OSError) as err:
        results.append(f"REST error: {err}")


def _grpc_predict(stub, request, results):
    try:
        response = stub.Predict(request, timeout=30)
        rows = tf.make_ndarray(response.outputs["scores"]).shape[0]
        results.append("OK" if rows == request.inputs["age"].tensor_shape.dim[0].size
                       else f"{rows} rows")
    except grpc.RpcError as err:
        results.append(f"{err.code().name}: {err.details()}")


def _readiness_after_sigterm(url):
    """Status codes of GET /v1/models/m after SIGTERM, until the port closes."""
    seen = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/v1/models/m", timeout=5) as resp:
                seen.append(resp.status)
        except urllib.error.HTTPError as err:
            seen.append((err.code, json.loads(err.read())["error"]))
        except OSError:
            break   # closed
        time.sleep(0.02)
    return seen


@pytest.mark.parametrize("slow", ["batch_timeout", "large_batch", "large_batch_again"])
def test_sigterm_drains_in_flight_calls(templates, tmp_path, slow):
    """In-flight gRPC and REST calls are answered OK after SIGTERM; readiness
    (model status) turns 503 before the ports close; exit code 0.

    Slow for real: with batching, 1-row calls wait the 1.5 s batch timeout
    for a batch that never fills; without it, 8 concurrent 50k-row calls (the
    lone one runs on the gRPC loop, so the others queue inside gRPC, which
    cancelled them at shutdown before the drain)."""
    base = tmp_path / "m"
    install_version(templates[1], str(base), 1)
    # 50k-row calls: above the default --max_rows_per_request (10,000) on purpose
    args = ["--model_name=m", f"--model_base_path={base}", "--max_rows_per_request=50000"]
    if slow == "batch_timeout":
        params = tmp_path / "batching.config"
        params.write_text("max_batch_size { value: 64 }\n"
                          "batch_timeout_micros { value: 1500000 }\n"
                          "num_batch_threads { value: 1 }\n")
        args += ["--enable_batching", f"--batching_parameters_file={params}"]
    server = Server(args, str(tmp_path / "server.log"))
    try:
        server.wait_ready()
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}",
                                        options=[("grpc.max_receive_message_length", -1)])
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_request(1 if slow == "batch_timeout" else 50_000)
        results = []
        calls = [threading.Thread(target=_grpc_predict, args=(stub, request, results))
                 for _ in range(8)]
        if slow == "batch_timeout":
            calls += [threading.Thread(target=_rest_predict, args=(server.url, results))
                      for _ in range(3)]
        for t in calls:
            t.start()
        time.sleep(0.3)   # all sent
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        readiness = _readiness_after_sigterm(server.url) if slow == "batch_timeout" else []
        for t in calls:
            t.join(timeout=60)
        assert server.proc.wait(timeout=60) == 0, server.log()
        assert time.monotonic() - sent < 10   # within --shutdown_grace_seconds' default
        assert results == ["OK"] * len(calls), results
        if slow == "batch_timeout":
            draining = (503, "Server is shutting down")
            assert draining in readiness, readiness   # then 503 until the port closed
            assert set(readiness[readiness.index(draining):]) == {draining}, readiness
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(predict_request(), timeout=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        channel.close()
        assert "Server stopped" in server.log()
    finally:
        server.terminate()
