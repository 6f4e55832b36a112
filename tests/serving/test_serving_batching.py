"""Server-side batching: merging, padding, queue limits, oversized requests."""
import re
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from serving_harness import install_version
from serving_models import call_in_process

MAX_BATCH = 4


def request(users, ages, seen=None):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "m"
    req.inputs["user_id"].CopyFrom(tf.make_tensor_proto(users))
    req.inputs["age"].CopyFrom(tf.make_tensor_proto(np.array(ages, np.float32)))
    if seen is not None:
        req.model_spec.signature_name = "retrieve_excluding"
        req.inputs["seen_item_ids"].CopyFrom(tf.make_tensor_proto(np.array(seen, dtype=object)))
    return req


def batch_stats(server):
    """(number of batches, total rows incl. padding) from the batch-size histogram."""
    _, text = server.http("GET", "/monitoring/prometheus/metrics")
    count = re.search(r':tensorflow:serving:batching_session:batch_size_count\{model_name="m"\} '
                      r'([0-9.e+]+)', text)
    total = re.search(r':tensorflow:serving:batching_session:batch_size_sum\{model_name="m"\} '
                      r'([0-9.e+]+)', text)
    return (float(count.group(1)), float(total.group(1))) if count else (0.0, 0.0)


def concurrently(fns):
    results = [None] * len(fns)
    barrier = threading.Barrier(len(fns))

    def run(i):
        barrier.wait()
        try:
            results[i] = fns[i]()
        except Exception as exc:  # noqa: BLE001 - inspected by the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.fixture(scope="module")
def server(templates, tmp_path_factory):
    from serving_harness import Server

    root = tmp_path_factory.mktemp("batching")
    install_version(templates[1], str(root / "m"), 1)
    params = root / "batching.config"
    params.write_text(f"""
max_batch_size {{ value: {MAX_BATCH} }}
batch_timeout_micros {{ value: 500000 }}
max_enqueued_batches {{ value: 1 }}
num_batch_threads {{ value: 1 }}
allowed_batch_sizes: 2
allowed_batch_sizes: {MAX_BATCH}
""")
    monitoring = root / "monitoring.config"
    monitoring.write_text("prometheus_config { enable: true }")
    srv = Server(["--model_name=m", f"--model_base_path={root / 'm'}", "--enable_batching",
                  f"--batching_parameters_file={params}",
                  f"--monitoring_config_file={monitoring}"],
                 str(root / "server.log")).wait_ready()
    srv.template = templates[1]
    yield srv
    assert srv.terminate() == 0, srv.log()


def test_concurrent_requests_share_one_padded_batch(server):
    predict, _ = server.stubs()
    before = batch_stats(server)
    users = [["a"], ["b"], ["c"]]
    ages = [[10.0], [20.0], [30.0]]
    results = concurrently([lambda u=u, a=a: predict.Predict(request(u, a), timeout=10)
                            for u, a in zip(users, ages)])
    for u, a, response in zip(users, ages, results):
        assert not isinstance(response, Exception), response
        want = call_in_process(server.template, "serving_default", user_id=u,
                               age=np.array(a, np.float32))
        np.testing.assert_allclose(tf.make_ndarray(response.outputs["scores"]),
                                   want["scores"], rtol=1e-6)
        np.testing.assert_array_equal(tf.make_ndarray(response.outputs["item_ids"]),
                                      want["item_ids"])
    count, rows = batch_stats(server)
    assert count - before[0] == 1        # three requests, one sess.run
    assert rows - before[1] == MAX_BATCH  # 3 rows padded up to the allowed size 4


def test_variable_length_seen_ids_are_padded(server):
    predict, _ = server.stubs()
    before = batch_stats(server)
    cases = [(["u1"], [40.0], [["i1"]]), (["u2"], [50.0], [["i0", "i1", "i3"]])]
    results = concurrently([lambda c=c: predict.Predict(request(*c), timeout=10) for c in cases])
    for (u, a, seen), response in zip(cases, results):
        assert not isinstance(response, Exception), response
        want = call_in_process(server.template, "retrieve_excluding", user_id=u,
                               age=np.array(a, np.float32), seen_item_ids=seen)
        np.testing.assert_array_equal(tf.make_ndarray(response.outputs["item_ids"]),
                                      want["item_ids"])
    assert batch_stats(server)[0] - before[0] == 1


def test_full_queue_is_resource_exhausted(server):
    predict, _ = server.stubs()
    first = {}

    def slow_first():
        first["response"] = predict.Predict(request(["a", "b", "c"], [1.0, 2.0, 3.0]),
                                             timeout=10)

    t = threading.Thread(target=slow_first)
    t.start()
    time.sleep(0.15)   # the first request's batch (3 of 4 rows) now waits for its timeout
    with pytest.raises(grpc.RpcError) as err:
        predict.Predict(request(["d", "e"], [4.0, 5.0]), timeout=10)
    t.join()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue" in err.value.details()
    assert first["response"].outputs["scores"].tensor_shape.dim[0].size == 3
    status, body = server.http("POST", "/v1/models/m:predict",
                               {"instances": [{"user_id": "x", "age": 1.0}]})
    assert status == 200, body


def test_request_larger_than_max_batch_runs_alone(server):
    predict, _ = server.stubs()
    users = [f"u{i}" for i in range(MAX_BATCH + 3)]
    ages = [float(i) for i in range(MAX_BATCH + 3)]
    response = predict.Predict(request(users, ages), timeout=10)
    want = call_in_process(server.template, "serving_default", user_id=users,
                           age=np.array(ages, np.float32))
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["scores"]), want["scores"],
                               rtol=1e-6)


def test_sigterm_finishes_queued_requests(start_server, templates, tmp_path):
    """A request waiting in the batch queue still gets its answer on SIGTERM."""
    import signal

    install_version(templates[1], str(tmp_path / "m"), 1)
    params = tmp_path / "batching.config"
    params.write_text("max_batch_size { value: 8 } batch_timeout_micros { value: 1500000 }")
    server = start_server("--model_name=m", f"--model_base_path={tmp_path / 'm'}",
                          "--enable_batching", f"--batching_parameters_file={params}")
    answers = {}

    def call_rest():
        answers["rest"] = server.http("POST", "/v1/models/m:predict",
                                      {"instances": [{"user_id": "a", "age": 1.0}]})

    predict, _ = server.stubs()

    def call_grpc():
        answers["grpc"] = predict.Predict(request(["b"], [2.0]), timeout=20)

    threads = [threading.Thread(target=call_rest), threading.Thread(target=call_grpc)]
    for t in threads:
        t.start()
    time.sleep(0.5)            # both are now queued, waiting for the 1.5 s batch timeout
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=30)
    assert server.proc.wait(timeout=30) == 0, server.log()
    status, body = answers["rest"]
    assert status == 200 and len(body["predictions"]) == 1, body
    assert answers["grpc"].outputs["scores"].tensor_shape.dim[0].size == 1


def test_expired_tasks_are_dropped_before_running():
    """Unit: a queued task past its deadline never reaches sess.run."""
    from serving.batching import BatchingOptions, BatchScheduler

    calls = []

    def run_fn(arrays):
        calls.append(len(arrays["x"]))
        return {"y": arrays["x"] * 2}

    scheduler = BatchScheduler(BatchingOptions(max_batch_size=8, batch_timeout_micros=200000,
                                               num_batch_threads=1))
    try:
        results = concurrently([
            lambda: scheduler.run("k", run_fn, "m", None, {"x": np.ones(1)}, 1,
                                  deadline=time.monotonic() + 0.05),
            lambda: scheduler.run("k", run_fn, "m", None, {"x": np.full(2, 3.0)}, 2),
        ])
    finally:
        scheduler.stop()
    assert isinstance(results[0], Exception) and results[0].code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "timeout exceeded while waiting in batching queue" in results[0].message
    assert results[1]["y"].tolist() == [6.0, 6.0]
    assert calls == [2]
