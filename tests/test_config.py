"""Config validation names the bad field and the file."""
import re

import pytest

from trainer.config import ConfigError, load_config


def test_example_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "configs"
    for path in sorted(root.glob("*.yaml")):
        load_config(path)


def test_bad_field_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("features:\n  user: [{name: user_id, type: categoricl}]\n"
                 "  item: [{name: item_id, type: categorical}]\n")
    with pytest.raises(ConfigError, match=r"(?s)c\.yaml.*features\.user\.0"):
        load_config(p)


def test_unknown_key_rejected(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("features:\n  user: [{name: user_id, type: categorical}]\n"
                 "  item: [{name: item_id, type: categorical}]\n"
                 "training: {epochz: 3}\n")
    with pytest.raises(ConfigError, match=r"training\.epochz"):
        load_config(p)


def test_item_id_required(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("features:\n  user: [{name: user_id, type: categorical}]\n"
                 "  item: [{name: genre, type: categorical}]\n")
    with pytest.raises(ConfigError, match="item_id"):
        load_config(p)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")


IDS_ONLY = {"features": {"user": [{"name": "user_id", "type": "categorical"}],
                         "item": [{"name": "item_id", "type": "categorical"}]}}


@pytest.mark.parametrize("section,values,message", [
    ("evaluation", {"ks": []}, "evaluation.ks: List should have at least 1 item"),
    ("evaluation", {"ks": [0, 10]}, "every K must be >= 1"),
    ("training", {"early_stopping_patience": 2},
     "early_stopping_patience needs a validation split"),
    ("training", {"validation_days": 2.0},
     "training.validation_days applies to the temporal protocol; under random use "
     "training.validation_fraction"),
    ("training", {"validation_fraction": 0.1, "early_stopping_metric": "val_loss"},
     "early_stopping_metric must be val_hr@K"),
    ("objective", {"kind": "listwise", "num_hard_negatives": 5},
     "objective.num_hard_negatives: not used by objective.kind=listwise"),
    ("objective", {"unobserved_per_row": 2},
     "objective.unobserved_per_row: not used by objective.kind=in_batch_softmax"),
    ("sampling", {"negatives": {"hard_fraction": 0.5}},
     "sampling.negatives.hard_fraction: not used by objective.kind=in_batch_softmax"),
])
def test_options_that_would_be_ignored_are_errors(section, values, message):
    from trainer.config import parse_config
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({**IDS_ONLY, section: values})


def test_temporal_validation_is_counted_in_days():
    from trainer.config import parse_config
    with pytest.raises(ConfigError, match=re.escape(
            "training.validation_fraction applies to the random protocols; under the "
            "temporal protocol use training.validation_days")):
        parse_config({**IDS_ONLY, "evaluation": {"protocol": "temporal"},
                      "training": {"validation_fraction": 0.1}})
    config = parse_config({**IDS_ONLY, "evaluation": {"protocol": "temporal"},
                           "training": {"validation_days": 1.5, "early_stopping_patience": 1}})
    assert config.training.validation_days == 1.5
