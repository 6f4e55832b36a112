"""Streaming frequency estimation (Yi et al. 2019, Algorithm 2) for logQ."""
import numpy as np
import pytest
import tensorflow as tf

from trainer.frequency import StreamingFrequency


def _replay(layer, batches):
    """Every row of ``batches`` [T, B] (int ids) as one training step, in one graph."""
    @tf.function
    def run(batches):
        for i in tf.range(tf.shape(batches)[0]):
            layer(tf.strings.as_string(batches[i]), training=True)
    run(tf.constant(batches, tf.int64))


def _estimate(layer, ids):
    return layer(tf.strings.as_string(tf.constant(ids, tf.int64))).numpy()


@pytest.mark.parametrize("hashes", [1, 2])
def test_tracks_known_frequencies_of_a_zipf_stream(hashes):
    n, batch, steps = 2000, 128, 15_000
    q = 1 / np.arange(1, n + 1)
    q /= q.sum()
    copies = batch * q                       # expected copies per batch
    stream = np.random.default_rng(0).choice(n, size=(steps, batch), p=q)
    layer = StreamingFrequency(num_buckets=20_000, num_hashes=hashes, alpha=0.01)
    _replay(layer, stream)
    estimate = _estimate(layer, np.arange(n))
    often = copies >= 1 / 50                 # seen at least once every 50 steps
    error = np.abs(estimate[often] - copies[often]) / copies[often]
    assert often.sum() > 700
    assert np.median(error) <= 0.15
    # the head, many copies per batch, is not saturated at 1 (TFRS #635)
    np.testing.assert_allclose(estimate[:5], copies[:5], rtol=0.06)
    assert int(layer.step.numpy()) == steps


def test_k_copies_in_one_batch_count_as_k():
    """Item 0 3x in every batch, item 1 once every 4th step (first at step 1):
    exactly 3 and 1/4 copies a batch (the paper's once-per-step rule gives 1
    for item 0)."""
    layer = StreamingFrequency(num_buckets=1000, num_hashes=1, alpha=0.1)
    # -1 pads the batches without item 1 (a third id, never read here)
    _replay(layer, [[0, 0, 0, 1 if t % 4 == 1 else -1] for t in range(1, 121)])
    np.testing.assert_allclose(_estimate(layer, [0, 1]), [3.0, 0.25], rtol=1e-6)


def test_running_mean_until_one_over_alpha_sightings_then_moving_average():
    """Hand-computed, alpha = 1/4: item 0 at steps 1, 2, 4, 7, 8 with 2, 4, 3,
    1, 2 copies. Copies C: 2, then the mean 3, 3, then rate 1/4: 2.5, 2.375.
    Gaps B: min(t, initial_gap) = 1 at the first sighting, then the gaps
    1 (mean 1), 2 (1.5), 3 (2.0), then rate 1/4 for gap 1: 1.75."""
    layer = StreamingFrequency(num_buckets=1000, num_hashes=1, alpha=0.25)
    buckets = layer.buckets(tf.constant(["0", "-1"])).numpy()
    assert buckets[0, 0] != buckets[0, 1]
    copies = {1: 2, 2: 4, 4: 3, 7: 1, 8: 2}
    _replay(layer, [[0] * copies.get(t, 0) + [-1] * (4 - copies.get(t, 0))
                    for t in range(1, 9)])
    assert _estimate(layer, [0])[0] == pytest.approx(2.375 / 1.75, rel=1e-6)
    bucket = buckets[0, 0]
    assert layer.copies.numpy()[0, bucket] == pytest.approx(2.375, rel=1e-6)
    assert layer.gap.numpy()[0, bucket] == pytest.approx(1.75, rel=1e-6)
    assert layer.sightings.numpy()[0, bucket] == 5


def test_first_sighting_takes_the_steps_so_far_at_most_initial_gap():
    layer = StreamingFrequency(num_buckets=1000, num_hashes=2, alpha=0.01, initial_gap=100.0)
    assert _estimate(layer, [7])[0] == pytest.approx(0.01)    # never seen: 1 / initial_gap
    _replay(layer, [[0]] * 3 + [[1]])           # step 4: in none of the 3 steps before
    assert _estimate(layer, [1])[0] == pytest.approx(1 / 4)
    _replay(layer, [[0]] * 1000 + [[2]])        # step 1005: capped at initial_gap
    assert _estimate(layer, [2])[0] == pytest.approx(0.01)
    _replay(layer, [[0], [2]])                  # steps 1006, 1007: the measured gap 2
    assert _estimate(layer, [2])[0] == pytest.approx(1 / 2)


def test_one_day_of_the_drifting_world_is_tracked_from_the_start():
    """27 steps (3 epochs of 9K clicks at batch 1024) are far fewer than 1 / alpha:
    the running-mean warm-up still gives each item its counted copies per batch,
    where a moving average from initial_gap stayed within 0.01-0.1 (the static
    counts: 0.1-32)."""
    n, batch = 1000, 1024
    q = 1 / np.arange(1, n + 1) ** 0.9
    q /= q.sum()
    rng = np.random.default_rng(3)
    day = rng.choice(n, size=9 * batch, p=q)
    layer = StreamingFrequency(num_buckets=100_000, num_hashes=2, alpha=0.01)
    _replay(layer, np.concatenate([rng.permutation(day).reshape(9, batch)
                                   for _ in range(3)]))
    counted = np.bincount(day, minlength=n) / 9     # copies per batch in the data
    head = counted >= 1
    estimate = _estimate(layer, np.arange(n))
    assert head.sum() > 100
    error = np.abs(estimate[head] - counted[head]) / counted[head]
    assert np.median(error) <= 0.15
    np.testing.assert_allclose(estimate[:3], counted[:3], rtol=0.05)


@pytest.mark.parametrize("before, after, within", [(0.5, 2.0, 5), (2.0, 0.5, 10)])
def test_follows_a_step_change_within_a_few_one_over_alpha_steps(before, after, within):
    """Item 0's expected copies per batch jump (or fall) 4x at step 3000; the
    estimate is within 15 % of the new value ``within`` / alpha steps later
    (it moves per sighting, so a falling item takes longer)."""
    alpha, batch, n = 0.01, 64, 500
    rng = np.random.default_rng(1)

    def stream(steps, copies):
        q = np.full(n, (1 - copies / batch) / (n - 1))
        q[0] = copies / batch
        return rng.choice(n, size=(steps, batch), p=q)

    layer = StreamingFrequency(num_buckets=5000, num_hashes=2, alpha=alpha)
    _replay(layer, stream(3000, before))
    assert _estimate(layer, [0])[0] == pytest.approx(before, rel=0.15)
    _replay(layer, stream(int(within / alpha), after))
    assert _estimate(layer, [0])[0] == pytest.approx(after, rel=0.15)


def test_checkpoint_round_trip_restores_exactly(tmp_path):
    rng = np.random.default_rng(2)
    layer = StreamingFrequency(num_buckets=500, num_hashes=3, alpha=0.05)
    _replay(layer, rng.integers(0, 300, size=(200, 32)))
    path = tf.train.Checkpoint(frequency=layer).save(str(tmp_path / "ckpt"))

    restored = StreamingFrequency(num_buckets=500, num_hashes=3, alpha=0.05)
    tf.train.Checkpoint(frequency=restored).restore(path).assert_consumed()
    for a, b in zip(layer.weights, restored.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    more = rng.integers(0, 300, size=(50, 32))
    _replay(layer, more)
    _replay(restored, more)                     # the restored state carries on identically
    np.testing.assert_array_equal(_estimate(layer, np.arange(300)),
                                  _estimate(restored, np.arange(300)))
    assert int(restored.step.numpy()) == 250


def test_update_is_a_pure_tf_graph():
    layer = StreamingFrequency(num_buckets=100, num_hashes=2)
    step = tf.function(lambda ids: layer(ids, training=True))
    graph = step.get_concrete_function(tf.TensorSpec([None], tf.string)).graph
    ops = {op.type for op in graph.get_operations()}
    assert "StringToHashBucketStrong" in ops
    assert not ops & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_hashes must be in"):
        StreamingFrequency(num_hashes=5)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        StreamingFrequency(alpha=1.0)


class _Counter(tf.keras.Model):
    """A model whose Keras train step feeds each batch of ids to the estimator."""

    def __init__(self):
        super().__init__()
        self.frequency = StreamingFrequency(num_buckets=100, num_hashes=2)
        self.bias = tf.Variable(0.0)

    def train_step(self, ids):
        with tf.GradientTape() as tape:
            prob = self.frequency(ids, training=True)
            loss = tf.reduce_mean(tf.square(self.bias + tf.math.log(prob)))
        self.optimizer.apply_gradients(zip(tape.gradient(loss, [self.bias]), [self.bias]))
        return {"loss": loss}


def test_updated_by_keras_fit_and_kept_in_its_weight_checkpoints(tmp_path):
    ids = tf.data.Dataset.from_tensor_slices(tf.constant([["a", "a", "b"]] * 7)).batch(1)
    model = _Counter()
    model.compile(optimizer=tf.keras.optimizers.SGD(0.1))
    model.fit(ids.map(lambda x: tf.reshape(x, [-1])), epochs=2, verbose=0)
    assert int(model.frequency.step.numpy()) == 14            # one step per batch
    # "a" twice in each of the 14 steps: 2 copies, gap 1 from the first step on
    assert model.frequency(tf.constant(["a"])).numpy()[0] == pytest.approx(2.0, rel=1e-6)
    model.save_weights(str(tmp_path / "weights"))
    fresh = _Counter()
    fresh.load_weights(str(tmp_path / "weights")).assert_existing_objects_matched()
    for a, b in zip(model.frequency.weights, fresh.frequency.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
