"""Lazy Adam: sparse (embedding) gradients move only the rows they touch.

Keras's Adam decays the first and second moments of *every* row of an
embedding table on every step, even for a sparse gradient
(``m.assign_add(-m * (1 - beta_1))`` over the whole table), so every row
that was ever trained keeps moving, by momentum alone, long after its id was
last seen. For a model update that is wrong twice over: an incremental
update on six hours of clicks would move the vector of every item ever
clicked (and so every row of the served index would have to be re-embedded,
docs/UPDATES.md), and each step costs O(rows x dim) instead of
O(batch x dim). ``LazyAdam`` (the algorithm of TensorFlow Addons'
``LazyAdam``, which does not run on our stack) updates the moments and the
variable on the gradient's rows only; dense gradients (every non-embedding
weight) get Keras's Adam unchanged. Its slots and config are Adam's, so an
Adam checkpoint restores into it and back.
"""
from __future__ import annotations

import tensorflow as tf


@tf.keras.utils.register_keras_serializable(package="twotower")
class LazyAdam(tf.keras.optimizers.Adam):
    """Adam whose sparse updates touch only the rows in the gradient.

    For an ``IndexedSlices`` gradient with rows ``i`` (deduplicated by
    ``apply_gradients``) and values ``g`` [n, d]:
    ``m[i] = b1 m[i] + (1 - b1) g``, ``v[i] = b2 v[i] + (1 - b2) g^2``,
    ``w[i] -= alpha m[i] / (sqrt(v[i]) + eps)`` with Adam's bias-corrected
    ``alpha``; every other row of ``w``, ``m`` and ``v`` is left as it is.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.amsgrad:
            raise ValueError("LazyAdam: amsgrad is not supported (its running maximum "
                             "is over every row)")

    def update_step(self, gradient, variable):
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        alpha = (tf.cast(self.learning_rate, dtype) * tf.sqrt(1 - tf.pow(beta_2, step))
                 / (1 - tf.pow(beta_1, step)))
        epsilon = self.epsilon * tf.sqrt(1 - tf.pow(beta_2, step)) if self.adaptive_epsilon \
            else self.epsilon
        key = self._var_key(variable)
        m = self._momentums[self._index_dict[key]]
        v = self._velocities[self._index_dict[key]]
        rows, values = gradient.indices, gradient.values
        m_rows = beta_1 * tf.gather(m, rows) + (1 - beta_1) * values
        v_rows = beta_2 * tf.gather(v, rows) + (1 - beta_2) * tf.square(values)
        m.scatter_update(tf.IndexedSlices(m_rows, rows))
        v.scatter_update(tf.IndexedSlices(v_rows, rows))
        variable.scatter_sub(tf.IndexedSlices(alpha * m_rows / (tf.sqrt(v_rows) + epsilon),
                                              rows))
