"""Loaders produce canonical tables and name file/line/column on bad input."""
import re

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
    with pytest.raises(DataError,
                       match=r"u\.data:2 column 'item_id': expected a number, got 'abc'"):
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
    with pytest.raises(DataError, match=r"log\.csv:3 column 'clicked': expected a number, "
                                        r"got 'yes'"):
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


# ---------------------------------------------------------------- file:LINE errors
def _tables(tmp_path, interactions, items=None, **source):
    """A `kind: tables` config over CSV text written to tmp_path."""
    (tmp_path / "log.csv").write_bytes(interactions if isinstance(interactions, bytes)
                                       else interactions.encode())
    items_source = None
    if items is not None:
        (tmp_path / "items.csv").write_text(items)
        items_source = TableSource(path=str(tmp_path / "items.csv"))
    return GenericData(kind="tables", items=items_source, interactions=TableSource(
        path=str(tmp_path / "log.csv"), **source))


def _log(rows):
    return "user_id,item_id,timestamp\n" + "".join(f"u{r},i{r},{100 + r}\n" for r in rows)


def test_bad_value_mid_file_names_the_file_line(tmp_path):
    text = _log(range(1999)) + "u9,i9,abc\n" + _log(range(5)).split("\n", 1)[1]
    # data row 1999 is line 2001 of the file: the header is line 1
    with pytest.raises(DataError, match=re.escape(
            f"{tmp_path / 'log.csv'}:2001 column 'timestamp': expected a number, got 'abc'")):
        load_tables(_tables(tmp_path, text))


def test_line_numbers_count_quoted_newlines_and_blank_lines(tmp_path):
    text = ('user_id,item_id,timestamp\nu1,"i\nwith newline",1\n\nu2,i2,x\n')
    with pytest.raises(DataError, match=r"log\.csv:5 column 'timestamp': expected a number, "
                                        r"got 'x'"):
        load_tables(_tables(tmp_path, text))


def test_short_row_says_how_many_fields_it_has(tmp_path):
    with pytest.raises(DataError, match=r"log\.csv:3: expected 3 fields \(user_id, item_id, "
                                        r"timestamp\) separated by ',', got 2$"):
        load_tables(_tables(tmp_path, "user_id,item_id,timestamp\nu1,i1,1\nu2,i2\n"))


def test_long_row_says_how_many_fields_it_has(tmp_path):
    with pytest.raises(DataError, match=r"log\.csv:3: expected 3 fields .* got 4$"):
        load_tables(_tables(tmp_path, "user_id,item_id,timestamp\nu1,i1,1\nu2,i2,2,9\n"))


def test_missing_id_is_not_the_id_nan(tmp_path):
    with pytest.raises(DataError, match=r"log\.csv:2 column 'item_id': missing"):
        load_tables(_tables(tmp_path, "user_id,item_id,timestamp\nu1,,1\n"))


def test_empty_and_header_only_files_say_what_is_missing(tmp_path):
    with pytest.raises(DataError, match=r"log\.csv: empty file \(expected rows with user_id, "
                                        r"item_id\)"):
        load_tables(_tables(tmp_path, ""))
    with pytest.raises(DataError, match=r"log\.csv: only a header line, no data rows"):
        load_tables(_tables(tmp_path, "user_id,item_id\n"))


def test_ml100k_empty_u_data(tmp_path):
    root = write_ml100k(tmp_path / "ml")
    (root / "u.data").write_text("")
    with pytest.raises(DataError, match=r"u\.data: empty file \(expected user id, item id"):
        load_ml100k(root)


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    with pytest.raises(DataError, match=r"log\.csv:3: not valid utf-8 \(byte 0xff at byte 4 "
                                        r"of the line\)"):
        load_tables(_tables(tmp_path, b"user_id,item_id\nu1,i1\nu2,\xff\n"))
    root = write_ml100k(tmp_path / "ml")
    (root / "u.data").write_bytes(b"1\t10\t5\t881250949\n2\t2\xe90\t3\t891717742\n")
    with pytest.raises(DataError, match=r"u\.data:2: not valid utf-8 \(byte 0xe9 at byte 4"):
        load_ml100k(root)


def test_duplicate_item_names_both_lines(tmp_path):
    items = "item_id,category\ni1,a\ni2,b\ni3,c\ni2,d\n"
    with pytest.raises(DataError, match=r"items\.csv:5: duplicate item_id 'i2' "
                                        r"\(first on line 3\)"):
        load_tables(_tables(tmp_path, _log(range(3)), items))


def test_non_integer_in_an_integer_column(tmp_path):
    root = write_ml100k(tmp_path / "ml", ["1\t10\t5\t881250949", "2\t20\t3\t8917.5"])
    with pytest.raises(DataError, match=r"u\.data:2 column 'timestamp': expected an integer, "
                                        r"got '8917\.5'"):
        load_ml100k(root)


# ---------------------------------------------------------------- headerless tables
def test_headerless_table_by_position(tmp_path):
    cfg = _tables(tmp_path, "u1;i1;5;100\nu2;i2;3;200\n", header=False, separator=";",
                  columns={"user_id": 0, "item_id": 1, "timestamp": 3})
    t = load_tables(cfg)
    assert t.interactions["item_id"].tolist() == ["i1", "i2"]
    assert t.interactions["timestamp"].tolist() == [100, 200]
    assert t.interactions["clicked"].tolist() == [1, 1]


def test_headerless_table_with_names(tmp_path):
    cfg = _tables(tmp_path, "u1,i1,100\nu2,i2,oops\n", header=False,
                  names=["uid", "iid", "ts"],
                  columns={"user_id": "uid", "item_id": "iid", "timestamp": "ts"})
    with pytest.raises(DataError, match=r"log\.csv:2 column 'timestamp': expected a number, "
                                        r"got 'oops'"):
        load_tables(cfg)
    (tmp_path / "log.csv").write_text("u1,i1,100\nu2,i2,200\n")
    assert load_tables(cfg).interactions["timestamp"].tolist() == [100, 200]


def test_headerless_position_out_of_range(tmp_path):
    cfg = _tables(tmp_path, "u1,i1\n", header=False, columns={"user_id": 0, "item_id": 2})
    with pytest.raises(DataError, match=r"item_id \(position 2; the file has 2 columns\)"):
        load_tables(cfg)


def test_header_that_looks_like_data_warns(tmp_path, caplog):
    cfg = _tables(tmp_path, "1,10,100\n2,20,200\n",
                  columns={"user_id": "1", "item_id": "10"})
    with caplog.at_level("WARNING", logger="trainer.data.readers"):
        t = load_tables(cfg)
    assert len(t.interactions) == 1   # the first line was taken as the header
    assert "log.csv:1: the header line '1,10,100' looks like data" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="trainer.data.readers"):
        load_tables(_tables(tmp_path, _log(range(2))))
    assert caplog.text == ""


def test_parquet_rows_are_named_by_index(tmp_path):
    pd.DataFrame({"user_id": ["u1", "u2"], "item_id": ["i1", "i2"], "clicked": [1, 2]}).to_parquet(
        tmp_path / "log.parquet")
    cfg = GenericData(kind="tables", interactions=TableSource(path=str(tmp_path / "log.parquet")))
    with pytest.raises(DataError, match=r"log\.parquet row 1 column 'clicked': must be 0 or 1, "
                                        r"got 2$"):
        load_tables(cfg)
