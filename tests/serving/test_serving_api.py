"""Predict / metadata / status over gRPC and REST, and every malformed request."""
import base64
import os

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import wrappers_pb2
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    predict_pb2,
)

from serving_harness import Server, install_version
from serving_models import call_in_process

USERS = ["u1", "u2", "u3"]
AGES = np.array([20.0, 35.5, 61.0], np.float32)
SEEN = [["i1", "", ""], ["i0", "i1", "i3"], ["", "", ""]]


@pytest.fixture(scope="module")
def server(templates, tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    base = str(root / "tiny")
    install_version(templates[1], base, 1)
    install_version(templates[2], base, 2)
    os.makedirs(os.path.join(base, "not_a_version"))
    config = root / "models.config"
    config.write_text(f"""
model_config_list {{
  config {{
    name: "tiny"
    base_path: "{base}"
    model_platform: "tensorflow"
    model_version_policy {{ all {{}} }}
    version_labels {{ key: "stable" value: 1 }}
    version_labels {{ key: "canary" value: 2 }}
  }}
}}""")
    monitoring = root / "monitoring.config"
    monitoring.write_text('prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }')
    srv = Server([f"--model_config_file={config}", f"--monitoring_config_file={monitoring}",
                  "--max_request_size_bytes=200000"], str(root / "server.log")).wait_ready()
    assert "(event loop: uvloop)" in srv.log()   # the default, uvloop being installed
    srv.templates = templates
    yield srv
    assert srv.terminate() == 0, srv.log()


def make_request(name="tiny", signature="", version=None, label=None, **inputs):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    if signature:
        req.model_spec.signature_name = signature
    if version is not None:
        req.model_spec.version.value = version
    if label is not None:
        req.model_spec.version_label = label
    if not inputs:
        inputs = {"user_id": USERS, "age": AGES}
    for alias, value in inputs.items():
        req.inputs[alias].CopyFrom(value if isinstance(value, tensor_pb2.TensorProto)
                                   else tf.make_tensor_proto(value))
    return req


def outputs_of(response):
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def assert_matches(got, want):
    assert set(got) == set(want)
    np.testing.assert_array_equal(got["item_ids"], want["item_ids"])
    np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-6)


# -- Predict ------------------------------------------------------------------
def test_grpc_predict_latest_matches_savedmodel(server):
    predict, _ = server.stubs()
    response = predict.Predict(make_request(), timeout=10)
    assert response.model_spec.name == "tiny"
    assert response.model_spec.version.value == 2
    assert response.model_spec.signature_name == "serving_default"
    want = call_in_process(server.templates[2], "serving_default", user_id=USERS, age=AGES)
    assert_matches(outputs_of(response), want)


def test_grpc_predict_version_and_label(server):
    predict, _ = server.stubs()
    want1 = call_in_process(server.templates[1], "serving_default", user_id=USERS, age=AGES)
    by_version = predict.Predict(make_request(version=1), timeout=10)
    by_label = predict.Predict(make_request(label="stable"), timeout=10)
    assert by_version.model_spec.version.value == 1
    assert by_label.model_spec.version.value == 1
    assert_matches(outputs_of(by_version), want1)
    assert_matches(outputs_of(by_label), want1)


def test_grpc_retrieve_excluding(server):
    predict, _ = server.stubs()
    req = make_request(signature="retrieve_excluding", user_id=USERS, age=AGES,
                       seen_item_ids=np.array(SEEN, dtype=object))
    response = predict.Predict(req, timeout=10)
    assert response.model_spec.signature_name == "retrieve_excluding"
    got = outputs_of(response)
    want = call_in_process(server.templates[2], "retrieve_excluding", user_id=USERS,
                           age=AGES, seen_item_ids=SEEN)
    assert_matches(got, want)
    assert b"i1" not in got["item_ids"][0]
    # only i2 and i4 are unseen for user 2: the third slot is an excluded item
    assert set(got["item_ids"][1][:2]) == {b"i2", b"i4"} and got["scores"][1][2] < -1e8


def test_grpc_output_filter(server):
    predict, _ = server.stubs()
    req = make_request()
    req.output_filter.append("scores")
    response = predict.Predict(req, timeout=10)
    assert list(response.outputs) == ["scores"]


def test_grpc_typed_value_fields_and_tensor_content_inputs(server):
    """Inputs in tensor_content or float_val both work; outputs use typed fields."""
    predict, _ = server.stubs()
    req = make_request()
    age = req.inputs["age"]
    age.ClearField("tensor_content")
    age.float_val.extend(AGES.tolist())
    response = predict.Predict(req, timeout=10)
    assert len(response.outputs["scores"].float_val) == 9
    assert len(response.outputs["item_ids"].string_val) == 9


# -- REST predict -----------------------------------------------------------------
def test_rest_row_and_columnar(server):
    want = call_in_process(server.templates[2], "serving_default", user_id=USERS, age=AGES)
    rows = [{"user_id": u, "age": float(a)} for u, a in zip(USERS, AGES)]
    status, body = server.http("POST", "/v1/models/tiny:predict", {"instances": rows})
    assert status == 200, body
    assert [p["item_ids"] for p in body["predictions"]] == \
        [[s.decode() for s in r] for r in want["item_ids"]]
    np.testing.assert_allclose([p["scores"] for p in body["predictions"]], want["scores"],
                               rtol=1e-6)
    status, body = server.http("POST", "/v1/models/tiny/versions/2:predict",
                               {"inputs": {"user_id": USERS, "age": AGES.tolist()}})
    assert status == 200, body
    np.testing.assert_allclose(body["outputs"]["scores"], want["scores"], rtol=1e-6)
    assert body["outputs"]["item_ids"][0] == [s.decode() for s in want["item_ids"][0]]


def test_rest_label_signature_and_b64(server):
    want = call_in_process(server.templates[1], "retrieve_excluding", user_id=USERS,
                           age=AGES, seen_item_ids=SEEN)
    rows = [{"user_id": {"b64": base64.b64encode(u.encode()).decode()}, "age": float(a),
             "seen_item_ids": s} for u, a, s in zip(USERS, AGES, SEEN)]
    status, body = server.http("POST", "/v1/models/tiny/labels/stable:predict",
                               {"signature_name": "retrieve_excluding", "instances": rows})
    assert status == 200, body
    np.testing.assert_allclose([p["scores"] for p in body["predictions"]], want["scores"],
                               rtol=1e-6)


def test_rest_float32_written_as_tf_serving_writes_it():
    """WriteDecimal: %g when six digits read back as the same float32, else %.9g."""
    from serving.json_tensor import COLUMNAR, ROW, response_json
    body = response_json({"scores": np.array([[0.2, 1.0]], np.float32)}, ROW)
    assert body == b'{"predictions":[[0.2,1.0]]}'
    body = response_json({"scores": np.array([0.669074059, 123456.703, np.nan, -np.inf],
                                             np.float32)}, ROW)
    assert body == b'{"predictions":[0.669074059,123456.703,NaN,-Infinity]}'
    body = response_json({"ids_bytes": np.array([b"\x00\xff"], dtype=object),
                          "ids": np.array([b"caf\xc3\xa9"], dtype=object)}, COLUMNAR)
    assert body == b'{"outputs":{"ids":["caf\\u00e9"],"ids_bytes":[{"b64":"AP8="}]}}'


# -- metadata and status -----------------------------------------------------------
def test_grpc_metadata(server):
    predict, _ = server.stubs()
    req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    req.model_spec.name = "tiny"
    response = predict.GetModelMetadata(req, timeout=10)
    assert response.model_spec.version.value == 2
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(sig_map)
    sig = sig_map.signature_def["retrieve_excluding"]
    assert set(sig.inputs) == {"user_id", "age", "seen_item_ids"}
    assert [d.size for d in sig.outputs["item_ids"].tensor_shape.dim] == [-1, 3]


def test_rest_metadata_and_status(server):
    status, body = server.http("GET", "/v1/models/tiny/versions/1/metadata")
    assert status == 200, body
    assert body["model_spec"] == {"name": "tiny", "signature_name": "", "version": "1"}
    assert "serving_default" in body["metadata"]["signature_def"]["signature_def"]
    status, body = server.http("GET", "/v1/models/tiny")
    assert status == 200
    assert body == {"model_version_status": [
        {"version": v, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        for v in ("2", "1")]}
    status, labelled = server.http("GET", "/v1/models/tiny/labels/stable")
    assert status == 200 and labelled == body


def test_grpc_status(server):
    _, models = server.stubs()
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = "tiny"
    req.model_spec.version.value = 1
    response = models.GetModelStatus(req, timeout=10)
    [entry] = response.model_version_status
    assert entry.version == 1 and entry.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    # as in TF Serving, a label does not narrow the status: every version is listed
    req.model_spec.version_label = "gold"
    response = models.GetModelStatus(req, timeout=10)
    assert [e.version for e in response.model_version_status] == [2, 1]
    req.model_spec.name = ""
    with pytest.raises(grpc.RpcError) as err:
        models.GetModelStatus(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "Could not find any versions of model "


# -- malformed requests -----------------------------------------------------------
GRPC_CASES = {
    "unknown model": (lambda: make_request(name="nope"), grpc.StatusCode.NOT_FOUND,
                      "Servable not found for request: Latest(nope)"),
    "unknown version": (lambda: make_request(version=7), grpc.StatusCode.NOT_FOUND,
                        "Servable not found for request: Specific(tiny, 7)"),
    "unknown label": (lambda: make_request(label="gold"), grpc.StatusCode.INVALID_ARGUMENT,
                      "Unrecognized servable version label: gold"),
    "empty model name": (lambda: make_request(name=""), grpc.StatusCode.INVALID_ARGUMENT,
                         "ModelSpec has no name specified."),
    "unknown signature": (lambda: make_request(signature="nope"),
                          grpc.StatusCode.FAILED_PRECONDITION,
                          'Serving signature key "nope" not found.'),
    "missing input": (lambda: make_request(user_id=USERS), grpc.StatusCode.INVALID_ARGUMENT,
                      "Missing but required: {age}"),
    "extra input": (lambda: make_request(user_id=USERS, age=AGES, zip=AGES),
                    grpc.StatusCode.INVALID_ARGUMENT, "Sent extra: {zip}"),
    "wrong dtype": (lambda: make_request(user_id=USERS, age=["old", "young", "x"]),
                    grpc.StatusCode.INVALID_ARGUMENT, 'Input "age": expected dtype DT_FLOAT'),
    "wrong shape": (lambda: make_request(user_id=[USERS], age=AGES),
                    grpc.StatusCode.INVALID_ARGUMENT, 'Input "user_id": shape [1,3]'),
    "empty batch": (lambda: make_request(user_id=np.array([], dtype=object),
                                         age=np.array([], np.float32)),
                    grpc.StatusCode.INVALID_ARGUMENT, "empty batch"),
}


@pytest.mark.parametrize("case", sorted(GRPC_CASES))
def test_grpc_malformed_predict(server, case):
    build, code, message = GRPC_CASES[case]
    predict, _ = server.stubs()
    with pytest.raises(grpc.RpcError) as err:
        predict.Predict(build(), timeout=10)
    assert err.value.code() == code, err.value.details()
    assert message in err.value.details()
    assert predict.Predict(make_request(), timeout=10).outputs  # still serving


def test_grpc_other_malformed(server):
    predict, models = server.stubs()
    req = make_request()
    req.output_filter.append("nope")
    with pytest.raises(grpc.RpcError) as err:
        predict.Predict(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "output tensor alias not found in signature: nope" in err.value.details()
    meta = get_model_metadata_pb2.GetModelMetadataRequest()
    meta.model_spec.name = "tiny"
    with pytest.raises(grpc.RpcError) as err:
        predict.GetModelMetadata(meta, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "nope"
    with pytest.raises(grpc.RpcError) as err:
        models.GetModelStatus(status, timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    status.model_spec.name = "tiny"
    status.model_spec.version.CopyFrom(wrappers_pb2.Int64Value(value=9))
    with pytest.raises(grpc.RpcError) as err:
        models.GetModelStatus(status, timeout=10)
    assert err.value.details() == "Could not find version 9 of model tiny"
    with pytest.raises(grpc.RpcError) as err:
        predict.Classify(classification_pb2.ClassificationRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "Classify is not supported" in err.value.details()


def test_grpc_long_message_is_cut(server):
    predict, _ = server.stubs()
    with pytest.raises(grpc.RpcError) as err:
        predict.Predict(make_request(name="x" * 3000), timeout=10)
    assert len(err.value.details()) == 1024


GOOD_ROW = {"user_id": "u1", "age": 3.0}
REST_CASES = {
    "unknown model": ("POST", "/v1/models/nope:predict", {"instances": [GOOD_ROW]}, None, 404,
                      "Servable not found for request: Latest(nope)"),
    "unknown version": ("GET", "/v1/models/tiny/versions/5", None, None, 404,
                        "Could not find version 5 of model tiny"),
    "unknown label": ("POST", "/v1/models/tiny/labels/gold:predict",
                      {"instances": [GOOD_ROW]}, None, 400,
                      "Unrecognized servable version label: gold"),
    "unknown signature": ("POST", "/v1/models/tiny:predict",
                          {"signature_name": "nope", "instances": [GOOD_ROW]}, None, 400,
                          'Serving signature name: "nope" not found'),
    "missing input": ("POST", "/v1/models/tiny:predict", {"instances": [{"user_id": "u"}]},
                      None, 400, "keys must be equal to: age,user_id"),
    "wrong dtype": ("POST", "/v1/models/tiny:predict",
                    {"instances": [{"user_id": "u", "age": "old"}]}, None, 400,
                    'JSON Value: "old" Type: String is not of expected type: float'),
    "wrong shape": ("POST", "/v1/models/tiny:predict",
                    {"inputs": {"user_id": [["u"]], "age": [1.0]}}, None, 400,
                    'Input "user_id": shape [1,1]'),
    "empty instances": ("POST", "/v1/models/tiny:predict", {"instances": []}, None, 400,
                        "No values in 'instances' array"),
    "both keys": ("POST", "/v1/models/tiny:predict", {"instances": [GOOD_ROW], "inputs": {}},
                  None, 400, "expecting only one of 'inputs' or 'instances'"),
    "bad json": ("POST", "/v1/models/tiny:predict", None, b"{not json", 400,
                 "JSON Parse error"),
    "empty body": ("POST", "/v1/models/tiny:predict", None, b"", 400,
                   "JSON Parse error: The document is empty"),
    "bad base64": ("POST", "/v1/models/tiny:predict",
                   {"instances": [{"user_id": {"b64": "@@not base64@@"}, "age": 1.0}]}, None,
                   400, "Unable to base64 decode"),
    "oversized body": ("POST", "/v1/models/tiny:predict", None,
                       b'{"instances": ["' + b"x" * 300000 + b'"]}', 400,
                       "exceeds the limit of 200000 bytes"),
    "unknown path": ("GET", "/v1/foo/bar", None, None, 400,
                     "Malformed request: GET /v1/foo/bar"),
    "unknown method": ("DELETE", "/v1/models/tiny", None, None, 400,
                       "Malformed request: DELETE /v1/models/tiny"),
    "classify": ("POST", "/v1/models/tiny:classify", {"examples": [{}]}, None, 501,
                 "classify is not supported"),
}


@pytest.mark.parametrize("case", sorted(REST_CASES))
def test_rest_malformed(server, case):
    method, path, body, raw, code, message = REST_CASES[case]
    status, answer = server.http(method, path, body=body, raw=raw)
    assert status == code, answer
    assert message in answer["error"], answer
    status, answer = server.http("POST", "/v1/models/tiny:predict", {"instances": [GOOD_ROW]})
    assert status == 200 and len(answer["predictions"]) == 1  # still serving


def test_prometheus_metrics(server):
    server.http("POST", "/v1/models/tiny:predict", {"instances": [GOOD_ROW]})
    status, text = server.http("GET", "/monitoring/prometheus/metrics")
    assert status == 200
    assert "# TYPE :tensorflow:serving:request_count counter" in text
    assert ':tensorflow:serving:request_count{model_name="tiny",status="OK"}' in text
    assert ':tensorflow:serving:request_count{model_name="nope",status="NOT_FOUND"}' in text
    # latency of successful requests only, with TF Serving's labels
    assert ':tensorflow:serving:request_latency_count{API="Predict",entrypoint="REST",' \
        'model_name="tiny"}' in text
    assert 'model_name="nope"}' not in text.split("request_latency", 1)[1]
