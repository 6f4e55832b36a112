"""Feature encoders: vocabularies with OOV, buckets, multi-valued pooling, text."""
import numpy as np
import pytest
import tensorflow as tf

from trainer.features import (CategoricalEncoder, ContinuousEncoder, MultiCategoricalEncoder,
                              TextEncoder)


def test_categorical_oov_shares_one_bucket():
    enc = CategoricalEncoder(embedding_dim=4, num_oov_buckets=1)
    enc.adapt(np.array(["a", "b", "c"], dtype=object))
    assert enc.vocabulary_size == 4  # 3 known + 1 OOV
    out = enc(tf.constant(["a", "zzz", "yyy"])).numpy()
    idx = enc.lookup(tf.constant(["a", "zzz", "yyy"])).numpy()
    assert idx[1] == idx[2] == 0 and idx[0] > 0
    assert out.shape == (3, 4)
    np.testing.assert_allclose(out[1], out[2])
    assert not np.allclose(out[0], out[1])


def test_categorical_hashing_needs_no_vocabulary():
    enc = CategoricalEncoder(embedding_dim=3, vocabulary="hashing", hash_bins=50)
    enc.adapt(np.array([], dtype=object))
    out = enc(tf.constant(["x", "never-seen"])).numpy()
    assert out.shape == (2, 3)


def test_multi_categorical_mean_pools_and_empty_is_zero():
    enc = MultiCategoricalEncoder(embedding_dim=4, separator="|")
    enc.adapt(np.array(["a|b", "b", "c"], dtype=object))
    out = enc(tf.constant(["a|b", "a", "b", ""])).numpy()
    np.testing.assert_allclose(out[0], (out[1] + out[2]) / 2, rtol=1e-6)
    np.testing.assert_allclose(out[3], np.zeros(4))


def test_continuous_buckets_from_quantiles_and_nan_imputed():
    enc = ContinuousEncoder(normalize=True, buckets=4, embedding_dim=2)
    values = np.arange(100, dtype=np.float32)
    enc.adapt(values)
    boundaries = enc.statistics["boundaries"]
    np.testing.assert_allclose(boundaries, np.quantile(values, [0.25, 0.5, 0.75]), rtol=1e-5)
    out = enc(tf.constant([0.0, 49.5, np.nan, 99.0])).numpy()
    assert out.shape == (4, 3)  # normalized value + 2-d bucket embedding
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[2, 0], 0.0, atol=1e-5)  # NaN -> mean -> 0 after normalizing
    assert out[0, 0] < -1.5 and out[3, 0] > 1.5
    assert enc.discretizer(tf.constant([0.0, 99.0])).numpy().tolist() == [0, 3]


def test_text_encoder_masks_padding():
    enc = TextEncoder(embedding_dim=4, max_tokens=20, max_length=5)
    enc.adapt(np.array(["red apple", "green apple pie"], dtype=object))
    out = enc(tf.constant(["apple", "apple apple", ""])).numpy()
    np.testing.assert_allclose(out[0], out[1], rtol=1e-6)  # mean, padding ignored
    np.testing.assert_allclose(out[2], np.zeros(4))


def test_an_encoder_without_vocabulary_or_statistics_refuses_to_build():
    for enc in (CategoricalEncoder(embedding_dim=2, name="city_encoder"),
                ContinuousEncoder(name="age_encoder")):
        with pytest.raises(ValueError, match=f"encoder '{enc.name}' has no vocabulary"):
            enc(tf.constant(["x"]) if isinstance(enc, CategoricalEncoder)
                else tf.constant([1.0]))
