"""TF Serving warmup file: format, dtypes, round trip and the 1000-record cap."""
import export  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow)
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from export.warmup import (
    MAX_WARMUP_RECORDS,
    read_warmup_requests,
    warmup_path,
    write_warmup_requests,
)


def test_round_trip_keeps_model_signature_dtypes_and_values(tmp_path):
    requests = [
        (
            "serving_default",
            {
                "user_id": np.array(["u1", "ü2", ""]),  # numpy unicode
                "genres": np.array([b"Action|Comedy", b"Drama"], dtype=object),
                "age": np.array([21.5, 40.0], dtype=np.float32),
                "count": np.array([[1, 2], [3, 4]], dtype=np.int64),
            },
        ),
        ("retrieve_excluding", {"seen": np.array([["a", ""], ["b", "c"]], dtype=object)}),
    ]
    path = write_warmup_requests(tmp_path, "query_tower", requests)
    assert path == tmp_path / "assets.extra" / "tf_serving_warmup_requests"
    assert path == warmup_path(tmp_path)

    logs = read_warmup_requests(path)
    assert len(logs) == 2
    assert all(isinstance(log, prediction_log_pb2.PredictionLog) for log in logs)
    assert all(log.WhichOneof("log_type") == "predict_log" for log in logs)

    first = logs[0].predict_log.request
    assert first.model_spec.name == "query_tower"
    assert first.model_spec.signature_name == "serving_default"
    assert set(first.inputs) == {"user_id", "genres", "age", "count"}
    assert first.inputs["user_id"].dtype == tf.string.as_datatype_enum
    assert first.inputs["genres"].dtype == tf.string.as_datatype_enum
    assert first.inputs["age"].dtype == tf.float32.as_datatype_enum
    assert first.inputs["count"].dtype == tf.int64.as_datatype_enum
    assert tf.make_ndarray(first.inputs["user_id"]).tolist() == ["u1".encode(), "ü2".encode(), b""]
    assert tf.make_ndarray(first.inputs["genres"]).tolist() == [b"Action|Comedy", b"Drama"]
    np.testing.assert_array_equal(tf.make_ndarray(first.inputs["age"]), [21.5, 40.0])
    np.testing.assert_array_equal(tf.make_ndarray(first.inputs["count"]), [[1, 2], [3, 4]])

    second = logs[1].predict_log.request
    assert second.model_spec.signature_name == "retrieve_excluding"
    assert tf.make_ndarray(second.inputs["seen"]).shape == (2, 2)

    # A version directory works as well as the file path.
    assert len(read_warmup_requests(tmp_path)) == 2


def test_empty_signature_name_is_kept(tmp_path):
    write_warmup_requests(tmp_path, "m", [("", {"x": np.zeros(1, np.float32)})])
    (log,) = read_warmup_requests(tmp_path)
    assert log.predict_log.request.model_spec.signature_name == ""


def test_record_cap(tmp_path):
    one = ("", {"x": np.zeros(1, np.float32)})
    write_warmup_requests(tmp_path / "ok", "m", [one] * MAX_WARMUP_RECORDS)
    assert len(read_warmup_requests(tmp_path / "ok")) == MAX_WARMUP_RECORDS == 1000

    with pytest.raises(ValueError, match="at most 1000"):
        write_warmup_requests(tmp_path / "too_many", "m", [one] * (MAX_WARMUP_RECORDS + 1))
    assert not warmup_path(tmp_path / "too_many").exists()


def test_accepts_a_generator(tmp_path):
    gen = (("", {"x": np.full(2, i, np.float32)}) for i in range(3))
    write_warmup_requests(tmp_path, "m", gen)
    logs = read_warmup_requests(tmp_path)
    assert [tf.make_ndarray(l.predict_log.request.inputs["x"])[0] for l in logs] == [0, 1, 2]
