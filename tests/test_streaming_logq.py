"""objective.logq: streaming feeds the in-batch softmax with trainer.frequency's estimate."""
import copy

import numpy as np
import pytest
import tensorflow as tf

from trainer.config import ConfigError, parse_config
from trainer.data.synthetic import generate
from trainer.batches import TrainingBatches
from trainer.frequency import StreamingFrequency
from trainer.prepare import prepare_data
from trainer.train import build_model, train

RAW = {
    "name": "streaming",
    "data": {"kind": "synthetic", "num_users": 120, "num_items": 80,
             "exposures_per_user": 20, "seed": 2},
    "features": {"user": [{"name": "user_id", "type": "categorical", "embedding_dim": 8}],
                 "item": [{"name": "item_id", "type": "categorical", "embedding_dim": 8}]},
    "model": {"query_tower": {"output_dim": 8}, "candidate_tower": {"output_dim": 8}},
    "objective": {"logq": "streaming", "streaming": {"num_buckets": 1000, "alpha": 0.05}},
    "training": {"epochs": 2, "batch_size": 128, "learning_rate": 0.01},
    "evaluation": {"protocol": "random", "ks": [10]},
}


def test_the_loss_uses_the_estimate_after_the_batch():
    cfg = parse_config(RAW)
    tables = generate(num_users=120, num_items=80, exposures_per_user=20, seed=2)
    prepared = prepare_data(cfg, tables)
    model = build_model(cfg, prepared)
    batch = next(iter(TrainingBatches(prepared, cfg).dataset(128, 0)))
    assert int(model.frequency.step.numpy()) == 0
    loss = float(model.compute_loss(batch, training=True))
    assert int(model.frequency.step.numpy()) == 1

    twin = StreamingFrequency(num_buckets=1000, num_hashes=2, alpha=0.05)
    prob = twin(batch["candidate"]["item_id"], training=True)
    query, candidate = model(batch, training=True)
    expected = float(model.objective(query, candidate, dict(batch, item_prob=prob)))
    static = float(model.objective(query, candidate, batch))
    assert loss == pytest.approx(expected, rel=1e-6)
    assert abs(loss - static) > 1e-3                  # the static counts give another loss
    model.compute_loss(batch, training=False)
    assert int(model.frequency.step.numpy()) == 1     # evaluation does not update it


def test_training_updates_it_every_step_and_checkpoints_it(tmp_path):
    run = train(parse_config(RAW), tmp_path, verbose=0)
    steps = int(np.ceil(run.metrics["train_positives"] / 128)) * 2
    assert int(run.model.frequency.step.numpy()) == steps
    saved = dict(tf.train.list_variables(str(tmp_path / "checkpoints" / "epoch-002")))
    names = [n for n in saved if n.startswith("frequency/")]
    assert len(names) == 5, saved.keys()


@pytest.mark.parametrize("over, message", [
    ({"objective": {"kind": "listwise"}}, r"objective\.logq=streaming: not used by "
                                          r"objective\.kind=listwise"),
    ({"sampling": {"negatives": {"extra_candidates": 16}}},
     r"objective\.logq=streaming needs objective\.logq_correction and no "
     r"sampling\.negatives\.extra_candidates"),
    ({"objective": {"logq_correction": False}}, r"needs objective\.logq_correction"),
])
def test_streaming_only_where_it_applies(over, message):
    raw = copy.deepcopy(RAW)
    for key, value in over.items():
        raw[key] = {**raw.get(key, {}), **value}
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)
