"""serving.client (and its CLI) against the project's server: gRPC and REST.

One server (the ``exported`` fixture's models, read only) for the module; small
in-process fake servers for the retry and deadline cases.
"""
import http.server
import io
import json
import threading
import time
import urllib.request
from concurrent import futures
from contextlib import redirect_stdout
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
from tensorflow_serving.apis import prediction_service_pb2_grpc

from serving import client_cli
from serving.client import (FeatureError, Recommendation, RetrievalClient, ServerError,
                            TowerClient)
from serving_harness import running_server, free_port

TRANSPORTS = ("grpc", "rest")


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    base, _ = exported
    tmp = tmp_path_factory.mktemp("client-server")
    config = tmp / "models.config"
    config.write_text("model_config_list {\n" + "".join(
        f'  config {{ name: "{m}" base_path: "{base / m}" model_platform: "tensorflow" }}\n'
        for m in ("retrieval", "retrieval_exact", "query_tower")) + "}\n")
    monitoring = Path(__file__).resolve().parents[2] / "deploy" / "monitoring.config"
    # The other servers run on uvloop (the default); this one keeps the
    # stdlib event loop covered end to end, gRPC and REST.
    with running_server([f"--model_config_file={config}", "--enable_batching",
                         f"--monitoring_config_file={monitoring}",
                         "--file_system_poll_wait_seconds=0", "--event_loop=asyncio"],
                        str(tmp / "server.log")) as srv:
        assert "(event loop: asyncio)" in srv.log()
        yield srv


def target(server, transport):
    return (f"127.0.0.1:{server.grpc_port}" if transport == "grpc" else server.url)


@pytest.fixture(scope="module")
def users_path(tiny_run):
    return Path(tiny_run.output_dir) / "users.parquet"


@pytest.fixture(scope="module")
def users(users_path):
    table = pd.read_parquet(users_path).head(4)
    return [{"user_id": r.user_id, "age": float(r.age), "favorite_genres": r.favorite_genres}
            for r in table.itertuples()]


@pytest.fixture(scope="module")
def catalog(tiny_run):
    return list(pd.read_parquet(Path(tiny_run.output_dir) / "items.parquet").item_id)


def raw_predict(server, model, user, signature="serving_default", seen=None):
    """The answer through TF Serving's REST columnar API, without the client."""
    inputs = {k: [v] for k, v in user.items()}
    if seen is not None:
        inputs["seen_item_ids"] = [seen]
    status, body = server.http("POST", f"/v1/models/{model}:predict",
                               {"signature_name": signature, "inputs": inputs})
    assert status == 200, body
    return body["outputs"]["item_ids"][0], body["outputs"]["scores"][0]


def assert_same(got, expected):
    """Same ranked ids, scores equal up to float noise (batch shapes differ)."""
    assert [r.item_id for r in got] == [r.item_id for r in expected]
    np.testing.assert_allclose([r.score for r in got], [r.score for r in expected],
                               rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- recommend

@pytest.mark.parametrize("transport", TRANSPORTS)
def test_recommend_matches_the_served_model(server, users, transport):
    ids, scores = raw_predict(server, "retrieval", users[0])
    with RetrievalClient(target(server, transport), transport=transport) as client:
        full = client.recommend(users[0])
        top5 = client.recommend(users[0], k=5)
    assert [r.item_id for r in full] == ids and len(full) == 20
    np.testing.assert_allclose([r.score for r in full], scores, rtol=1e-6)
    assert_same(top5, full[:5])
    assert all(isinstance(r, Recommendation) and isinstance(r.item_id, str) for r in top5)
    assert [s for _, s in full] == sorted((s for _, s in full), reverse=True)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_recommend_batch_equals_single_calls(server, users, transport):
    with RetrievalClient(target(server, transport), model_name="retrieval_exact",
                         transport=transport, version=1) as client:
        batch = client.recommend_batch(users, k=7)
        singles = [client.recommend(u, k=7) for u in users]
        if transport == "grpc":
            assert client.last_model_version == 1
    assert len(batch) == len(users)
    for b, s in zip(batch, singles):
        assert_same(b, s)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_seen_items_are_excluded_and_empty_slots_dropped(server, users, catalog, transport):
    with RetrievalClient(target(server, transport), model_name="retrieval_exact",
                         transport=transport) as client:
        plain = client.recommend_batch(users[:3], k=10)
        seen = [[r.item_id for r in plain[0][:3]], [], [plain[2][0].item_id]]  # ragged
        excl = client.recommend_batch(users[:3], k=5, seen_item_ids=seen)
        single = client.recommend(users[0], k=5, seen_item_ids=seen[0])
        # 190 of the 200 items seen: only 10 real results, the empty ("") slots dropped
        few = client.recommend(users[1], seen_item_ids=catalog[:190])
    assert [r.item_id for r in excl[0]] == [r.item_id for r in plain[0][3:8]]
    assert [r.item_id for r in excl[1]] == [r.item_id for r in plain[1][:5]]
    assert [r.item_id for r in excl[2]] == [r.item_id for r in plain[2][1:6]]
    assert_same(single, excl[0])
    assert len(few) == 10 and {r.item_id for r in few} == set(catalog[190:])
    assert all(np.isfinite(r.score) for r in few)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_feature_errors_are_raised_before_sending(server, users, transport):
    with RetrievalClient(target(server, transport), transport=transport) as client:
        client.signatures()      # metadata fetched once, up front
        before = _request_count(server)
        with pytest.raises(FeatureError, match=r"unknown feature\(s\) \['colour'\]"):
            client.recommend({**users[0], "colour": "red"})
        with pytest.raises(FeatureError, match=r"missing feature\(s\) \['age'\]"):
            client.recommend({k: v for k, v in users[0].items() if k != "age"})
        with pytest.raises(FeatureError, match="feature 'age' expects DT_FLOAT, got 'old'"):
            client.recommend({**users[0], "age": "old"})
        with pytest.raises(FeatureError, match=r"example 1"):
            client.recommend_batch([users[0], {"user_id": "u1"}])
        with pytest.raises(ValueError, match="k=50 is more than"):
            client.recommend(users[0], k=50)
        assert _request_count(server) == before   # nothing reached the server
        # numeric strings are converted to the signature dtype ('31' -> 31.0)
        assert_same(client.recommend({**users[0], "age": str(users[0]["age"])}, k=3),
                    client.recommend(users[0], k=3))


def _request_count(server):
    """The server's request_count series (Prometheus text)."""
    status, text = server.http("GET", "/monitoring/prometheus/metrics")
    assert status == 200, text
    return [ln for ln in text.splitlines() if ln.startswith(":tensorflow:serving:request_count")]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_server_errors_carry_the_code(server, users, transport):
    with RetrievalClient(target(server, transport), transport=transport, version=99,
                         retries=0) as client:
        with pytest.raises(ServerError) as err:
            client.recommend(users[0])
    assert err.value.code == "NOT_FOUND" and "Specific(retrieval, 99)" in err.value.message
    with RetrievalClient(target(server, transport), model_name="nope",
                         transport=transport, retries=0) as client:
        with pytest.raises(ServerError, match="NOT_FOUND"):
            client.recommend(users[0])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_embed(server, users, transport):
    with TowerClient(target(server, transport), transport=transport) as tower:
        emb = tower.embed(users)
        one = tower.embed(users[0])
    assert emb.shape == (4, 16) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-4)
    np.testing.assert_allclose(one[0], emb[0], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- retries, deadlines

def test_unavailable_is_retried_with_a_bounded_budget(users):
    port = free_port()    # nothing listens there
    for transport, tgt in (("grpc", f"127.0.0.1:{port}"), ("rest", f"http://127.0.0.1:{port}")):
        started = time.monotonic()
        with RetrievalClient(tgt, transport=transport, retries=3, timeout_s=2,
                             backoff_s=0.05, max_backoff_s=0.2) as client:
            with pytest.raises(ServerError) as err:
                client.recommend(users[0])
        assert err.value.code == "UNAVAILABLE", transport
        assert err.value.attempts == 4, transport
        assert time.monotonic() - started < 5, transport


class _FlakyServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Forwards to the real server after failing the first ``fail`` calls, or sleeps."""

    def __init__(self, upstream, fail=0, delay=0.0):
        self.upstream, self.fail, self.delay, self.calls = upstream, fail, delay, 0

    def _maybe_fail(self, context):
        self.calls += 1
        if self.calls <= self.fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        time.sleep(self.delay)

    def GetModelMetadata(self, request, context):
        self._maybe_fail(context)
        return self.upstream.GetModelMetadata(request, timeout=10)

    def Predict(self, request, context):
        self._maybe_fail(context)
        return self.upstream.Predict(request, timeout=10)


@pytest.fixture
def fake_grpc(server):
    started = []

    def start(port=0, **kwargs):
        servicer = _FlakyServicer(server.stubs()[0], **kwargs)
        srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, srv)
        port = srv.add_insecure_port(f"127.0.0.1:{port}")
        srv.start()
        started.append(srv)
        return f"127.0.0.1:{port}", servicer

    yield start
    for srv in started:
        srv.stop(0)


class _FlakyHTTP(http.server.BaseHTTPRequestHandler):
    upstream, fail, delay, calls = "", 0, 0.0, 0

    def _handle(self, method):
        cls = type(self)
        cls.calls += 1
        if cls.calls <= cls.fail:
            self._send(503, json.dumps({"error": "warming up"}).encode())
            return
        time.sleep(cls.delay)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        req = urllib.request.Request(cls.upstream + self.path, data=body, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                self._send(resp.status, resp.read())
        except OSError:   # the test (and its server) may be gone after a deadline case
            pass

    def _send(self, status, data):
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_rest(server):
    started = []

    def start(fail=0, delay=0.0):
        handler = type("Handler", (_FlakyHTTP,), {"upstream": server.url, "fail": fail,
                                                  "delay": delay, "calls": 0})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        started.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}", handler

    yield start
    for srv in started:
        srv.shutdown()
        srv.server_close()


def test_grpc_unavailable_then_success(fake_grpc, users, server):
    addr, servicer = fake_grpc(fail=3)
    with RetrievalClient(addr, retries=4, backoff_s=0.02) as client:
        got = client.recommend(users[0], k=5)
    assert servicer.calls == 5         # 3 failures + metadata + predict
    with RetrievalClient(f"127.0.0.1:{server.grpc_port}") as direct:
        assert_same(got, direct.recommend(users[0], k=5))
    addr, servicer = fake_grpc(fail=3)
    with RetrievalClient(addr, retries=2, backoff_s=0.02) as client:
        with pytest.raises(ServerError, match="UNAVAILABLE: warming up") as err:
            client.recommend(users[0])
    assert err.value.attempts == 3 and servicer.calls == 3


def test_grpc_server_coming_up_late_is_reached_by_retries(fake_grpc, users):
    port = free_port()
    result = {}

    def ask():
        try:
            with RetrievalClient(f"127.0.0.1:{port}", retries=12, backoff_s=0.1,
                                 max_backoff_s=0.3) as client:
                result["recs"] = client.recommend(users[0], k=3)
        except Exception as err:  # reported below
            result["error"] = err

    asker = threading.Thread(target=ask)
    asker.start()
    time.sleep(0.8)            # the client has already failed a few attempts
    fake_grpc(port=port)
    asker.join(timeout=20)
    assert "error" not in result, result.get("error")
    assert len(result["recs"]) == 3


def test_rest_503_then_success(fake_rest, users, server):
    url, handler = fake_rest(fail=2)
    with RetrievalClient(url, transport="rest", retries=3, backoff_s=0.02) as client:
        got = client.recommend(users[0], k=5)
    assert handler.calls == 4
    with RetrievalClient(server.url, transport="rest") as direct:
        assert_same(got, direct.recommend(users[0], k=5))
    url, handler = fake_rest(fail=5)
    with RetrievalClient(url, transport="rest", retries=1, backoff_s=0.02) as client:
        with pytest.raises(ServerError, match="UNAVAILABLE") as err:
            client.recommend(users[0])
    assert err.value.attempts == 2 and handler.calls == 2


def test_deadline_is_enforced_and_not_retried(fake_grpc, fake_rest, users):
    addr, servicer = fake_grpc(delay=1.5)
    url, handler = fake_rest(delay=1.5)
    for transport, tgt, counter in (("grpc", addr, servicer), ("rest", url, handler)):
        started = time.monotonic()
        with RetrievalClient(tgt, transport=transport, timeout_s=0.3, retries=3) as client:
            with pytest.raises(ServerError) as err:
                client.recommend(users[0])
        assert err.value.code == "DEADLINE_EXCEEDED", transport
        assert counter.calls == 1, transport            # not retried
        assert time.monotonic() - started < 1.2, transport


# --------------------------------------------------------------------------- CLI

def _cli(*argv):
    out = io.StringIO()
    with redirect_stdout(out):
        rc = client_cli.main(list(argv))
    return rc, out.getvalue()


def test_cli_table_and_json(server, users, users_path):
    user = users[1]
    with RetrievalClient(f"127.0.0.1:{server.grpc_port}") as client:
        expected = client.recommend(user, k=4, seen_item_ids=["i1", "i2"])
    rc, out = _cli("--target", f"127.0.0.1:{server.grpc_port}", "--users-table",
                   str(users_path), "--user-id", user["user_id"], "--k", "4",
                   "--seen", "i1,i2")
    assert rc == 0
    lines = out.strip().splitlines()
    assert lines[0].split() == ["rank", "item_id", "score"]
    assert [ln.split()[1] for ln in lines[1:]] == [r.item_id for r in expected]
    assert [ln.split()[0] for ln in lines[1:]] == ["1", "2", "3", "4"]

    rc, out = _cli("--rest", server.url, "--model", "retrieval", "--k", "4", "--json",
                   "--seen", "i1,i2", *[f"--feature={k}={v}" for k, v in user.items()])
    assert rc == 0
    body = json.loads(out)
    assert [r["item_id"] for r in body["results"]] == [r.item_id for r in expected]
    np.testing.assert_allclose([r["score"] for r in body["results"]],
                               [r.score for r in expected], rtol=1e-5)


def test_cli_errors(server, users_path, capsys):
    rc, _ = _cli("--target", f"127.0.0.1:{server.grpc_port}", "--feature", "user_id=u1")
    assert rc == 1
    assert "missing feature(s) ['age', 'favorite_genres']" in capsys.readouterr().err
    rc, _ = _cli("--target", f"127.0.0.1:{server.grpc_port}", "--users-table",
                 str(users_path), "--user-id", "nobody")
    assert rc == 1 and "no user with user_id == 'nobody'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        _cli("--target", "x:1", "--version", "1", "--label", "stable", "--feature", "a=b")
    assert exit_.value.code == 2
