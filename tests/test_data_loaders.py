"""Loaders produce canonical tables and name file/line/column on bad input."""
import numpy as np
import pandas as pd
import pytest

from trainer.config import GenericData, SyntheticData, TableSource
from trainer.data import DataError, load_tables
from trainer.data.movielens import load_ml100k, load_ml_latest
from trainer.data.synthetic import generate


def write_ml100k(root, data_lines=None):
    root.mkdir(parents=True, exist_ok=True)
    (root / "u.data").write_text("\n".join(data_lines or [
        "1\t10\t5\t881250949", "2\t20\t3\t891717742", "1\t20\t4\t878887116"]) + "\n")
    (root / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    g = lambda *on: "|".join("1" if i in on else "0" for i in range(19))  # noqa: E731
    (root / "u.item").write_text(
        f"10|Toy Story (1995)|01-Jan-1995||http://x|{g(3, 4, 5)}\n"
        f"20|GoldenEye (1995)|01-Jan-1995||http://y|{g(1, 2, 16)}\n", encoding="latin-1")
    return root


def test_ml100k_canonical_tables(tmp_path):
    t = load_ml100k(write_ml100k(tmp_path / "ml"))
    assert list(t.interactions.columns) == ["user_id", "item_id", "timestamp", "clicked", "weight"]
    assert t.interactions["user_id"].tolist() == ["1", "2", "1"]  # file order kept
    assert (t.interactions["clicked"] == 1).all()
    assert t.items.set_index("item_id").loc["10", "genres"] == "Animation|Children's|Comedy"
    assert t.items.set_index("item_id").loc["10", "title"] == "Toy Story"
    assert t.items["year"].tolist() == [1995.0, 1995.0]
    assert t.users.set_index("user_id").loc["2", "zip_prefix"] == "94"


def test_ml100k_unparsable_row_names_file_and_line(tmp_path):
    root = write_ml100k(tmp_path / "ml", ["1\t10\t5\t881250949", "2\tabc\t3\t891717742"])
    with pytest.raises(DataError, match=r"u\.data:2: column 'item_id'.*'abc'"):
        load_ml100k(root)


def test_ml100k_wrong_field_count_names_line(tmp_path):
    root = write_ml100k(tmp_path / "ml", ["1\t10\t5\t881250949", "1\t10\t5"])
    with pytest.raises(DataError, match=r"u\.data:2: expected 4 fields"):
        load_ml100k(root)


def test_missing_file_is_named(tmp_path):
    root = write_ml100k(tmp_path / "ml")
    (root / "u.item").unlink()
    with pytest.raises(DataError, match=r"u\.item: file not found"):
        load_ml100k(root)
    with pytest.raises(DataError, match="directory not found"):
        load_ml100k(tmp_path / "nope")


def test_ml_latest(tmp_path):
    (tmp_path / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.5,964981247\n")
    (tmp_path / "movies.csv").write_text(
        'movieId,title,genres\n1,"Toy Story (1995)",Adventure|Animation\n'
        '3,"Heat, The (1995)",(no genres listed)\n')
    t = load_ml_latest(tmp_path)
    assert t.items["title"].tolist() == ["Toy Story", "Heat, The"]
    assert t.items["genres"].tolist() == ["Adventure|Animation", ""]
    assert len(t.interactions) == 2


def test_generic_tables_with_column_mapping(tmp_path):
    pd.DataFrame({"uid": [1, 2], "iid": ["a", "b"], "ts": [5, 6], "click": [1, 0]}).to_csv(
        tmp_path / "log.csv", index=False)
    pd.DataFrame({"iid": ["a", "b"], "cat": ["x", "y"]}).to_parquet(tmp_path / "items.parquet")
    cfg = GenericData(kind="tables",
                      interactions=TableSource(path=str(tmp_path / "log.csv"), columns={
                          "user_id": "uid", "item_id": "iid", "timestamp": "ts",
                          "clicked": "click"}),
                      items=TableSource(path=str(tmp_path / "items.parquet"),
                                        columns={"item_id": "iid"}))
    t = load_tables(cfg)
    assert t.interactions["clicked"].tolist() == [1, 0]
    assert t.interactions["user_id"].tolist() == ["1", "2"]
    assert set(t.items.columns) == {"item_id", "cat"}
    assert set(t.users["user_id"]) == {"1", "2"}  # every user gets a row


def test_generic_missing_column_is_named(tmp_path):
    pd.DataFrame({"uid": [1], "iid": [2]}).to_csv(tmp_path / "log.csv", index=False)
    cfg = GenericData(kind="tables", interactions=TableSource(
        path=str(tmp_path / "log.csv"), columns={"user_id": "user", "item_id": "iid"}))
    with pytest.raises(DataError, match=r"log\.csv: missing column.*user_id \(file column 'user'\)"):
        load_tables(cfg)


def test_generic_bad_clicked_value(tmp_path):
    pd.DataFrame({"user_id": [1, 2], "item_id": [2, 3], "clicked": [1, "yes"]}).to_csv(
        tmp_path / "log.csv", index=False)
    cfg = GenericData(kind="tables", interactions=TableSource(path=str(tmp_path / "log.csv")))
    with pytest.raises(DataError, match=r"column 'clicked' row 1.*'yes'"):
        load_tables(cfg)


def test_synthetic_is_deterministic_and_rich():
    a = generate(num_users=200, num_items=100, exposures_per_user=20, seed=3)
    b = generate(num_users=200, num_items=100, exposures_per_user=20, seed=3)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.items, b.items)
    c = generate(num_users=200, num_items=100, exposures_per_user=20, seed=4)
    assert not a.interactions.equals(c.interactions)
    clicked = a.interactions["clicked"]
    assert 0.1 < clicked.mean() < 0.9  # exposures with and without clicks
    days = (a.interactions["timestamp"].max() - a.interactions["timestamp"].min()) / 86400
    assert days > 5
    assert a.ranking_log is not None and len(a.ranking_log) > 0
    # the ranking log holds items that were never shown to the user
    shown = set(zip(a.interactions.user_id, a.interactions.item_id))
    assert not shown & set(zip(a.ranking_log.user_id, a.ranking_log.item_id))
    # Zipf-like popularity: the top 10% of items get far more than 10% of clicks
    counts = a.positives()["item_id"].value_counts().to_numpy()
    assert counts[: len(counts) // 10].sum() / counts.sum() > 0.25
    assert {"category", "tags", "price", "title"} <= set(a.items.columns)
    assert {"age", "country", "favorite_genres", "device"} <= set(a.users.columns)


def test_load_tables_synthetic_from_config():
    t = load_tables(SyntheticData(num_users=50, num_items=30, exposures_per_user=5))
    assert t.name == "synthetic" and len(t.interactions) == 250
    assert np.isin(t.interactions["item_id"], t.items["item_id"]).all()
