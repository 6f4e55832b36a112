"""EASE and the validation split in every run: chosen on validation, scored on test."""
import numpy as np
import pytest

from tiny_run_config import TINY
from trainer.config import parse_config
from trainer.data import load_tables
from trainer.evaluation import evaluate
from trainer.prepare import prepare_data
from trainer.train import ease_reference


@pytest.fixture(scope="module")
def prepared():
    config = parse_config(TINY)
    return config, prepare_data(config, load_tables(config.data))


def test_the_run_reports_ease_chosen_on_validation(tiny_run, prepared):
    config, data = prepared
    ease = tiny_run.metrics["ease"]
    grid = config.evaluation.ease_l2
    assert set(ease["validation"]) == {f"{l2:g}" for l2 in grid}
    assert ease["validation"][f"{ease['l2']:g}"] == max(ease["validation"].values())
    # the same model, computed independently: dense inverse on the known clicks
    test = data.test_set()
    x = np.zeros((len(data.encoded.user_index), test.num_items))
    x[test.seen_users, test.seen_items] = 1.0
    p = np.linalg.inv(x.T @ x + ease["l2"] * np.eye(test.num_items))
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    expected = evaluate(lambda users: x[users] @ b, test, config.evaluation.ks)
    for k in config.evaluation.ks:
        assert ease[f"hr@{k}"] == pytest.approx(expected[f"hr@{k}"], abs=1e-9)
    report = (tiny_run.output_dir / "report.md").read_text()
    assert f"| EASE (L2={ease['l2']:g}) |" in report
    assert "chosen on the **validation** split" in report
    assert "scored on the **test** split" in report


def test_the_validation_cut_never_touches_the_test_split(prepared):
    config, data = prepared
    validation = data.reference_validation_set(config)  # TINY has none: a default 10 % cut
    known = set(zip(data.splits.known["user_id"], data.splits.known["item_id"]))
    users, items = data.encoded.user_index, data.encoded.item_index
    held_out = set(zip(users[validation.test_users], items[validation.test_items]))
    assert held_out <= known
    assert len(validation.test_users) == len(known) - int(len(known) * 0.9)
    # a configured split: validation rows are training rows, never test rows
    config = parse_config({**TINY, "training": {**TINY["training"], "validation_fraction": 0.2}})
    splits = prepare_data(config, load_tables(config.data)).splits
    assert set(splits.validation.index) <= set(splits.known.index)
    assert not set(splits.validation.index) & set(splits.test.index)
    assert not set(splits.validation.index) & set(splits.train_positives.index)
    assert len(splits.validation) == len(splits.known) - int(len(splits.known) * 0.8)


def test_temporal_validation_is_the_last_days_before_the_test_days():
    config = parse_config({**TINY, "evaluation": {"protocol": "temporal", "test_days": 2},
                           "training": {**TINY["training"], "validation_days": 1}})
    data = prepare_data(config, load_tables(config.data))
    splits = data.splits
    day = 86_400
    last_train = splits.known["timestamp"].max()
    assert splits.validation["timestamp"].min() > last_train - day
    assert splits.train_positives["timestamp"].max() <= last_train - day
    assert splits.validation["timestamp"].max() < splits.test["timestamp"].min()
    assert len(splits.validation) + len(splits.train_positives) == len(splits.known)


def test_ease_is_skipped_above_the_size_limit(prepared):
    config, data = prepared
    small = config.model_copy(update={"evaluation": config.evaluation.model_copy(
        update={"ease_max_items": 10})})
    result = ease_reference(small, data)
    assert result == {"skipped": f"EASE skipped: catalog of {data.test_set().num_items} "
                                 "items is above evaluation.ease_max_items = 10"}
