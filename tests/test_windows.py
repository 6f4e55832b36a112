"""data.since / data.until cut any data source to [since, until) after loading."""
import inspect
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from test_data_loaders import write_ml100k
from trainer.config import (ConfigError, DriftConfig, GenericData, MovieLens100K, SyntheticData,
                            TableSource, load_config, parse_config)
from trainer.data import DataError, load_tables
from trainer.data.drifting import day_window, generate_drifting
from trainer.data.windows import cut_window
from tiny_run_config import TINY


def _events(tmp_path, timestamps, clicked=None):
    path = tmp_path / "events.csv"
    pd.DataFrame({"user_id": [f"u{i % 3}" for i in range(len(timestamps))],
                  "item_id": [f"i{i}" for i in range(len(timestamps))],
                  "timestamp": timestamps,
                  "clicked": clicked if clicked is not None else [1] * len(timestamps),
                  }).to_csv(path, index=False)
    return str(path)


def test_window_is_half_open_and_cut_exactly_at_the_boundaries(tmp_path):
    path = _events(tmp_path, [99, 100, 101, 199, 200, 201])
    t = load_tables(GenericData(kind="tables", interactions=TableSource(path=path),
                                since=100, until=200))
    assert t.interactions["timestamp"].tolist() == [100, 101, 199]
    assert t.interactions["item_id"].tolist() == ["i1", "i2", "i3"]
    assert sorted(t.items["item_id"]) == ["i1", "i2", "i3"]   # entity rows follow the ids
    only_since = load_tables(GenericData(kind="tables", interactions=TableSource(path=path),
                                         since=200))
    assert only_since.interactions["timestamp"].tolist() == [200, 201]
    only_until = load_tables(GenericData(kind="tables", interactions=TableSource(path=path),
                                         until=100))
    assert only_until.interactions["timestamp"].tolist() == [99]


def test_movielens_is_cut_by_its_timestamps_in_file_order(tmp_path):
    root = write_ml100k(tmp_path / "ml")        # timestamps 881250949, 891717742, 878887116
    t = load_tables(MovieLens100K(kind="movielens-100k", path=str(root), until=891717742))
    assert t.interactions["timestamp"].tolist() == [881250949, 878887116]
    assert t.interactions["user_id"].tolist() == ["1", "1"]


def test_consecutive_day_windows_partition_the_drifting_world():
    world = dict(num_users=120, num_items=90, exposures_per_user=8, days=4, seed=2,
                 drift=DriftConfig(new_users_per_day=10, new_items_per_day=10))
    whole = load_tables(SyntheticData(**world)).interactions
    parts = []
    for day in range(4):
        since, until = day_window(day)
        part = load_tables(SyntheticData(**world, since=since, until=until)).interactions
        assert part["timestamp"].between(since, until - 1).all()
        parts.append(part)
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), whole)


def test_entity_tables_keep_what_exists_in_the_window():
    tables = generate_drifting(num_users=120, num_items=150, exposures_per_user=8, days=6,
                               seed=4, new_users_per_day=10, new_items_per_day=10,
                               item_lifetime_days=3.0)
    since, until = day_window(3)
    cut = cut_window(tables, since, until)
    items, users = tables.items, tables.users
    ends = items["available_until"].fillna(2**62).astype(np.int64)
    expect_items = items[(items["available_from"] < until) & (ends > since)]["item_id"]
    assert sorted(cut.items["item_id"]) == sorted(expect_items)
    assert len(expect_items) < len(items)                # future and retired items left out
    assert sorted(cut.users["user_id"]) == sorted(users[users["available_from"] < until]["user_id"])
    assert cut.ranking_log["timestamp"].between(since, until - 1).all()
    assert len(cut.ranking_log) > 0


def test_a_ranking_log_without_timestamps_is_kept_whole(tmp_path):
    path = _events(tmp_path, [10, 20, 30])
    pd.DataFrame({"user_id": ["u0", "u1"], "item_id": ["i9", "i8"]}).to_csv(
        tmp_path / "log.csv", index=False)
    t = load_tables(GenericData(kind="tables", interactions=TableSource(path=path),
                                ranking_log=TableSource(path=str(tmp_path / "log.csv")),
                                since=15))
    assert len(t.interactions) == 2 and len(t.ranking_log) == 2


def test_empty_window_names_the_window_and_the_data_span(tmp_path):
    path = _events(tmp_path, [1_700_006_400, 1_700_006_500])
    cfg = GenericData(kind="tables", interactions=TableSource(path=path),
                      since="2030-01-01T00:00:00Z")
    with pytest.raises(DataError, match=(
            r"events: data window \[2030-01-01T00:00:00Z \(1893456000\), open\) holds no "
            r"interactions \(its 2 interactions run from 2023-11-15T00:00:00Z \(1700006400\) "
            r"to 2023-11-15T00:01:40Z \(1700006500\)\)")):
        load_tables(cfg)


def test_window_without_clicks_is_an_error(tmp_path):
    path = _events(tmp_path, [10, 20, 30], clicked=[1, 0, 0])
    with pytest.raises(DataError, match=r"data window \[1970-01-01T00:00:15Z \(15\), open\) "
                                        r"holds 2 interactions but no clicks"):
        load_tables(GenericData(kind="tables", interactions=TableSource(path=path), since=15))


@pytest.mark.parametrize("value, seconds", [
    (1_700_006_400, 1_700_006_400), ("1700006400", 1_700_006_400),
    ("2023-11-15T00:00:00Z", 1_700_006_400), ("2023-11-15T01:00:00+01:00", 1_700_006_400),
    ("2023-11-15", 1_700_006_400), ("2023-11-15T00:00:00", 1_700_006_400)])
def test_since_and_until_accept_seconds_and_iso_dates(value, seconds):
    config = parse_config({**TINY, "data": {**TINY["data"], "since": value}})
    assert config.data.since == seconds


def test_yaml_dates_are_read_as_utc(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(TINY) + "\n")
    text = (tmp_path / "c.yaml").read_text().replace(
        "kind: synthetic", "kind: synthetic\n  since: 2023-11-15\n  until: 2023-11-16T00:00:00Z")
    (tmp_path / "c.yaml").write_text(text)
    data = load_config(tmp_path / "c.yaml").data
    assert (data.since, data.until) == (1_700_006_400, 1_700_092_800)


def test_bad_windows_are_config_errors_naming_the_field():
    with pytest.raises(ConfigError, match=r"data\.synthetic: Value error, since \(200\) must "
                                          r"be earlier than until \(100\)"):
        parse_config({**TINY, "data": {**TINY["data"], "since": 200, "until": 100}})
    with pytest.raises(ConfigError, match=r"data\.synthetic\.until: Value error, expected unix "
                                          r"seconds or an ISO-8601 date/time, got 'tomorrow'"):
        parse_config({**TINY, "data": {**TINY["data"], "until": "tomorrow"}})
    with pytest.raises(ConfigError, match=r"data\.synthetic\.drift\.item_lifetime_days"):
        parse_config({**TINY, "data": {**TINY["data"], "drift": {"item_lifetime_days": 0.5}}})


def test_drifting_config_and_generator_agree_on_defaults():
    defaults = inspect.signature(generate_drifting).parameters
    for key, value in DriftConfig().model_dump().items():
        assert defaults[key].default == value, key
    data = load_config(Path(__file__).resolve().parent.parent / "configs" / "drifting.yaml").data
    assert data.drift is not None and data.since is None and data.until is None
