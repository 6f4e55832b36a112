"""A TFRS ScaNN SavedModel loads and runs through the session-based Servable."""
import numpy as np
import pytest
import tensorflow as tf

tfrs = pytest.importorskip("tensorflow_recommenders")
pytest.importorskip("scann")


def test_scann_savedmodel_runs_session_based(tmp_path):
    from serving.servable import Servable

    query = tf.keras.Sequential([tf.keras.layers.StringLookup(vocabulary=["a", "b"]),
                                 tf.keras.layers.Embedding(3, 8)])
    index = tfrs.layers.factorized_top_k.ScaNN(query, k=5, num_leaves=4,
                                               num_leaves_to_search=2,
                                               num_reordering_candidates=10)
    items = tf.constant([f"i{i}" for i in range(200)])
    index.index_from_dataset(tf.data.Dataset.from_tensor_slices(
        (items, tf.random.stateless_normal([200, 8], seed=(1, 2)))).batch(50))

    class Retrieval(tf.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user_id")])
        def serve(self, user_id):
            scores, ids = self.layer(user_id)
            return {"scores": scores, "item_ids": ids}

    module = Retrieval(index)
    path = str(tmp_path / "1")
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve},
                        options=tf.saved_model.SaveOptions(namespace_whitelist=["Scann"]))
    want = module.serve(tf.constant(["a", "b"]))

    servable = Servable("retrieval", 1, path).load()
    try:
        sig = servable.signatures["serving_default"]
        got = servable.run(sig, {"user_id": np.array([b"a", b"b"], dtype=object)},
                           ("item_ids", "scores"))
    finally:
        servable.close()
    np.testing.assert_array_equal(got["item_ids"], want["item_ids"].numpy())
    np.testing.assert_allclose(got["scores"], want["scores"].numpy(), rtol=1e-5)
