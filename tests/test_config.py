"""Config validation names the bad field and the file."""
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
