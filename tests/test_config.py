"""Config validation names the bad field and the file."""
import re

import pytest

from trainer.config import ConfigError, load_config


def test_example_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "configs"
    for path in sorted(root.glob("*.yaml")):
        load_config(path)
    ml100k = sorted((root / "variants" / "ml100k").glob("*.yaml"))
    assert len(ml100k) >= 4
    names = {load_config(root / "ml100k.yaml", [v]).name for v in ml100k}
    assert names == {f"ml100k_{v.stem}" for v in ml100k}


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
    ("objective", {"kind": "pointwise", "logq_weight": 0.5},
     "objective.logq_weight: not used by objective.kind=pointwise"),
    ("objective", {"logq_correction": False, "logq_weight": 0.5},
     "objective.logq_weight=0.5 weighs the logQ correction, but "
     "objective.logq_correction is false"),
    ("objective", {"logq_weight": 2.5},
     "objective.logq_weight: Input should be less than or equal to 2"),
])
def test_options_that_would_be_ignored_are_errors(section, values, message):
    from trainer.config import parse_config
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({**IDS_ONLY, section: values})


@pytest.mark.parametrize("objective, weight", [
    ({}, 1.25),                                        # in_batch_softmax: the tuned default
    ({"logq_correction": False}, 1.0),                 # no correction to weigh
    ({"kind": "listwise"}, 1.0),                       # not tuned: the textbook weight
    ({"kind": "pointwise"}, 1.0),                      # no logQ term at all
    ({"logq_weight": 0.5}, 0.5),                       # set: kept
])
def test_unset_logq_weight_is_resolved_per_objective(objective, weight):
    """An unset logq_weight means 1.25 only where it was chosen on validation
    (in_batch_softmax with the correction on); a dumped config keeps the value."""
    from trainer.config import parse_config
    config = parse_config({**IDS_ONLY, "objective": objective})
    assert config.objective.logq_weight == weight
    dumped = parse_config(config.model_dump(mode="json"))
    assert dumped.objective.logq_weight == weight


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


def test_unknown_key_lists_the_valid_keys_of_its_section():
    from trainer.config import parse_config
    raw = {**IDS_ONLY, "data": {"kind": "tables",
                                "interactions": {"path": "x.csv", "sepparator": ";"}},
           "evaluation": {"protocl": "temporal"}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    message = str(err.value)
    assert ("data.tables.interactions.sepparator: Extra inputs are not permitted (valid keys "
            "here: path, columns, separator, header, names)") in message
    assert ("evaluation.protocl: Extra inputs are not permitted (valid keys here: protocol, "
            "seed, train_fraction, test_days, ks, ease, ease_max_items, ease_l2)") in message


@pytest.mark.parametrize("source,message", [
    ({"path": "x.csv", "header": False, "columns": {"user_id": "uid", "item_id": 1}},
     "header: false and no 'names': map ['user_id'] by 0-based position"),
    ({"path": "x.csv", "header": False}, "header: false needs 'columns' (positions) or 'names'"),
    ({"path": "x.csv", "names": ["a", "b"]}, "set 'header: false'"),
    ({"path": "x.csv", "columns": {"user_id": -1}}, "column positions are 0-based"),
])
def test_headerless_table_config_errors(source, message):
    from trainer.config import parse_config
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({**IDS_ONLY, "data": {"kind": "tables", "interactions": source}})


def test_headerless_table_config_by_position():
    from trainer.config import parse_config
    config = parse_config({**IDS_ONLY, "data": {"kind": "tables", "interactions": {
        "path": "x.tsv", "separator": "\t", "header": False,
        "columns": {"user_id": 0, "item_id": 1, "timestamp": 3}}}})
    assert config.data.interactions.columns == {"user_id": 0, "item_id": 1, "timestamp": 3}
    assert config.data.interactions.header is False


@pytest.mark.parametrize("epochs", ["0", "-1", "two"])
def test_cli_refuses_epochs_below_one(epochs, capsys):
    from trainer.cli import parse_args
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--config", "c.yaml", "--output", "out", "--epochs", epochs])
    assert exit_.value.code == 2
    assert "argument --epochs:" in capsys.readouterr().err
    assert parse_args(["--config", "c.yaml", "--output", "o", "--epochs", "1"]).epochs == 1
