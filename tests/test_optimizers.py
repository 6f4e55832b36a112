"""LazyAdam: sparse gradients move only their rows, by Adam's formula;
dense gradients are Keras's Adam exactly; config round trip."""
import numpy as np
import tensorflow as tf

from trainer.optimizers import LazyAdam


def _rows(values, rows, shape=(4, 3)):
    return tf.IndexedSlices(tf.constant(values, tf.float32), tf.constant(rows),
                            tf.constant(shape))


def test_sparse_steps_move_only_the_gradients_rows():
    table = tf.Variable(np.arange(12, dtype=np.float32).reshape(4, 3))
    opt = LazyAdam(learning_rate=0.1)
    # step 1: row 1 twice (summed to [2, 3, 4]); Adam's first step is lr * sign(g)
    opt.apply_gradients([(_rows([[1, 2, 3], [1, 1, 1]], [1, 1]), table)])
    want = np.arange(12, dtype=np.float32).reshape(4, 3)
    want[1] -= 0.1
    np.testing.assert_allclose(table.numpy(), want, rtol=1e-6)
    # step 2: row 2 only; row 1 keeps its value although its momentum is not zero.
    # Row 2's moments are fresh: m = 0.1 g, v = 0.001 g^2, so the step is
    # lr * sqrt(1 - 0.999^2) / (1 - 0.9^2) * 0.1 / sqrt(0.001) = 0.0744157
    opt.apply_gradients([(_rows([[1, 2, 3]], [2]), table)])
    want[2] -= 0.1 * np.sqrt(1 - 0.999 ** 2) / (1 - 0.9 ** 2) * 0.1 / np.sqrt(0.001)
    np.testing.assert_allclose(table.numpy(), want, rtol=1e-5)
    # Keras's Adam would have moved row 1 again on step 2, by its momentum
    dense = tf.Variable(np.arange(12, dtype=np.float32).reshape(4, 3))
    adam = tf.keras.optimizers.Adam(learning_rate=0.1)
    adam.apply_gradients([(_rows([[1, 2, 3], [1, 1, 1]], [1, 1]), dense)])
    adam.apply_gradients([(_rows([[1, 2, 3]], [2]), dense)])
    assert (dense.numpy()[1] < want[1] - 1e-3).all()


def test_dense_gradients_are_adams():
    a = tf.Variable([[1.0, -2.0], [0.5, 3.0]])
    b = tf.Variable(a.numpy())
    lazy, adam = LazyAdam(learning_rate=0.01), tf.keras.optimizers.Adam(learning_rate=0.01)
    for g in ([[0.3, -1.0], [2.0, 0.1]], [[-0.2, 0.4], [0.0, 1.5]]):
        lazy.apply_gradients([(tf.constant(g), a)])
        adam.apply_gradients([(tf.constant(g), b)])
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_config_round_trip_through_keras_serialization():
    opt = LazyAdam(learning_rate=0.02, beta_1=0.8)
    again = tf.keras.optimizers.deserialize(tf.keras.optimizers.serialize(opt))
    assert type(again) is LazyAdam
    assert again.get_config() == opt.get_config()
