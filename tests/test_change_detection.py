"""Catalog fingerprints (export.change_detection): what tells a changed catalog row
from an unchanged one, in each stored format."""
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from export.change_detection import (FINGERPRINT_FORMAT, FINGERPRINTS_FILE, FullBuildNeeded,
                                     _string_hashes, catalog_fingerprints, read_fingerprints,
                                     write_fingerprints)

SPEC = [{"name": "item_id", "dtype": "string"}, {"name": "tags", "dtype": "string"},
        {"name": "price", "dtype": "float32"}, {"name": "title", "dtype": "string"}]


def catalog():
    return pd.DataFrame({"item_id": ["i0", "i1", "i2", "i3"],
                         "tags": ["a|b", "a|b", None, "ü|b"],
                         "price": [1.5, 1.5, 2.0, np.nan],
                         "title": ["a long title, longer than 8 bytes", "", "x", "héllo"],
                         "not_an_input": [1, 2, 3, 4]})


def test_format_2_values_are_pinned():
    """Stored fingerprints are compared across exports: the hash must not drift
    without FINGERPRINT_FORMAT moving with it."""
    assert FINGERPRINT_FORMAT == 2
    got = catalog_fingerprints(catalog(), SPEC)
    assert got.index.tolist() == ["i0", "i1", "i2", "i3"]
    assert got.dtype == np.uint64
    assert got.tolist() == PINNED


# format 2's values for catalog(), recorded when the format was introduced
PINNED = [14602594533674239060, 12691739643915379792, 10178546484808441280,
          2435287123259093986]


def test_a_row_hashes_the_same_wherever_it_is_and_however_it_is_stored():
    items = catalog()
    base = catalog_fingerprints(items, SPEC)
    moved = catalog_fingerprints(items.iloc[::-1].astype(object), SPEC)  # order, dtype
    assert moved.loc[base.index].tolist() == base.tolist()
    arrow = catalog_fingerprints(items.astype({"tags": "string[pyarrow]",
                                               "title": "string[pyarrow]"}), SPEC)
    assert arrow.tolist() == base.tolist()
    # a column the tower does not read changes nothing; None and "" are the same input
    assert catalog_fingerprints(items.assign(not_an_input=0), SPEC).tolist() == base.tolist()
    assert catalog_fingerprints(items.fillna({"tags": ""}), SPEC).tolist() == base.tolist()


@pytest.mark.parametrize("column, value", [("tags", "a|c"), ("price", 1.5000001),
                                           ("title", "a long title, longer than 8 bytez"),
                                           ("title", "a long title, longer than 8 bytes "),
                                           ("price", -0.0), ("item_id", "i9")])
def test_any_change_of_an_input_changes_that_rows_fingerprint_only(column, value):
    items = catalog()
    before = catalog_fingerprints(items, SPEC).to_numpy()
    items.loc[0, column] = value
    after = catalog_fingerprints(items, SPEC).to_numpy()
    assert after[0] != before[0]
    assert (after[1:] == before[1:]).all()


def test_equal_rows_hash_equal_and_swapped_values_do_not():
    items = pd.DataFrame({"item_id": ["a", "b", "c"], "tags": ["x", "y", "x"],
                          "price": [1.0, 1.0, 1.0], "title": ["y", "x", "y"]})
    h = catalog_fingerprints(items, [f for f in SPEC if f["name"] != "item_id"]).to_numpy()
    assert h[0] == h[2] and h[0] != h[1]   # (tags, title) = (x, y) vs (y, x)


def test_string_hashes_depend_on_content_and_length_only():
    strings = ["", "a", "a\x00", "abcdefgh", "abcdefghi", "abcdefgi", "ü" * 9]
    arr = pa.array(strings * 3, pa.large_string())
    h = _string_hashes(arr, np.uint64(1), chunk=5)   # chunks cut through the repeats
    assert len(set(h[:7].tolist())) == 7
    assert (h[7:14] == h[:7]).all() and (h[14:] == h[:7]).all()
    assert (_string_hashes(arr.slice(3, 4), np.uint64(1)) == h[3:7]).all()
    assert (_string_hashes(arr, np.uint64(2))[:7] != h[:7]).all()   # salted per column


def test_stored_format_is_read_back_and_old_files_are_format_1(tmp_path):
    items = catalog()
    new = catalog_fingerprints(items, SPEC)
    write_fingerprints(tmp_path / "v2", new)
    got, fmt = read_fingerprints(tmp_path / "v2")
    assert fmt == 2 and got.tolist() == new.tolist() and got.index.tolist() == new.index.tolist()
    # a file written before formats existed: pandas' hash, no format field
    old = catalog_fingerprints(items, SPEC, 1)
    assert old.tolist() == pd.util.hash_pandas_object(
        pd.DataFrame({"item_id": items["item_id"], "tags": items["tags"].fillna(""),
                      "price": items["price"].astype(np.float32), "title": items["title"]}),
        index=False).tolist()
    path = tmp_path / "v1" / "assets.extra" / FINGERPRINTS_FILE
    path.parent.mkdir(parents=True)
    old.reset_index().to_parquet(path, index=False)
    got, fmt = read_fingerprints(tmp_path / "v1")
    assert fmt == 1 and got.tolist() == old.tolist()
    assert (old.to_numpy() != new.to_numpy()).all()   # so formats must not be mixed


def test_an_unknown_format_needs_a_full_build():
    with pytest.raises(FullBuildNeeded, match="format 3: this code knows formats 1 to 2"):
        catalog_fingerprints(catalog(), SPEC, 3)
