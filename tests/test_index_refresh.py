"""export.index_refresh's row check: the refreshed index must hold exactly the
expected items with their expected vectors, whatever rows ScaNN moved them to."""
import numpy as np
import pytest

from export.catalog import id_index
from export.index_refresh import IndexState, IndexStateError, _check_rows

D = 4


def _state(ids, vectors):
    ids = np.asarray(ids, dtype=object)
    return IndexState({"dataset": np.asarray(vectors, np.float32),
                       "datapoint_to_token": np.zeros(len(ids), np.int32)}, ids)


def _scenario():
    """a0..a9; delete a3 (ScaNN moves the last row, a9, into row 3), update a5,
    insert b0 (appended): what a correct refresh leaves."""
    rng = np.random.default_rng(0)
    old_ids = [f"a{i}" for i in range(10)]
    old = _state(old_ids, rng.standard_normal((10, D)))
    upsert_ids = ["a5", "b0"]
    upsert_vectors = rng.standard_normal((2, D)).astype(np.float32)
    ids = ["a0", "a1", "a2", "a9", "a4", "a5", "a6", "a7", "a8", "b0"]
    vectors = old.vectors[[0, 1, 2, 9, 4, 5, 6, 7, 8, 0]].copy()
    vectors[5], vectors[9] = upsert_vectors
    return old, ids, vectors, {"a3"}, upsert_ids, upsert_vectors


def _check(old, ids, vectors, deleted, upsert_ids, upsert_vectors):
    _check_rows(old, _state(ids, vectors), deleted, upsert_ids, upsert_vectors,
                id_index(old.item_ids))


def test_a_correct_refresh_passes():
    _check(*_scenario())
    old, _, _, _, _, _ = _scenario()
    _check(old, list(old.item_ids), old.vectors.copy(), set(), [], np.zeros((0, D)))


def _corrupt(how):
    old, ids, vectors, deleted, upsert_ids, upsert_vectors = _scenario()
    ids, vectors = list(ids), vectors.copy()
    if how == "update lost":
        vectors[5] = old.vectors[5]
    elif how == "one ulp in a kept row":
        vectors[7, 2] = np.nextafter(vectors[7, 2], np.float32(np.inf))
    elif how == "moved row's vector":
        vectors[3] = old.vectors[3]   # a9 moved to row 3 but holds a3's vector
    elif how == "inserted vector":
        vectors[9] += 1e-3
    elif how == "deleted still there":
        ids[9] = "a3"
        vectors[9] = old.vectors[3]
    elif how == "duplicate":
        ids[9] = "a0"
        vectors[9] = old.vectors[0]
    elif how == "unknown item":
        ids[9] = "zz"
    elif how == "missing item":
        ids, vectors = ids[:9], vectors[:9]
    elif how == "two ids swapped":
        ids[1], ids[2] = ids[2], ids[1]
    return old, ids, vectors, deleted, upsert_ids, upsert_vectors


@pytest.mark.parametrize("how", ["update lost", "one ulp in a kept row", "moved row's vector",
                                 "inserted vector", "two ids swapped"])
def test_a_wrong_vector_is_named_by_its_row(how):
    with pytest.raises(IndexStateError, match=r"row \d+ \(item \w+\) does not hold"):
        _check(*_corrupt(how))


@pytest.mark.parametrize("how", ["deleted still there", "duplicate", "unknown item",
                                 "missing item"])
def test_a_wrong_set_of_items_is_refused(how):
    with pytest.raises(IndexStateError, match="does not hold exactly the expected items"):
        _check(*_corrupt(how))


def test_rows_of_matches_a_dict_lookup_whatever_moved():
    from export.change_detection import rows_of

    rng = np.random.default_rng(1)
    table = np.array([f"x{i}" for i in range(50)], dtype=object)
    for _ in range(20):
        ids = table.copy()
        ids = np.delete(ids, rng.choice(50, rng.integers(0, 5), replace=False))
        swap = rng.choice(len(ids), 2, replace=False)
        ids[swap] = ids[swap[::-1]]
        ids = np.concatenate([ids, np.array([f"new{i}" for i in range(rng.integers(0, 4))],
                                            dtype=object)])
        want = {item: r for r, item in enumerate(table)}
        assert rows_of(ids, table).tolist() == [want.get(i, -1) for i in ids]
    assert rows_of(np.array([], dtype=object), table).tolist() == []
    grown = np.concatenate([table, np.array(["new0", "new1"], dtype=object)])
    assert rows_of(grown, table).tolist() == list(range(50)) + [-1, -1]  # only appended
    assert rows_of(table, grown).tolist() == list(range(50))


class _RecordingSearcher:
    """Stands in for the C++ searcher under ScaNN's own Python wrapper: records
    the rows the wrapper hands it, so its bookkeeping can be compared with ours."""

    def __init__(self):
        self.calls = []

    def delete(self, rows):
        self.calls.append(("delete", list(rows)))

    def upsert(self, rows, vectors, batch_size):
        self.calls.append(("upsert", list(rows)))


def test_row_bookkeeping_equals_scann_wrappers():
    """Ours (export.index_refresh) and ScannSearcher's in scann_ops_pybind must
    hand the searcher the same rows and end with the same row -> id list."""
    import scann  # noqa: F401
    from scann.scann_ops.py.scann_ops_pybind import ScannSearcher

    from export.index_refresh import _delete_rows, _upsert_rows

    rng = np.random.default_rng(2)
    for _ in range(10):
        original = np.array([f"x{i}" for i in range(40)], dtype=object)
        deleted = list(rng.choice(original, rng.integers(0, 12), replace=False))
        kept = [i for i in original if i not in deleted]
        upserts = list(rng.choice(kept, rng.integers(0, 8), replace=False)) + [
            f"n{i}" for i in range(rng.integers(0, 5))]
        wrapper = ScannSearcher(_RecordingSearcher(), list(original))
        if deleted:
            wrapper.delete(list(deleted))
        if upserts:
            wrapper.upsert(upserts, np.zeros((len(upserts), D), np.float32))
        ids = list(original)
        rows, moved = _delete_rows(ids, id_index(original), deleted)
        ours = [("delete", rows)] if rows else []
        if upserts:
            ours.append(("upsert", _upsert_rows(ids, id_index(original), set(deleted), moved,
                                                 upserts)))
        assert ours == wrapper.searcher.calls
        assert ids == wrapper.docids
