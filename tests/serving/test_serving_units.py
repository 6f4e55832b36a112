"""Fast unit tests of the pure pieces (no server, no model)."""
import os

import grpc
import numpy as np
import pytest
from google.protobuf import text_format
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.config import file_system_storage_path_source_pb2 as fs_pb2

from serving.batching import BatchingOptions, merge_inputs, pad_rows
from serving.config_protos import BatchingParameters
from serving.errors import ServingError, truncate
from serving.json_tensor import parse_body, request_arrays
from serving.signature import Signature, TensorSpec
from serving.tensors import from_numpy, to_numpy
from serving.version_policy import aspired_versions, list_versions

Policy = fs_pb2.FileSystemStoragePathSourceConfig.ServableVersionPolicy


def test_list_versions_ignores_non_numeric_and_incomplete(tmp_path):
    for name in ("1", "7", "tmp", "12"):
        (tmp_path / name).mkdir()
    for name in ("1", "7", "tmp"):
        (tmp_path / name / "saved_model.pb").write_bytes(b"x")
    assert sorted(list_versions(str(tmp_path))) == [1, 7]   # 12 has no saved_model.pb yet


def test_version_policies():
    versions = {1: "a", 3: "b", 7: "c"}
    assert aspired_versions(None, versions) == {7}
    assert aspired_versions(text_format.Parse("latest { num_versions: 2 }", Policy()),
                            versions) == {3, 7}
    assert aspired_versions(text_format.Parse("all {}", Policy()), versions) == {1, 3, 7}
    assert aspired_versions(text_format.Parse("specific { versions: 1 versions: 9 }",
                                              Policy()), versions) == {1}


def test_batching_options_from_text_proto():
    params = text_format.Parse(
        "max_batch_size { value: 8 } batch_timeout_micros { value: 100 } "
        "allowed_batch_sizes: 2 allowed_batch_sizes: 8", BatchingParameters())
    opts = BatchingOptions.from_proto(params)
    assert (opts.max_batch_size, opts.batch_timeout_micros) == (8, 100)
    assert [opts.padded_size(n) for n in (1, 2, 3, 8)] == [2, 2, 8, 8]
    bad = text_format.Parse("max_batch_size { value: 8 } allowed_batch_sizes: 4", BatchingParameters())
    with pytest.raises(ServingError):
        BatchingOptions.from_proto(bad)


class _Task:
    def __init__(self, **arrays):
        self.arrays = arrays


def _sig():
    sig = Signature.__new__(Signature)
    sig.inputs = {
        "seen": TensorSpec("seen", "s:0", types_pb2.DT_STRING, (-1, -1), object),
        "x": TensorSpec("x", "x:0", types_pb2.DT_FLOAT, (-1, -1), np.float32),
    }
    return sig


def test_merge_pads_string_rank2_inputs_and_refuses_others():
    a = _Task(seen=np.array([[b"i1"]], dtype=object), x=np.zeros((1, 2), np.float32))
    b = _Task(seen=np.array([[b"i2", b"i3"]], dtype=object), x=np.ones((1, 2), np.float32))
    merged = merge_inputs([a, b], _sig(), pad_variable_length=False)
    assert merged["seen"].tolist() == [[b"i1", b""], [b"i2", b"i3"]]
    c = _Task(seen=np.array([[b"i1"]], dtype=object), x=np.zeros((1, 3), np.float32))
    assert merge_inputs([a, c], _sig(), pad_variable_length=False) is None
    assert merge_inputs([a, c], _sig(), pad_variable_length=True)["x"].shape == (2, 3)
    padded = pad_rows({"x": np.array([[1.0], [2.0]])}, 2, 4)
    assert padded["x"][:, 0].tolist() == [1.0, 2.0, 1.0, 1.0]


def test_tensor_proto_round_trip_and_broadcast():
    proto = from_numpy(np.array([[1.5, 2.5]], np.float32), tensor_pb2.TensorProto())
    assert list(proto.float_val) == [1.5, 2.5] and not proto.tensor_content
    assert to_numpy(proto, "x").tolist() == [[1.5, 2.5]]
    one = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[3.0])
    one.tensor_shape.dim.add(size=3)
    assert to_numpy(one, "x").tolist() == [3.0, 3.0, 3.0]
    many = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0, 2.0])
    many.tensor_shape.dim.add(size=1)
    with pytest.raises(ServingError):
        to_numpy(many, "x")


def test_json_single_input_plain_list_and_errors():
    sig = Signature.__new__(Signature)
    sig.key = "serving_default"
    sig.inputs = {"x": TensorSpec("x", "x:0", types_pb2.DT_FLOAT, (-1,), np.float32)}
    arrays, fmt = request_arrays(parse_body(b'{"instances": [1, 2.5]}'), sig)
    assert fmt == "row" and arrays["x"].tolist() == [1.0, 2.5]
    with pytest.raises(ServingError, match="without loss of precision"):
        request_arrays(parse_body(b'{"instances": [16777217]}'), sig)
    with pytest.raises(ServingError, match="Is not object"):
        parse_body(b"[1]")
    with pytest.raises(ServingError, match="Missing 'inputs' or 'instances' key"):
        request_arrays({}, sig)


def test_truncate():
    assert len(truncate("x" * 5000)) == 1024


def test_manager_freezes_loaded_versions_and_reclaims_unloaded_ones(tmp_path):
    """Loaded versions leave the GC's reach; an unloaded one's cycles are freed."""
    import gc
    import weakref

    from tensorflow_serving.config import model_server_config_pb2

    from serving.manager import ServableManager

    class CyclicServable:   # like a tf.Graph: objects that reference each other
        def __init__(self):
            self.me = self

        def close(self):
            pass

    loaded = {}

    def load(name, version, path):
        loaded[version] = weakref.ref(servable := CyclicServable())
        return servable

    for v in (1, 2):
        (tmp_path / str(v)).mkdir()
    (tmp_path / "1" / "saved_model.pb").write_bytes(b"x")
    config = model_server_config_pb2.ModelConfigList()
    config.config.add(name="m", base_path=str(tmp_path), model_platform="tensorflow")
    manager = ServableManager(load, poll_seconds=0)
    try:
        manager.set_config(config)
        manager.poll_once()
        assert gc.get_freeze_count() > 0
        (tmp_path / "2" / "saved_model.pb").write_bytes(b"x")
        manager.poll_once()   # loads 2, then unloads 1
        assert [v for v, _, _ in manager.status("m")] == [2, 1]
        assert loaded[1]() is None and loaded[2]() is not None
    finally:
        manager.unload_all()
        gc.unfreeze()


def test_event_loop_choice():
    import asyncio

    from serving.loop_thread import new_event_loop

    uvloop = pytest.importorskip("uvloop")
    for kind, expected in (("auto", uvloop.Loop), ("uvloop", uvloop.Loop),
                           ("asyncio", asyncio.BaseEventLoop)):
        loop = new_event_loop(kind)
        try:
            assert isinstance(loop, expected), kind
            assert (kind == "asyncio") != isinstance(loop, uvloop.Loop)
            assert loop.run_until_complete(asyncio.sleep(0, result=kind)) == kind
        finally:
            loop.close()
    with pytest.raises(ValueError, match="event loop must be one of"):
        new_event_loop("trio")


def test_model_config_checked_as_tf_serving_checks_it(tmp_path):
    from tensorflow_serving.config import model_server_config_pb2

    from serving.config import single_model_config
    from serving.manager import validate_config

    def check(**fields):
        config = model_server_config_pb2.ModelConfigList()
        config.config.add(**{"name": "m", "base_path": str(tmp_path),
                             "model_platform": "tensorflow", **fields})
        validate_config(config)
        return config

    check()
    check(model_platform="", model_type=model_server_config_pb2.TENSORFLOW)
    cases = {
        "Expected model m to have an absolute path or URI; got base_path()=models/m":
            dict(base_path="models/m"),
        "Illegal setting neither model_type(deprecated) nor model_platform.":
            dict(model_platform=""),
        "unsupported model_platform 'pytorch'": dict(model_platform="pytorch"),
    }
    for message, fields in cases.items():
        with pytest.raises(ServingError) as err:
            check(**fields)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.message
    twice = check()
    twice.config.add(name="m", base_path=str(tmp_path), model_platform="tensorflow")
    with pytest.raises(ServingError, match="Illegal to list model m multiple times"):
        validate_config(twice)
    # --model_base_path may be relative: it is resolved against the working directory
    [model] = single_model_config("m", "models/m").model_config_list.config
    assert model.base_path == os.path.abspath("models/m")


def test_batching_parameters_file_needs_enable_batching(tmp_path):
    from serving.cli import build_parser, options_from_args

    params = tmp_path / "batching.config"
    params.write_text("max_batch_size { value: 8 }")
    args = build_parser().parse_args(["--model_base_path=/models/m",
                                      f"--batching_parameters_file={params}"])
    with pytest.raises(SystemExit, match="batching_parameters_file is set without setting "
                                         "server_options.enable_batching to true"):
        options_from_args(args)
    args.enable_batching = True
    assert options_from_args(args).batching_options.max_batch_size == 8


def test_signature_method_name_checked_like_tf_serving():
    from tensorflow.core.protobuf import meta_graph_pb2

    sig_def = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
    Signature("serving_default", sig_def).check_method()
    sig_def.method_name = "my/own/method"
    with pytest.raises(ServingError) as err:
        Signature("serving_default", sig_def).check_method()
    assert err.value.code == grpc.StatusCode.INTERNAL
    assert err.value.message.endswith("}. Was: my/own/method")


def test_client_pads_seen_ids_so_tf_serving_batching_pads_with_empty():
    """TF Serving's batcher pads a request's narrower seen_item_ids with its first
    element: the client keeps "" there, so merged requests lose nothing extra."""
    from serving.client.tensors import pad_seen_ids

    out = pad_seen_ids([["a", "b"], ["c"]])
    assert out[0, 0] == b"" and set(out[0]) == {b"", b"a", b"b"}
    assert out.shape == (2, 3) and list(out[1]) == [b"c", b"", b""]
    out = pad_seen_ids([["a"], ["c", "d", "e"]])      # row 0 narrower: no extra column
    assert out.shape == (2, 3) and out[0, 0] == b"" and b"a" in set(out[0])
    assert pad_seen_ids([[], ["x"]])[0, 0] == b""


def test_client_converts_features_without_silent_loss():
    from tensorflow.core.framework import types_pb2

    from serving.client import FeatureError
    from serving.client.tensors import feature_column as _column
    from serving.client.transport import retryable as _retryable

    assert _column("n", [31.0, "4"], types_pb2.DT_INT64).tolist() == [31, 4]
    with pytest.raises(FeatureError, match="feature 'n' expects DT_INT64, got 31.7"):
        _column("n", [31.7], types_pb2.DT_INT64)
    assert _column("b", ["true", "0", 1], types_pb2.DT_BOOL).tolist() == [True, False, True]
    with pytest.raises(FeatureError, match="got 'yes'"):
        _column("b", ["yes"], types_pb2.DT_BOOL)
    age = _column("age", ["31", "", None], types_pb2.DT_FLOAT)   # missing: NaN = unknown
    assert age[0] == 31.0 and np.isnan(age[1:]).all()
    assert _retryable("UNAVAILABLE", "") and _retryable("RESOURCE_EXHAUSTED", "queue is full")
    assert not _retryable("RESOURCE_EXHAUSTED",
                          "Received message larger than max (9 vs. 4)")
    assert not _retryable("INVALID_ARGUMENT", "")


def test_client_refetches_signatures_after_a_new_version_changed_them():
    """A long-lived client whose cached signature went stale (a hot swap added a
    feature) fetches the signatures again and retries once; an unchanged
    signature re-raises the original error."""
    from tensorflow.core.framework import types_pb2

    from serving.client import FeatureError, InputSpec, RetrievalClient

    def sigs(features):
        inputs = {f: InputSpec(types_pb2.DT_STRING, (-1,)) for f in features}
        outputs = {"item_ids": InputSpec(types_pb2.DT_STRING, (-1, 2)),
                   "scores": InputSpec(types_pb2.DT_FLOAT, (-1, 2))}
        return {"serving_default": inputs}, {"serving_default": outputs}

    served = {"now": sigs(["user_id"])}
    fetches, sent = [], []
    client = RetrievalClient("localhost:1", transport="rest")
    client._fetch_signatures = lambda: fetches.append(1) or served["now"]
    client.predict = lambda inputs, sig, output_filter=(): sent.append(sorted(inputs)) or {
        "item_ids": np.array([[b"i1", b""]], dtype=object),
        "scores": np.array([[0.5, -np.inf]], np.float32)}
    assert client.recommend({"user_id": "u"}) == [("i1", 0.5)]
    served["now"] = sigs(["user_id", "country"])        # version 2 takes a new feature
    assert client.recommend({"user_id": "u", "country": "de"}) == [("i1", 0.5)]
    assert len(fetches) == 2 and sent[-1] == ["country", "user_id"]
    with pytest.raises(FeatureError, match="unknown feature"):   # a real mistake
        client.recommend({"user_id": "u", "country": "de", "colour": "red"})
    assert len(fetches) == 3
