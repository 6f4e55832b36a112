"""Attention / recency pooling of history embeddings, against hand-computed weights."""
import numpy as np
import pytest
import tensorflow as tf

from trainer.history_attention import AttentiveHistoryPooling


def _ragged(rows):
    flat = [v for r in rows for v in r]
    return tf.RaggedTensor.from_row_lengths(tf.constant(np.asarray(flat, np.float32)
                                                        .reshape(-1, 2)),
                                            [len(r) for r in rows])


def test_recency_weights_the_newest_items_by_their_learned_bias():
    layer = AttentiveHistoryPooling(max_items=2, pooling="recency")
    vectors = _ragged([[[1, 0], [0, 1]], [], [[2, 2], [4, 0], [0, 4]]])
    layer(vectors)
    layer.recency.assign([np.log(3.0), 0.0])  # newest x3; position >= 1 shares the last bias
    out = layer(vectors).numpy()
    # row 0: oldest [1, 0] weight 1/4, newest [0, 1] weight 3/4
    np.testing.assert_allclose(out[0], [0.25, 0.75], rtol=1e-6)
    np.testing.assert_array_equal(out[1], [0.0, 0.0])  # no history
    # row 2: weights 1/5, 1/5, 3/5 (oldest to newest)
    np.testing.assert_allclose(out[2], [0.2 * 2 + 0.2 * 4, 0.2 * 2 + 0.6 * 4], rtol=1e-6)


def test_attention_scores_match_a_numpy_softmax():
    layer = AttentiveHistoryPooling(max_items=4, pooling="attention", attention_units=3)
    rows = [[[1, 0], [0, 1], [1, 1]], [[3, -1]]]
    vectors = _ragged(rows)
    layer(vectors)
    w, b = layer.key.kernel.numpy(), layer.key.bias.numpy()
    v, r = layer.score.numpy(), np.array([0.5, -0.25, 0.1, 0.0], np.float32)
    layer.recency.assign(r)
    out = layer(vectors).numpy()
    for row, got in zip(rows, out):
        e = np.asarray(row, np.float32)
        logits = np.tanh(e @ w + b) @ v + r[np.arange(len(e))[::-1]]
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
        np.testing.assert_allclose(got, weights @ e, rtol=1e-5)


def test_gradients_reach_the_shared_embeddings_and_config_round_trips():
    table = tf.Variable(tf.random.normal([5, 2], seed=1))
    layer = AttentiveHistoryPooling(max_items=3)
    ids = tf.ragged.constant([[1, 2], [4]])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(tf.ragged.map_flat_values(tf.gather, table, ids)))
    grad = tf.convert_to_tensor(tape.gradient(loss, table))
    assert np.abs(grad.numpy()[[1, 2, 4]]).sum() > 0 and not grad.numpy()[[0, 3]].any()
    clone = AttentiveHistoryPooling.from_config(layer.get_config())
    assert (clone.max_items, clone.pooling, clone.attention_units) == (3, "attention", 32)
    with pytest.raises(ValueError, match="pooling must be 'attention' or 'recency'"):
        AttentiveHistoryPooling(3, pooling="max")
