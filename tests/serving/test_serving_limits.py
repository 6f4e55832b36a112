"""No request takes the server down or starves the others (issue 12, item 1).

Every hostile request here is answered with a clear error naming what was
wrong or which limit it passed, by a server running under a 4 GiB data limit
(RLIMIT_DATA) with the default limits, which then still answers normally.
Loopback only; every loop is bounded.
"""
import asyncio
import http.client
import json
import socket
import threading
import time

import grpc
import numpy as np
import pytest
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from serving_harness import Server, install_version

GiB = 1 << 30
GOOD_ROW = b'{"user_id": "u1", "age": 3.0}'
PREDICT = "/v1/models/tiny:predict"


@pytest.fixture(scope="module")
def server(templates, tmp_path_factory):
    """The tiny model on a server with the default limits, RLIMIT_DATA 4 GiB."""
    root = tmp_path_factory.mktemp("limits")
    base = str(root / "tiny")
    install_version(templates[1], base, 1)
    srv = Server(["--model_name=tiny", f"--model_base_path={base}"],
                 str(root / "server.log"), data_limit_bytes=4 * GiB).wait_ready()
    yield srv
    assert srv.proc.poll() is None, srv.log()   # alive after every case
    assert srv.terminate() == 0, srv.log()


def tensor(dtype, shape, **values) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=dtype, **values)
    for d in shape:
        proto.tensor_shape.dim.add(size=d)
    return proto


def request(user_id, age) -> predict_pb2.PredictRequest:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "tiny"
    req.inputs["user_id"].CopyFrom(user_id)
    req.inputs["age"].CopyFrom(age)
    return req


def rows_request(n: int) -> predict_pb2.PredictRequest:
    """``n`` real rows (string ids, float ages in tensor_content)."""
    ids = tensor(types_pb2.DT_STRING, [n], string_val=[b"user%07d" % i for i in range(n)])
    ages = tensor(types_pb2.DT_FLOAT, [n],
                  tensor_content=np.full(n, 30.0, np.float32).tobytes())
    return request(ids, ages)


def assert_still_serving(srv):
    predict, _ = srv.stubs()
    assert len(predict.Predict(rows_request(2), timeout=10).outputs["scores"].float_val) == 6
    status, answer = srv.http("POST", PREDICT, raw=b'{"instances": [' + GOOD_ROW + b"]}")
    assert status == 200 and len(answer["predictions"]) == 1, answer


LIMIT_ROWS = "the limit is 10000 rows per request (--max_rows_per_request)"
GRPC_CASES = {
    # a 100-byte message declaring 1M rows and giving no value (TF would fill them)
    "1M rows, no values": (
        lambda: request(tensor(types_pb2.DT_STRING, [1_000_000]),
                        tensor(types_pb2.DT_FLOAT, [1_000_000])),
        "Request has 1000000 rows; " + LIMIT_ROWS),
    "2^40 elements, no values": (
        lambda: request(tensor(types_pb2.DT_STRING, [1 << 40]),
                        tensor(types_pb2.DT_FLOAT, [1 << 40])),
        'Input "age": shape [1099511627776] has 1099511627776 elements; the limit is '
        "10000000 elements per tensor (--max_tensor_elements)"),
    "shape without values": (
        lambda: request(tensor(types_pb2.DT_STRING, [3]),
                        tensor(types_pb2.DT_FLOAT, [3], float_val=[1.0, 2.0, 3.0])),
        "tensor parsing error: user_id (0 values given for shape [3] of 3 elements; "
        "give every value, or one to repeat)"),
    "fewer values than the shape": (
        lambda: request(tensor(types_pb2.DT_STRING, [3], string_val=[b"a", b"b", b"c"]),
                        tensor(types_pb2.DT_FLOAT, [3], float_val=[1.0, 2.0])),
        "tensor parsing error: age (2 values given for shape [3] of 3 elements"),
    "tensor_content of the wrong size": (
        lambda: request(tensor(types_pb2.DT_STRING, [3], string_val=[b"a", b"b", b"c"]),
                        tensor(types_pb2.DT_FLOAT, [3], tensor_content=b"\0\0\0\0")),
        "tensor parsing error: age (tensor_content has 4 bytes, shape [3] of DT_FLOAT "
        "needs 12)"),
    # small on the wire (17 MiB), huge to compute: 1M rows
    "1M real rows": (lambda: rows_request(1_000_000), "Request has 1000000 rows; " + LIMIT_ROWS),
}


@pytest.mark.parametrize("case", sorted(GRPC_CASES))
def test_grpc_hostile_predict(server, case):
    build, message = GRPC_CASES[case]
    predict, _ = server.stubs()
    with pytest.raises(grpc.RpcError) as err:
        predict.Predict(build(), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert message in err.value.details()
    assert_still_serving(server)


def test_grpc_100k_rows_with_a_short_deadline(server):
    predict, _ = server.stubs()
    with pytest.raises(grpc.RpcError) as err:
        predict.Predict(rows_request(100_000), timeout=2)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "Request has 100000 rows; " + LIMIT_ROWS in err.value.details()
    assert_still_serving(server)


def test_grpc_message_over_the_cap(server):
    huge = tensor(types_pb2.DT_STRING, [1], string_val=[b"x" * (65 << 20)])
    predict, _ = server.stubs()
    with pytest.raises(grpc.RpcError) as err:
        predict.Predict(request(huge, tensor(types_pb2.DT_FLOAT, [1], float_val=[1.0])),
                        timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    assert "Received message larger than max (68157" in err.value.details()
    assert "vs. 67108864)" in err.value.details()
    assert_still_serving(server)


def big_instances(rows: int, id_bytes: int) -> bytes:
    """A row-format body of ``rows`` rows, each with a ``id_bytes``-long user id."""
    pad = b"x" * (id_bytes - 8)
    return b'{"instances": [' + b",".join(
        b'{"user_id": "%08d%s", "age": 35.25}' % (i, pad) for i in range(rows)) + b"]}"


def post(srv, body, chunked=False, timeout=60):
    """(status, JSON answer) of a POST, with a Content-Length or chunked."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.rest_port, timeout=timeout)
    try:
        if chunked:
            chunks = (body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20))
            conn.request("POST", PREDICT, body=chunks, encode_chunked=True,
                         headers={"Transfer-Encoding": "chunked"})
        else:
            conn.request("POST", PREDICT, body=body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_rest_62mib_of_700k_rows(server, chunked):
    body = big_instances(700_000, 60)
    assert 60 << 20 < len(body) < 64 << 20   # under the default 64 MiB body cap
    status, answer = post(server, body, chunked)
    assert status == 400
    assert answer["error"] == "Request has more than 10000 rows; " + LIMIT_ROWS + \
        ": split it into smaller requests"
    assert_still_serving(server)


def test_rest_body_over_the_cap(server):
    body = b'{"instances": ["' + b"x" * (65 << 20) + b'"]}'
    status, answer = post(server, body, chunked=True)
    assert (status, answer) == (400, {"error": "Request body exceeds the limit of 67108864 "
                                               "bytes (--max_request_size_bytes)"})
    # refused from the header alone: the body is never sent
    answer = raw_exchange(server, b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                          % (PREDICT.encode(), 100 << 20))
    assert answer.startswith(b"HTTP/1.1 400")
    assert b'{"error": "Request body of 104857600 bytes exceeds the limit of 67108864 ' \
        b'bytes (--max_request_size_bytes)"}' in answer
    assert_still_serving(server)


@pytest.mark.parametrize("nest", [b"[", b'{"a":'], ids=["arrays", "objects"])
def test_rest_deeply_nested_json(server, nest):
    close = b"]" if nest == b"[" else b"}"
    status, answer = server.http("POST", PREDICT, raw=nest * 100_000 + b"1" + close * 100_000)
    assert status == 400
    assert answer["error"].startswith("JSON Parse error: nesting too deep"), answer
    # nested 300 deep inside a row: parsed, but no tensor has that rank
    deep = b'{"instances": [{"age": 1.0, "user_id": ' + b"[" * 300 + b'"u"' + b"]" * 300 + b"}]}"
    status, answer = server.http("POST", PREDICT, raw=deep)
    assert status == 400
    assert 'Input "user_id": JSON value nested 300 levels deep; a tensor has at most 254 ' \
        "dimensions" in answer["error"], answer
    assert_still_serving(server)


def raw_exchange(srv, data: bytes, half_close=False) -> bytes:
    """Sends ``data`` on a fresh socket (then shuts its write side when
    ``half_close``) and returns everything the server answers."""
    with socket.create_connection(("127.0.0.1", srv.rest_port), timeout=30) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while b"\r\n\r\n" not in out or not out.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


def test_rest_http10_and_half_closed_clients(server):
    body = b'{"instances": [' + GOOD_ROW + b"]}"
    head = b"POST " + PREDICT.encode() + b" HTTP/1.0\r\nContent-Type: application/json\r\n"
    # HTTP/1.0 without Content-Length (body, then EOF): 411 with a JSON body
    answer = raw_exchange(server, head + b"\r\n" + body, half_close=True)
    assert answer.startswith(b"HTTP/1.0 411"), answer
    assert answer.endswith(b'{"error": "Length Required: an HTTP/1.0 request with a body '
                           b'needs a Content-Length header"}'), answer
    # with a Content-Length, a half-closed client gets its answer
    answer = raw_exchange(server, head + b"Content-Length: %d\r\n\r\n" % len(body) + body,
                          half_close=True)
    assert answer.startswith(b"HTTP/1.0 200"), answer
    assert b'"predictions":[{"item_ids":' in answer
    # a body cut short by EOF fails at once rather than waiting for the rest
    answer = raw_exchange(server, head + b"Content-Length: 500\r\n\r\n" + body,
                          half_close=True)
    assert answer.startswith(b"HTTP/1.0 400"), answer
    assert b'{"error": "Malformed request: ' in answer
    assert_still_serving(server)


def test_small_requests_are_not_held_behind_a_big_one(start_server, templates, tmp_path):
    """A 400k-row Predict (allowed here) is handled on a worker thread: small
    requests sent while it runs are answered meanwhile, each in a fraction of
    its time (before, a lone big Predict ran on the event loop: none was)."""
    base = str(tmp_path / "tiny")
    install_version(templates[1], base, 1)
    srv = start_server("--model_name=tiny", f"--model_base_path={base}",
                       "--max_rows_per_request=1000000")
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}",
                                    options=[("grpc.max_receive_message_length", -1)])
    predict = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    small = rows_request(1)
    predict.Predict(small, timeout=10)
    big = rows_request(400_000)
    started = time.monotonic()
    future = predict.Predict.future(big, timeout=60)
    latencies = []
    while not future.done() and len(latencies) < 5000:
        t = time.monotonic()
        predict.Predict(small, timeout=10)
        if not future.done():
            latencies.append(time.monotonic() - t)
    big_seconds = time.monotonic() - started
    assert len(future.result().outputs["scores"].float_val) == 400_000 * 3
    channel.close()
    print(f"big: {big_seconds:.3f} s; {len(latencies)} small requests meanwhile, "
          f"slowest {max(latencies, default=0):.3f} s")
    assert len(latencies) >= 3, (latencies, big_seconds)
    assert max(latencies) < big_seconds / 3, (latencies, big_seconds)


# -- units: the checks themselves ------------------------------------------------
def test_values_must_match_the_shape():
    from serving.errors import ServingError
    from serving.tensors import to_numpy

    one = tensor(types_pb2.DT_FLOAT, [2, 2], float_val=[7.0])   # TF's fill of one value
    assert to_numpy(one, "x").tolist() == [[7.0, 7.0], [7.0, 7.0]]
    assert to_numpy(tensor(types_pb2.DT_STRING, [0]), "x").shape == (0,)
    many = tensor(types_pb2.DT_INT64, [2], int64_val=[1, 2, 3])
    with pytest.raises(ServingError, match=r"tensor parsing error: x \(3 values given for "
                                           r"shape \[2\] of 2 elements"):
        to_numpy(many, "x")
    content = tensor(types_pb2.DT_INT32, [2], tensor_content=np.arange(2, dtype=np.int32).tobytes())
    assert to_numpy(content, "x").tolist() == [0, 1]
    big = np.arange(50_000, dtype=np.int64)   # several conversion chunks
    proto = tensor(types_pb2.DT_INT64, [50_000], int64_val=big.tolist())
    np.testing.assert_array_equal(to_numpy(proto, "x"), big)


def test_limits_are_checked_from_declared_shapes():
    from serving.errors import ServingError
    from serving.limits import RequestLimits
    from serving.predict import check_inputs
    from serving.signature import Signature, TensorSpec

    sig = Signature.__new__(Signature)
    sig.inputs = {"x": TensorSpec("x", "x:0", types_pb2.DT_FLOAT, (-1, -1), np.float32)}
    sig.input_aliases, sig.has_defaults = ["x"], False
    limits = RequestLimits(max_rows=10, max_tensor_elements=30)
    assert check_inputs(sig, {"x": (types_pb2.DT_FLOAT, (7, 4))}, limits) == 7
    with pytest.raises(ServingError, match=r'Input "x": shape \[8,4\] has 32 elements; the '
                                           r"limit is 30 elements per tensor"):
        check_inputs(sig, {"x": (types_pb2.DT_FLOAT, (8, 4))}, limits)
    with pytest.raises(ServingError, match="Request has 11 rows; the limit is 10 rows"):
        check_inputs(sig, {"x": (types_pb2.DT_FLOAT, (11, 0))}, limits)


@pytest.mark.parametrize("streamed", [False, True], ids=["one call", "element by element"])
def test_json_parse_is_the_same_streamed_or_not(monkeypatch, streamed):
    from serving import json_tensor
    from serving.errors import ServingError
    from serving.limits import RequestLimits

    monkeypatch.setattr(json_tensor, "STREAM_MIN_CHARS", 0 if streamed else 1 << 30)
    body = (b' {"signature_name": "s", "instances": [ {"a": [1, 2]}, {"a": [3, 4]} ] ,'
            b' "inputs": {"a": [[1], [2]], "b": "x"}, "z": {"instances": [1]}} ')
    assert json_tensor.parse_body(body) == json.loads(body)
    for bad, message in [(b'{"instances": [1 2]}', "Expecting ',' delimiter"),
                         (b'{"a": 1,}', "Expecting property name"),
                         (b'{} x', "Extra data"),
                         (b"[" * 5000 + b"]" * 5000, "nesting too deep")]:
        with pytest.raises(ServingError, match=message):
            json_tensor.parse_body(bad)
    rows = b'{"instances": [' + b",".join([b"1"] * 6) + b"]}"
    doc = json_tensor.parse_body(rows, RequestLimits(max_rows=6))
    assert doc["instances"] == [1] * 6
    if streamed:   # parsing stops at row 6; the one-call parse refuses later, in request_arrays
        with pytest.raises(ServingError, match="Request has more than 5 rows; the limit is 5"):
            json_tensor.parse_body(rows, RequestLimits(max_rows=5))


def test_runner_skips_a_call_whose_caller_went_away():
    from serving.loop_thread import BlockingRunner

    runner = BlockingRunner(1)
    gate, ran, released = threading.Event(), [], []

    async def main():
        loop = asyncio.get_running_loop()
        first = runner.call(gate.wait, 5)
        task = asyncio.ensure_future(first)
        await asyncio.sleep(0.05)             # the one thread is busy with `first`
        abandoned = loop.create_future()
        runner.submit(ran.append, ("abandoned",), loop, abandoned, lambda: released.append(1))
        abandoned.cancel()                    # its client went away while it was queued
        gate.set()
        assert await task is True
        done = loop.create_future()
        runner.submit(ran.append, ("next",), loop, done)
        await done

    try:
        asyncio.run(main())
    finally:
        runner.stop()
    assert ran == ["next"] and released == [1]


def test_limit_flags(tmp_path):
    from serving.cli import build_parser, options_from_args

    base = ["--model_base_path", str(tmp_path)]
    options = options_from_args(build_parser().parse_args(base))
    assert (options.max_request_bytes, options.max_rows_per_request,
            options.max_tensor_elements) == (64 << 20, 10_000, 10_000_000)
    options = options_from_args(build_parser().parse_args(
        base + ["--max_rows_per_request=5", "--max_tensor_elements=7"]))
    assert (options.max_rows_per_request, options.max_tensor_elements) == (5, 7)
    with pytest.raises(ValueError, match="--max_rows_per_request must be at least 1, got 0"):
        options_from_args(build_parser().parse_args(base + ["--max_rows_per_request=0"]))
