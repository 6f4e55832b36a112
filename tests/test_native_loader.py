"""The C++ SavedModel checker: TF's own loader (as in TF Serving) on tiny models.

Each model is saved from a tf.Module with explicit signatures, gets a warmup
file, and is run natively; the outputs must equal the in-process results. The
checker is compiled once per test run (conftest's `native_checker`).
"""
import json

import export  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow)
import numpy as np
import pytest
import tensorflow as tf

from export import native_loader
from export.native_loader import NativeLoadError, check_saved_model
from export.warmup import write_warmup_requests

pytestmark = pytest.mark.skipif(
    not native_loader.compiler_available(),
    reason="no C++ compiler (g++/c++ or $CXX) to build the native SavedModel checker",
)


@pytest.fixture(scope="session")
def checker(native_checker):
    """Cache directory holding the compiled checker (conftest's, built once per run)."""
    return native_checker.parent


def check(version_dir, cache, **kwargs):
    return check_saved_model(version_dir, cache_dir=cache, **kwargs)


# --------------------------------------------------------------------------
# Models

class Tower(tf.Module):
    """String id through a StaticHashTable into an embedding, scaled by a float."""

    def __init__(self):
        super().__init__()
        keys = tf.constant(["a", "b", "c"])
        self.table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(keys, tf.constant([0, 1, 2], tf.int64)), -1
        )
        self.lookup = tf.keras.layers.StringLookup(vocabulary=["x", "y"])
        self.embeddings = tf.Variable(np.arange(8, dtype=np.float32).reshape(4, 2) / 3.0)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None], tf.string, name="user_id"),
            tf.TensorSpec([None], tf.float32, name="age"),
        ]
    )
    def serve(self, user_id, age):
        ids = self.table.lookup(user_id) + 1  # OOV -> row 0
        embedding = tf.gather(self.embeddings, ids) * age[:, None]
        return {"embedding": embedding, "row": ids, "echo": tf.strings.upper(user_id)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="tag")])
    def tags(self, tag):
        return {"index": self.lookup(tag), "flag": tf.equal(tag, "x")}


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    module = Tower()
    version_dir = tmp_path_factory.mktemp("tower") / "1"
    tf.saved_model.save(
        module, str(version_dir), signatures={"serving_default": module.serve, "tags": module.tags}
    )
    return module, version_dir


def _python_outputs(fn, inputs):
    return {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in inputs.items()}).items()}


def _assert_same(native_output, expected):
    assert native_output["shape"] == list(expected.shape)
    values = np.array(native_output["values"]).reshape(expected.shape)
    if expected.dtype == object:  # strings come back decoded
        decoded = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(expected)
        assert values.tolist() == decoded.tolist()
    elif expected.dtype.kind == "f":
        np.testing.assert_array_equal(values.astype(expected.dtype), expected)
    else:
        np.testing.assert_array_equal(values, expected)


# --------------------------------------------------------------------------
# Tests

def test_build_is_cached(checker):
    first = native_loader.build_checker(checker)
    assert first.exists() and first.parent == checker
    assert native_loader.build_checker(checker) == first  # no rebuild
    # the default cache (exports' native check) is this run's one binary too
    assert native_loader.build_checker() == first
    assert [p.name for p in checker.iterdir()] == [first.name]


def test_tower_outputs_match_python(tower, checker):
    module, version_dir = tower
    serve_inputs = {
        "user_id": np.array(["a", "zz", "c", "b"]),
        "age": np.array([1.0, 2.5, 3.0, 0.5], np.float32),
    }
    tag_inputs = {"tag": np.array(["y", "x", "nope"], dtype=object)}
    write_warmup_requests(
        version_dir,
        "tower",
        [("serving_default", serve_inputs), ("tags", tag_inputs), ("", serve_inputs)],
    )
    results = check(version_dir, checker, max_values=1000)
    assert [r["index"] for r in results] == [0, 1, 2]
    assert [r["signature"] for r in results] == ["serving_default", "tags", "serving_default"]
    assert all(r["model"] == "tower" for r in results)

    expected = _python_outputs(module.serve, serve_inputs)
    for result in (results[0], results[2]):
        outputs = result["outputs"]
        assert sorted(outputs) == ["echo", "embedding", "row"]
        assert outputs["embedding"]["dtype"] == "float32"
        assert outputs["row"]["dtype"] == "int64"
        assert outputs["echo"]["dtype"] == "string"
        for alias, value in expected.items():
            _assert_same(outputs[alias], value)
            assert outputs[alias]["truncated"] is False

    expected_tags = _python_outputs(module.tags, tag_inputs)
    assert results[1]["outputs"]["flag"]["dtype"] == "bool"
    for alias, value in expected_tags.items():
        _assert_same(results[1]["outputs"][alias], value)


def test_large_outputs_are_truncated(tower, checker, tmp_path):
    _, version_dir = tower
    write_warmup_requests(
        version_dir, "tower",
        [("", {"user_id": np.array(["a"] * 50), "age": np.ones(50, np.float32)})],
    )
    (result,) = check(version_dir, checker, max_values=4)
    embedding = result["outputs"]["embedding"]
    assert embedding["shape"] == [50, 2]
    assert len(embedding["values"]) == 4 and embedding["truncated"] is True


def test_request_errors_are_reported(tower, checker):
    _, version_dir = tower
    write_warmup_requests(version_dir, "tower", [("", {"user": np.array(["a"])})])
    with pytest.raises(NativeLoadError, match="input alias 'user' is not in signature"):
        check(version_dir, checker)

    write_warmup_requests(version_dir, "tower", [("nope", {"tag": np.array(["a"])})])
    with pytest.raises(NativeLoadError, match="signature 'nope' not found"):
        check(version_dir, checker)

    write_warmup_requests(version_dir, "tower", [("", {"user_id": np.array(["a"]), "age": np.ones(1)})])
    with pytest.raises(NativeLoadError, match="'age' has dtype float64, signature expects float32"):
        check(version_dir, checker)


def test_missing_warmup_file(checker, tmp_path):
    module = Tower()
    version_dir = tmp_path / "1"
    tf.saved_model.save(module, str(version_dir), signatures=module.serve)
    with pytest.raises(NativeLoadError, match="no warmup file"):
        check(version_dir, checker)
    assert check(version_dir, checker, require_warmup=False) == []


def test_not_a_saved_model(checker, tmp_path):
    with pytest.raises(NativeLoadError, match="not a SavedModel directory"):
        check(tmp_path, checker)


def test_py_function_is_refused(checker, tmp_path):
    class PyFunc(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def serve(self, x):
            y = tf.py_function(lambda a: a * 2.0, [x], tf.float32)
            y.set_shape([None])
            return {"y": y}

    module = PyFunc()
    version_dir = tmp_path / "1"
    tf.saved_model.save(module, str(version_dir), signatures={"serving_default": module.serve})
    write_warmup_requests(version_dir, "pyfunc", [("", {"x": np.array([1.0, 2.0], np.float32)})])
    with pytest.raises(NativeLoadError, match="FAILED_PRECONDITION") as info:
        check(version_dir, checker)
    assert info.value.returncode not in (0, None)
    assert "Python interpreter" in str(info.value)


def test_scann_ops_library_found():
    path = native_loader.scann_ops_library()
    assert path is not None and path.name == "_scann_ops.so" and path.exists()


@pytest.fixture(scope="module")
def scann_model(tmp_path_factory):
    import scann  # noqa: F401  (registers the Scann>* ops before saving)
    import tensorflow_recommenders as tfrs

    rng = np.random.default_rng(7)
    candidates = rng.normal(size=(2000, 16)).astype(np.float32)
    ids = np.array([f"item{i}" for i in range(2000)])
    layer = tfrs.layers.factorized_top_k.ScaNN(
        k=5, num_leaves=20, num_leaves_to_search=5, num_reordering_candidates=50
    )
    layer.index(tf.constant(candidates), tf.constant(ids))

    class Retrieval(tf.Module):
        def __init__(self, index):
            super().__init__()
            self.index = index

        @tf.function(input_signature=[tf.TensorSpec([None, 16], tf.float32, name="query")])
        def serve(self, query):
            scores, item_ids = self.index(query)
            return {"scores": scores, "item_ids": item_ids}

    module = Retrieval(layer)
    version_dir = tmp_path_factory.mktemp("scann") / "1"
    tf.saved_model.save(
        module,
        str(version_dir),
        signatures={"serving_default": module.serve},
        options=tf.saved_model.SaveOptions(namespace_whitelist=["Scann"]),
    )
    queries = rng.normal(size=(3, 16)).astype(np.float32)
    write_warmup_requests(version_dir, "retrieval", [("serving_default", {"query": queries})])
    return module, version_dir, queries


def test_scann_model_runs_natively(scann_model, checker):
    module, version_dir, queries = scann_model
    (result,) = check(version_dir, checker, max_values=100)
    expected = _python_outputs(module.serve, {"query": queries})
    outputs = result["outputs"]
    assert outputs["item_ids"]["dtype"] == "string" and outputs["item_ids"]["shape"] == [3, 5]
    assert outputs["scores"]["dtype"] == "float32" and outputs["scores"]["shape"] == [3, 5]
    assert np.array(outputs["item_ids"]["values"]).reshape(3, 5).tolist() == [
        [v.decode() for v in row] for row in expected["item_ids"]
    ]
    np.testing.assert_allclose(
        np.array(outputs["scores"]["values"]).reshape(3, 5), expected["scores"], rtol=1e-6
    )


def test_scann_model_needs_the_op_library(scann_model, checker):
    _, version_dir, _ = scann_model
    with pytest.raises(NativeLoadError, match="Scann>"):
        check(version_dir, checker, load_scann_ops=False)


def test_command_line(tower, checker, capsys):
    with pytest.raises(SystemExit) as info:
        native_loader.main(["--help"])
    assert info.value.code == 0
    assert "warmup" in capsys.readouterr().out

    module, version_dir = tower
    write_warmup_requests(
        version_dir, "tower", [("", {"user_id": np.array(["b"]), "age": np.ones(1, np.float32)})]
    )
    assert native_loader.main([str(version_dir), "--cache-dir", str(checker)]) == 0
    captured = capsys.readouterr()
    line = json.loads(captured.out.strip())
    assert line["dir"] == str(version_dir) and line["outputs"]["row"]["values"] == [2]
    assert "OK (1 warmup requests)" in captured.err


def test_corrupt_or_empty_warmup_file(tower, checker):
    _, version_dir = tower
    path = write_warmup_requests(
        version_dir, "tower", [("", {"user_id": np.array(["a"]), "age": np.ones(1, np.float32)})]
    )
    data = path.read_bytes()
    path.write_bytes(data[:-6])  # truncated record
    with pytest.raises(NativeLoadError, match="reading record 0"):
        check(version_dir, checker)
    path.write_bytes(b"")
    with pytest.raises(NativeLoadError, match="no warmup records"):
        check(version_dir, checker)
    assert check(version_dir, checker, require_warmup=False) == []
